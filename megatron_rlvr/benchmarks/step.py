"""`megatron-rlvr bench step`: the update phase of an RLVR step, padded against packed, on one synthetic batch.

The batch is what a rollout gives a data-parallel rank: `--rows` sequences of a prompt (uniform in
[prompt_len / 2, prompt_len]) and a response whose length is long-tailed, as sampled reasoning answers are: log-normal
with median `--max-response` / 8 and sigma 1, cut to [1, max_response] (most responses short, a few at the cap).
The update phase is the trainer's: forward + backward of every micro-batch through `forward_backward` with a
per-token policy-gradient loss (the optimizer step, the same work in both layouts, is left out), over

- padded micro-batches: `--micro-batch` rows each, every row padded to its micro-batch's longest
  (`train.max_tokens_per_micro_batch: 0`);
- packed micro-batches: the rows back to back under a budget of `--max-tokens` tokens, spread by the balanced
  partition (the trainer's default, `models.forward.balanced_micro_batches`).

Tokens counted are real tokens (prompt + response) in both. `pad_fraction` is the share of padding in the padded
layout's computed tokens; a layout that wasted nothing would run at padded_tokens_per_s / (1 - pad_fraction), the
no-padding ideal, and `packed_vs_ideal` is the packed rate over it.
"""

from __future__ import annotations

import argparse
import time

import torch

from megatron_rlvr.benchmarks.train import SIZES, bench_model


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--size", choices=sorted(SIZES), default="tiny", help="Llama shape to time")
    parser.add_argument("--rows", type=int, default=64, help="sequences in the batch (one DP rank's share)")
    parser.add_argument("--prompt-len", type=int, default=64, help="longest prompt")
    parser.add_argument("--max-response", type=int, default=512, help="response cap (rollout.max_tokens)")
    parser.add_argument("--micro-batch", type=int, default=8, help="rows per padded micro-batch")
    parser.add_argument("--max-tokens", type=int, default=None,
                        help="packing budget per micro-batch; default: micro-batch x (prompt-len + max-response)")
    parser.add_argument("--dtype", choices=("bf16", "fp32"), default=None, help="default: bf16 on GPU, fp32 on CPU")
    parser.add_argument("--iters", type=int, default=3)
    parser.add_argument("--warmup", type=int, default=1)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--json", default=None, help="also write the results to this JSON file")


def synthetic_lengths(rows: int, prompt_len: int, max_response: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(prompt lengths, response lengths) of the module docstring's distribution."""
    gen = torch.Generator().manual_seed(seed)
    prompts = torch.randint(max(1, prompt_len // 2), prompt_len + 1, (rows,), generator=gen)
    median = max(1.0, max_response / 8)
    normal = torch.randn(rows, generator=gen, dtype=torch.float64)
    responses = torch.exp(torch.log(torch.tensor(median, dtype=torch.float64)) + normal).round().long()
    return prompts, responses.clamp(1, max_response)


def run(args: argparse.Namespace) -> int:
    from megatron_rlvr.models.forward import balanced_micro_batches, forward_backward, split_micro_batches

    longest = args.prompt_len + args.max_response
    rank, platform, dtype, arch, pg, model = bench_model(args.size, args.dtype, max_positions=longest, port="29562")
    device, vocab = platform.device(), arch.vocab_size

    prompts, responses = synthetic_lengths(args.rows, args.prompt_len, args.max_response, args.seed)
    lengths = prompts + responses
    width = int(lengths.max())
    gen = torch.Generator().manual_seed(args.seed + 1)
    tokens = torch.randint(1, vocab, (args.rows, width), generator=gen)
    mask = torch.zeros(args.rows, width - 1)
    for row in range(args.rows):
        tokens[row, int(lengths[row]):] = 0
        mask[row, int(prompts[row]) - 1: int(lengths[row]) - 1] = 1.0
    fields = {"mask": mask.to(device), "advantages": torch.randn(args.rows, width - 1, generator=gen).to(device)}
    tokens = tokens.to(device)
    real = int(lengths.sum())
    budget = args.max_tokens or args.micro_batch * longest

    padded = split_micro_batches(tokens, args.micro_batch, fields, lengths)
    packed = balanced_micro_batches(tokens, lengths, budget, fields)
    computed = sum(mb.tokens.shape[0] * mb.tokens.shape[1] for mb in padded)
    n_response = float(mask.sum())

    def loss_fn(logprobs, entropy, mb):
        f = mb.fields
        return -(logprobs * f["advantages"] * f["mask"]).sum() / n_response, {}

    def timed(mbs) -> float:
        def step():
            forward_backward(model, mbs, pg, valid_vocab_size=vocab, loss_fn=loss_fn)
            for p in model.parameters():
                p.grad = None

        for _ in range(args.warmup):
            step()
        platform.synchronize()
        start = time.perf_counter()
        for _ in range(args.iters):
            step()
        platform.synchronize()
        return (time.perf_counter() - start) / args.iters

    padded_s = timed(padded)
    packed_s = timed(packed)
    pad_fraction = 1 - real / computed
    padded_rate, packed_rate = real / padded_s, real / packed_s
    ideal = padded_rate / (1 - pad_fraction)
    result = {
        "size": args.size, "dtype": str(dtype).replace("torch.", ""),
        "device": str(torch.cuda.get_device_name() if device.type == "cuda" else "cpu"),
        "rows": args.rows, "real_tokens": real, "response_tokens": int(n_response),
        "response_length_median": float(responses.median()), "response_length_max": int(responses.max()),
        "padded_micro_batches": len(padded), "packed_micro_batches": len(packed), "packing_budget": budget,
        "pad_fraction": pad_fraction, "padded_s": padded_s, "packed_s": packed_s,
        "padded_tokens_per_s": padded_rate, "packed_tokens_per_s": packed_rate,
        "no_padding_ideal_tokens_per_s": ideal, "packed_vs_ideal": packed_rate / ideal,
        "packed_vs_padded": packed_rate / padded_rate,
    }
    if rank == 0:
        from megatron_rlvr.benchmarks import report

        report(result, args.json)
    return 0
