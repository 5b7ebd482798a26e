"""`megatron-rlvr bench generate`: rollout generation without vLLM, against HF generate and the bandwidth limit.

Times the megatron rollout backend (`rollout.megatron_engine.MegatronEngine`: megatron-core's static KV cache,
left-padded prefill, one token per step) on a batch of prompts: time to first token (the prefill and the first
draw) and decode tokens/s (every later step: batch tokens per step). Beside it, in the same run on the same weights:

- HF transformers `generate` with a static KV cache (`cache_implementation="static"`), greedy, its time to first
  token from a 1-token generate and its decode rate from the difference to the full generate;
- the memory-bandwidth limit of a decode step: each step reads every weight once (the embedding table only for
  the batch's rows) and the KV cache up to the current length, so at best it takes
  (weight bytes + mean KV bytes) / copy bandwidth, where the bandwidth is that of a large device-to-device tensor
  copy measured here (read + write bytes over time).

Also reported: how far the sampled tokens' log-probs are from the trainer's recomputed ones (one forward of the
last batch through `forward_backward`), the rollout-vs-trainer mismatch at this dtype.

The engine samples at temperature 1 and no token ends a response, so every row runs the full length. Weights are
random at `--size` (a Llama shape) or read from `--model` (a HF directory, e.g. SmolLM2 converted from GGUF).
One process, TP = PP = 1.
"""

from __future__ import annotations

import argparse
import os
import tempfile
import time

import torch

from megatron_rlvr.benchmarks import report
from megatron_rlvr.benchmarks.train import SIZES


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--size", choices=sorted(SIZES), default="tiny", help="Llama shape with random weights")
    parser.add_argument("--model", default=None, help="HF model directory to time instead of --size")
    parser.add_argument("--batch", type=int, default=8, help="prompts in the batch")
    parser.add_argument("--prompt-len", type=int, default=64, help="tokens per prompt")
    parser.add_argument("--new-tokens", type=int, default=64, help="tokens generated per prompt")
    parser.add_argument("--dtype", choices=("bf16", "fp32"), default=None, help="default: bf16 on GPU, fp32 on CPU")
    parser.add_argument("--repeats", type=int, default=2, help="timed runs of each generator (the best is kept)")
    parser.add_argument("--no-hf", action="store_true", help="skip the HF generate baseline")
    parser.add_argument("--json", default=None, help="also write the results to this JSON file")


def copy_bandwidth(device: torch.device, mib: int) -> float:
    """Bytes/s of a large tensor copy on `device`, counting the bytes read and written."""
    from megatron_rlvr.platform import current_platform

    src = torch.empty(mib * 2**20, dtype=torch.uint8, device=device).fill_(1)
    dst = torch.empty_like(src)
    for _ in range(2):
        dst.copy_(src)
    current_platform().synchronize()
    reps = 5
    start = time.perf_counter()
    for _ in range(reps):
        dst.copy_(src)
    current_platform().synchronize()
    return 2 * src.numel() * reps / (time.perf_counter() - start)


def decode_step_bytes(arch, batch: int, context: float, dtype_bytes: int) -> float:
    """Bytes a decode step must read: every weight but the embedding table (of which `batch` rows), and the KV
    cache of `batch` rows at `context` positions."""
    embedding = arch.vocab_size * arch.hidden_size
    weights = arch.num_parameters() - (0 if arch.tie_word_embeddings else embedding) + batch * arch.hidden_size
    kv = 2 * arch.num_layers * arch.num_kv_heads * arch.head_dim * batch * context
    return (weights + kv) * dtype_bytes


def _random_model_dir(size: str, path: str, max_len: int) -> None:
    from megatron_rlvr.models.tiny import save_tiny_llama

    hidden, layers, heads, kv, ffn, vocab = SIZES[size]
    save_tiny_llama(path, "tiny", std=0.02, vocab_size=vocab, hidden_size=hidden, num_hidden_layers=layers,
                    num_attention_heads=heads, num_key_value_heads=kv, intermediate_size=ffn,
                    head_dim=hidden // heads, tie_word_embeddings=False, max_position_embeddings=max(512, max_len))


def _time_engine(engine, prompts, sampling, repeats) -> dict:
    """Best time to first token and best decode rate over `repeats` runs after a warm-up run."""
    runs = []
    for _ in range(repeats + 1):
        samples = engine.generate(prompts, sampling)
        runs.append(dict(engine.timings))
        engine.sleep()
    runs = runs[1:]
    return {"ttft_s": min(t["prefill_s"] for t in runs),
            "decode_tokens_per_s": max(len(prompts) * t["decode_steps"] / t["decode_s"] for t in runs),
            "samples": samples}


def logprob_gap(model, pg, samples, vocab_size: int, micro_batch: int) -> tuple[float, float]:
    """(max, mean) |sampled log-prob - the trainer's recomputed log-prob| over all response tokens."""
    from megatron_rlvr.models.forward import forward_backward, split_micro_batches

    device = next(model.parameters()).device
    tokens = torch.tensor([s.prompt_ids + s.response_ids for s in samples], device=device)  # all full length
    with torch.no_grad():
        out = forward_backward(model, split_micro_batches(tokens, micro_batch), pg, valid_vocab_size=vocab_size)
    recomputed = torch.cat([o["logprobs"] for o in out])[:, len(samples[0].prompt_ids) - 1:].float().cpu()
    gap = (torch.tensor([s.logprobs for s in samples]) - recomputed).abs()
    return float(gap.max()), float(gap.mean())


def _time_hf(model_dir, prompts, new_tokens, dtype, device, repeats) -> dict:
    from transformers import LlamaForCausalLM

    from megatron_rlvr.platform import current_platform

    model = LlamaForCausalLM.from_pretrained(model_dir, dtype=dtype).to(device).eval()
    ids = torch.tensor(prompts, device=device)

    def run(n):
        current_platform().synchronize()
        start = time.perf_counter()
        with torch.inference_mode():
            out = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=n, min_new_tokens=n,
                                 do_sample=False, cache_implementation="static", pad_token_id=0)
        current_platform().synchronize()
        assert out.shape[1] == ids.shape[1] + n
        return time.perf_counter() - start

    run(2)
    first = min(run(1) for _ in range(repeats))
    full = min(run(new_tokens) for _ in range(repeats))
    return {"ttft_s": first, "decode_tokens_per_s": len(prompts) * (new_tokens - 1) / (full - first)}


def run(args: argparse.Namespace) -> int:
    from megatron_rlvr.models.llama import LlamaArch, build_llama, transformer_config
    from megatron_rlvr.models.weights import load_hf_into_model, read_hf_state
    from megatron_rlvr.parallel.state import init_distributed, init_model_parallel
    from megatron_rlvr.platform import current_platform
    from megatron_rlvr.rollout.base import SamplingConfig
    from megatron_rlvr.rollout.megatron_engine import MegatronEngine

    for key, value in (("MASTER_ADDR", "127.0.0.1"), ("MASTER_PORT", "29563"), ("RANK", "0"), ("WORLD_SIZE", "1")):
        os.environ.setdefault(key, value)
    if os.environ["WORLD_SIZE"] != "1":
        raise SystemExit("bench generate runs in one process (TP = PP = 1); start it without torchrun")
    init_distributed()
    platform = current_platform()
    device = platform.device()
    dtype = {"bf16": torch.bfloat16, "fp32": torch.float32}[args.dtype or ("bf16" if device.type == "cuda" else "fp32")]
    with tempfile.TemporaryDirectory() as tmp:
        model_dir = args.model
        if model_dir is None:
            model_dir = os.path.join(tmp, "model")
            _random_model_dir(args.size, model_dir, args.prompt_len + args.new_tokens)
        arch = LlamaArch.from_pretrained(model_dir)
        pg = init_model_parallel(1, 1)
        model = build_llama(arch, transformer_config(arch, params_dtype=dtype), pg, pad_vocab_multiple=128)
        load_hf_into_model(model, read_hf_state(model_dir), arch, pg)
        gen = torch.Generator().manual_seed(0)
        prompts = torch.randint(3, arch.vocab_size, (args.batch, args.prompt_len), generator=gen).tolist()
        engine = MegatronEngine(model, pg, arch, eos_ids=())
        sampling = SamplingConfig(n=1, temperature=1.0, max_tokens=args.new_tokens)
        ours = _time_engine(engine, prompts, sampling, args.repeats)
        gap_max, gap_mean = logprob_gap(model, pg, ours["samples"], arch.vocab_size, max(1, args.batch // 4))
        del engine, model
        hf = None if args.no_hf else _time_hf(model_dir, prompts, args.new_tokens, dtype, device, args.repeats)

    bandwidth = copy_bandwidth(device, 1024 if device.type == "cuda" else 256)
    step_bytes = decode_step_bytes(arch, args.batch, args.prompt_len + args.new_tokens / 2, dtype.itemsize)
    limit = args.batch * bandwidth / step_bytes
    result = {
        "model": args.model or args.size, "params": arch.num_parameters(),
        "device": torch.cuda.get_device_name() if device.type == "cuda" else "cpu",
        "dtype": str(dtype).replace("torch.", ""), "batch": args.batch, "prompt_len": args.prompt_len,
        "new_tokens": args.new_tokens,
        "ttft_s": ours["ttft_s"], "decode_tokens_per_s": ours["decode_tokens_per_s"],
        "copy_bandwidth_gb_per_s": bandwidth / 1e9, "decode_step_mb": step_bytes / 1e6,
        "bandwidth_limit_tokens_per_s": limit, "fraction_of_bandwidth_limit": ours["decode_tokens_per_s"] / limit,
        "logprob_max_abs_diff_vs_trainer": gap_max, "logprob_mean_abs_diff_vs_trainer": gap_mean,
    }
    if hf is not None:
        result.update({"hf_static_ttft_s": hf["ttft_s"], "hf_static_decode_tokens_per_s": hf["decode_tokens_per_s"],
                       "decode_speed_vs_hf": ours["decode_tokens_per_s"] / hf["decode_tokens_per_s"]})
    report(result, args.json)
    return 0
