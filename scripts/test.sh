#!/usr/bin/env bash
# Set up (when needed) and run the test suite. Extra arguments go to pytest, e.g. -m "not slow".
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
source "$ROOT/scripts/setup.sh" "test,dev"
cd "$ROOT"
export TOKENIZERS_PARALLELISM=false HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1
ruff check hfrlhf recipes tests bench
python -m pytest "$@"
