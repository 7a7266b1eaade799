#!/usr/bin/env bash
# Set up (when needed) and run the main job: a short DPO run of the bundled SmolLM2-135M-Instruct + LoRA
# on the preference data the project ships. Extra arguments override the recipe's config.
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
source "$ROOT/scripts/setup.sh" "plots"
cd "$ROOT"
export TOKENIZERS_PARALLELISM=false HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1
python recipes/dpo_llama.py --config recipes/configs/demo_dpo.yaml "$@"
