#!/usr/bin/env bash
# Regenerate every benchmark result and docs/benchmarks.md (about 40 minutes on the 2-core machine with bf16 units, 1.5 hours on the AVX2 one).
#   bash bench/all.sh            # everything
#   bash bench/all.sh report     # only rebuild docs/benchmarks.md from bench/results/*.json
# Settings shared by every stage: the precision each library's default picks on this machine ("auto":
# bf16 where the CPU has bf16 units, fp32 elsewhere), one torch thread per run (see docs/benchmarks.md:
# on a shared machine two OpenMP threads per process oversubscribe the cores and swamp the measurement).
set -euo pipefail
cd "$(dirname "$0")/.."
export HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1 TOKENIZERS_PARALLELISM=false
PY="${PY:-python}"
COMMON=(--threads "${THREADS:-1}" --precision "${PRECISION:-auto}")
if [ "${1:-}" != "report" ]; then
  bash bench/setup_trl112.sh
  # 1. DPO, KTO, Reward against TRL 1.16, alternating, 3 repeats
  "$PY" bench/run.py --tasks dpo kto reward --repeats 3 --steps 3 --warmup 1 --batch 2 --max_length 512 --quick "${COMMON[@]}"
  # 2. PPO against TRL 1.12 (own venv), 4 prompts, 48 new tokens
  "$PY" bench/run.py --ppo --repeats "${PPO_REPEATS:-1}" --steps 1 --warmup 0 "${COMMON[@]}"
  # 3. peak memory against length, every sequence filling max_length
  "$PY" bench/run.py --memory --lengths 256 512 1024 2048 --batch 1 "${COMMON[@]}"
  # 4. ablation: hfrlhf DPO in the padded and packed layouts (shared_prompt and the cached reference are in 1.)
  "$PY" bench/run.py --tasks ablation --name ablation --repeats 1 --steps 1 --warmup 1 --batch 2 --max_length 512 "${COMMON[@]}"
fi
"$PY" bench/report.py
