#!/usr/bin/env bash
# A separate virtual environment with TRL 1.12.0, the last TRL release that ships a PPOTrainer
# (trl.experimental.ppo), for the PPO comparison in bench/ppo_trl112.py. Idempotent.
#   bash bench/setup_trl112.sh
set -euo pipefail
here="$(cd "$(dirname "$0")" && pwd)"
venv="$here/.venv-trl112"
python="${PYTHON:-python3.11}"
if [ ! -x "$venv/bin/python" ]; then
  "$python" -m venv "$venv"
fi
"$venv/bin/pip" install -q --upgrade pip
# the CPU build first: an unpinned torch would pull a multi-GB CUDA build
"$venv/bin/pip" install -q "torch==2.13.0"
"$venv/bin/pip" install -q "trl==1.12.0" peft accelerate datasets gguf sentencepiece
"$venv/bin/python" -c "import trl, transformers, torch; from trl.experimental.ppo import PPOTrainer; print('trl', trl.__version__, 'transformers', transformers.__version__, 'torch', torch.__version__)"
