#!/usr/bin/env bash
# The main job, from a fresh clone: creates/refreshes .venv, then runs the embedded tiny CPU demo.
# Until the RLVR demo lands this runs the deepest part that exists: convert a tiny HF Llama to a TP=2 megatron
# checkpoint and time a forward+backward step of the policy under TP=2 on two processes.
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
# shellcheck disable=SC1091
source "$ROOT/scripts/env.sh"
cd "$ROOT"
export PYTHONUNBUFFERED=1 TOKENIZERS_PARALLELISM=false
if [ -f "$ROOT/scripts/demo_job.sh" ]; then
  exec bash "$ROOT/scripts/demo_job.sh" "$@"
fi
OUT="${1:-$ROOT/outputs/demo}"
mkdir -p "$OUT"
rm -rf "$OUT/hf" "$OUT/mcore-tp2"
python -c "from megatron_rlvr.models.tiny import save_tiny_llama; save_tiny_llama('$OUT/hf', 'demo')"
megatron-rlvr convert --from hf --to mcore --tp 2 "$OUT/hf" "$OUT/mcore-tp2"
torchrun --nproc-per-node 2 -m megatron_rlvr.cli bench train --size tiny --tp 2 --iters 3
