"""`megatron-rlvr bench train`: tokens/s and model FLOPs utilisation of a policy forward+backward step.

The step is the trainer's own: megatron-core GPTModel (SDPA attention) -> fused token log-probs -> a per-token
loss -> backward, through `forward_backward`. MFU counts the model FLOPs of that step
(6 * params_without_embedding_table * tokens + 12 * layers * hidden * seq * tokens for causal attention,
halved for causality) against the bf16 matmul rate measured in the same run on the same device, so the ratio
is to what this device actually sustains, not to a datasheet.
Runs under torchrun for TP > 1 (`torchrun --nproc-per-node N -m megatron_rlvr.cli bench train --tp N`).
"""

from __future__ import annotations

import argparse
import os
import time

import torch

SIZES = {
    # name: (hidden, layers, heads, kv_heads, ffn, vocab)
    "tiny": (64, 2, 4, 2, 128, 128),
    "160m": (768, 12, 12, 4, 2048, 32000),
    "1b": (2048, 16, 32, 8, 8192, 128256),  # Llama-3.2-1B shape
    "8b": (4096, 32, 32, 8, 14336, 128256),
}


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--size", choices=sorted(SIZES), default="tiny", help="Llama shape to time")
    parser.add_argument("--seq-len", type=int, default=128)
    parser.add_argument("--micro-batch", type=int, default=2, help="sequences per micro-batch")
    parser.add_argument("--micro-batches", type=int, default=2, help="micro-batches per step")
    parser.add_argument("--tp", type=int, default=1)
    parser.add_argument("--dtype", choices=("bf16", "fp32"), default=None, help="default: bf16 on GPU, fp32 on CPU")
    parser.add_argument("--recompute", action="store_true", help="full activation recomputation")
    parser.add_argument("--iters", type=int, default=5)
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--json", default=None, help="also write the results to this JSON file")


def matmul_rate(device: torch.device, dtype: torch.dtype, n: int) -> float:
    """Sustained dense matmul FLOP/s of this device at [n, n] x [n, n]."""
    from megatron_rlvr.platform import current_platform

    a = torch.randn(n, n, device=device, dtype=dtype)
    b = torch.randn(n, n, device=device, dtype=dtype)
    for _ in range(3):
        a @ b
    current_platform().synchronize()
    reps = 10
    start = time.perf_counter()
    for _ in range(reps):
        a @ b
    current_platform().synchronize()
    return 2 * n**3 * reps / (time.perf_counter() - start)


def step_flops(arch, seq_len: int, tokens: int) -> float:
    """Model FLOPs of forward+backward over `tokens` tokens of `seq_len`-long sequences (no recompute counted)."""
    non_embedding = arch.num_parameters() - arch.vocab_size * arch.hidden_size * (1 if arch.tie_word_embeddings else 2)
    dense = 6 * (non_embedding + arch.vocab_size * arch.hidden_size) * tokens  # output layer is a matmul too
    attention = 6 * arch.num_layers * arch.num_heads * arch.head_dim * seq_len * tokens  # QK^T and PV, causal half
    return dense + attention


def bench_model(size: str, dtype_name: str | None, *, max_positions: int, port: str, tp: int = 1,
                recompute: bool = False):
    """A randomly initialised policy of shape `size` for the model benchmarks, in a world of its own unless
    torchrun made one: (rank, platform, dtype, arch, pg, model). `dtype_name`: "bf16" | "fp32" | None (bf16 on a
    GPU, fp32 on CPU)."""
    from megatron_rlvr.models.llama import LlamaArch, build_llama, transformer_config
    from megatron_rlvr.parallel.state import init_distributed, init_model_parallel
    from megatron_rlvr.platform import current_platform

    os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
    os.environ.setdefault("MASTER_PORT", port)
    os.environ.setdefault("RANK", "0")
    os.environ.setdefault("WORLD_SIZE", "1")
    rank, _ = init_distributed()
    platform = current_platform()
    on_gpu = platform.device().type == "cuda"
    dtype = {"bf16": torch.bfloat16, "fp32": torch.float32}[dtype_name or ("bf16" if on_gpu else "fp32")]
    hidden, layers, heads, kv, ffn, vocab = SIZES[size]
    arch = LlamaArch(vocab_size=vocab, hidden_size=hidden, num_layers=layers, num_heads=heads, num_kv_heads=kv,
                     ffn_hidden_size=ffn, head_dim=hidden // heads, max_position_embeddings=max(max_positions, 128))
    pg = init_model_parallel(tp, 1)
    config = transformer_config(arch, tp=tp, params_dtype=dtype, recompute=recompute)
    return rank, platform, dtype, arch, pg, build_llama(arch, config, pg, pad_vocab_multiple=128)


def run(args: argparse.Namespace) -> int:
    from megatron_rlvr.models.forward import forward_backward, split_micro_batches

    rank, platform, dtype, arch, pg, model = bench_model(args.size, args.dtype, max_positions=args.seq_len,
                                                         port="29561", tp=args.tp, recompute=args.recompute)
    device, vocab = platform.device(), arch.vocab_size
    total = args.micro_batch * args.micro_batches
    tokens = torch.randint(0, vocab, (total, args.seq_len), device=device)
    mbs = split_micro_batches(tokens, args.micro_batch)
    n_tokens = total * (args.seq_len - 1)

    def loss_fn(logprobs, entropy, mb):
        return -logprobs.sum() / n_tokens, {}

    def step():
        forward_backward(model, mbs, pg, valid_vocab_size=vocab, loss_fn=loss_fn)
        for p in model.parameters():
            p.grad = None

    for _ in range(args.warmup):
        step()
    platform.synchronize()
    platform.reset_peak_memory()
    start = time.perf_counter()
    for _ in range(args.iters):
        step()
    platform.synchronize()
    seconds = (time.perf_counter() - start) / args.iters
    peak = matmul_rate(device, dtype, 8192 if device.type == "cuda" else 512)
    flops = step_flops(arch, args.seq_len, total * args.seq_len) / args.tp
    result = {
        "size": args.size, "params": arch.num_parameters(), "device": str(torch.cuda.get_device_name() if device.type == "cuda" else "cpu"),
        "dtype": str(dtype).replace("torch.", ""), "tp": args.tp, "seq_len": args.seq_len,
        "tokens_per_step": total * args.seq_len, "step_s": seconds,
        "tokens_per_s": total * args.seq_len / seconds, "model_tflops_per_s": flops / seconds / 1e12,
        "measured_matmul_tflops_per_s": peak / 1e12, "mfu_vs_measured_matmul": flops / seconds / peak,
        "peak_memory_gib": platform.max_memory_allocated() / 2**30, "recompute": args.recompute,
    }
    if rank == 0:
        from megatron_rlvr.benchmarks import report

        report(result, args.json)
    return 0
