#!/usr/bin/env bash
# The embedded CPU demo end to end, in an activated environment:
#   scripts/demo_job.sh [WORKDIR]   (default outputs/demo; NPROC ranks, default 2; SEED, default 0; DIGITS per
#                                    operand, default 1)
# 1. the bundled arithmetic task and the tiny "demo" Llama   (python -m megatron_rlvr.demo prepare)
# 2. SFT warm start                                          (examples/configs/demo-sft.yaml)
# 3. GRPO with CPU rollouts under torchrun                   (examples/configs/tiny-cpu.yaml)
# 4. curves to PNG and held-out accuracy before/after RLVR
set -euo pipefail
here=$(cd "$(dirname "$0")/.." && pwd)
work=${1:-outputs/demo}
nproc=${NPROC:-2}
seed=${SEED:-0}
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-1} TOKENIZERS_PARALLELISM=false
launch() { torchrun --standalone --nproc-per-node "$nproc" -m megatron_rlvr.cli "$@"; }

python -m megatron_rlvr.demo prepare "$work" --seed "$seed" --digits "${DIGITS:-1}"
if [ ! -f "$work/sft/hf/config.json" ]; then
  launch sft --config "$here/examples/configs/demo-sft.yaml" output_dir="$work/sft" model.path="$work/model" \
    "data.train_files=[$work/data/sft.jsonl]" train.seed="$((seed + 1))"
fi
launch train --config "$here/examples/configs/tiny-cpu.yaml" output_dir="$work/rlvr" model.path="$work/sft/hf" \
  "data.train_files=[$work/data/train.jsonl]" "data.eval_files=[$work/data/eval.jsonl]" train.seed="$((seed + 1))"
megatron-rlvr plot "$work/rlvr"
python -m megatron_rlvr.demo summary "$work"
