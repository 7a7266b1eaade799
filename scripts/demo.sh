#!/usr/bin/env bash
# Set up (when needed) and run the main job: the reduced controlled-sentiment experiment. A LoRA adapter on the
# bundled SmolLM2-135M-Instruct is trained with DPO (shorter than the full experiment's: 12 steps of 8 pairs at
# 3e-4) on preference pairs the project made with the library (completions of the same model, ranked by VADER sentiment,
# experiments/sentiment/data), then the first 50 held-out prompts are answered by the reference and by the trained
# policy and scored: gold reward, win rate, KL, length. A few minutes on one CPU thread.
# Extra arguments go to experiments/sentiment/run.py (e.g. --seed 1; drop --reduced for the full experiment).
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
source "$ROOT/scripts/setup.sh" "experiments"  # vadersentiment (the gold reward) and matplotlib
cd "$ROOT"
export TOKENIZERS_PARALLELISM=false HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1
python experiments/sentiment/run.py --reduced "$@"
