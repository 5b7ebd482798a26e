"""Vocab-parallel bookkeeping: which columns a tensor-parallel rank holds, and the one collective that
turns per-shard row statistics into full-vocab log-probs and entropies.

Rank r of a TP group of size W holds global vocab ids `[r V_local, (r+1) V_local)`. Each shard reports per
row `(m_r, s0_r, s1_r, z_y,r)` (see `triton_rows`); an all-gather of these `4 N` floats per rank is the
only communication. Every rank then merges locally, with `M = max_r m_r` and `w_r = exp(m_r - M)`:

    s0 = sum_r w_r s0_r,   s1 = sum_r w_r (s1_r + (m_r - M) s0_r),   z_y = sum_r z_y,r,
    lse = M + log s0,      H = log s0 - s1 / s0,                     log p_y = z_y - lse.

`z_y,r` is 0 on every rank but the label's owner, so the sum is the label logit. The same merge combines
column blocks within a rank (the fused linear variant's vocab chunks). Once `lse` and `H` are known on
every rank the gradient of a shard's logits depends only on that shard, so backward needs no collective.
"""

from __future__ import annotations

from dataclasses import dataclass, replace

import torch
import torch.distributed as dist


@dataclass(frozen=True)
class VocabShard:
    """Placement of one rank's `n_local` vocab columns in the global vocab."""

    group: dist.ProcessGroup | None
    world_size: int
    start: int
    n_local: int
    n_valid: int
    """Columns of this shard below `valid_vocab` (the rest is padding, treated as -inf)."""
    valid_vocab: int
    """Global ids at or past this are padding; labels outside `[0, valid_vocab)` are ignored."""


def vocab_shard(n_local: int, group: dist.ProcessGroup | None, valid_vocab_size: int | None) -> VocabShard:
    """The shard of the calling rank for logits with `n_local` vocab columns; `group=None` means unsharded."""
    world_size = 1 if group is None else dist.get_world_size(group)
    rank = 0 if group is None else dist.get_rank(group)
    padded_vocab = n_local * world_size
    valid_vocab = padded_vocab if valid_vocab_size is None else int(valid_vocab_size)
    if not 0 < valid_vocab <= padded_vocab:
        raise ValueError(
            f"valid_vocab_size={valid_vocab_size} must be in (0, {padded_vocab}] (the padded vocab: {n_local} "
            f"columns per rank x {world_size} ranks); pass the unpadded tokenizer vocab size, or None"
        )
    start = rank * n_local
    n_valid = min(max(valid_vocab - start, 0), n_local)
    return VocabShard(group if world_size > 1 else None, world_size, start, n_local, n_valid, valid_vocab)


def column_block(shard: VocabShard, start: int, width: int) -> VocabShard:
    """Columns `[start, start + width)` of this rank's shard, as a shard of their own (same group, labels)."""
    n_valid = min(max(shard.n_valid - start, 0), width)
    return replace(shard, start=shard.start + start, n_local=width, n_valid=n_valid)


def label_is_valid(labels: torch.Tensor, shard: VocabShard) -> torch.Tensor:
    return (labels >= 0) & (labels < shard.valid_vocab)


def merge_partial_stats(partials: torch.Tensor) -> torch.Tensor:
    """Merge `[K, 4, N]` partial row statistics of K disjoint column blocks into `[4, N]` (module docstring)."""
    m, s0, s1, z_y = partials.unbind(1)
    m_max = m.amax(dim=0)
    weight = torch.exp(m - m_max)
    s0_all = (weight * s0).sum(dim=0)
    s1_all = (weight * (s1 + (m - m_max) * s0)).sum(dim=0)
    return torch.stack([m_max, s0_all, s1_all, z_y.sum(dim=0)])


def combine_partial_stats(
    stats: torch.Tensor, labels: torch.Tensor, shard: VocabShard
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """`(log p_y, lse, H)`, each fp32 `[N]`, from this rank's `[4, N]` partial statistics of its whole shard,
    merged over `shard.group` (one all-gather) when the vocab is sharded."""
    if shard.group is not None:
        # gloo only takes the flat [world * rows, ...] output layout (NCCL takes a stacked one too).
        flat = torch.empty((shard.world_size * stats.shape[0], *stats.shape[1:]), dtype=stats.dtype,
                           device=stats.device)
        # torch 2.13 deprecates all_gather_into_tensor in favour of the same call named all_gather_single.
        all_gather = getattr(dist, "all_gather_single", None) or dist.all_gather_into_tensor
        all_gather(flat, stats.contiguous(), group=shard.group)
        stats = merge_partial_stats(flat.view(shard.world_size, *stats.shape))
    m, s0, s1, z_y = stats.unbind(0)
    log_s0 = torch.log(s0)
    lse = m + log_s0
    logp = torch.where(label_is_valid(labels, shard), z_y - lse, torch.zeros_like(lse))
    return logp, lse, log_s0 - s1 / s0


def combine_row_stats(
    stats: torch.Tensor, labels: torch.Tensor, shard: VocabShard
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """`(log p_y, lse, H)` from `row_stats` output: the `[3, N]` final block of an unsharded vocab, or the
    `[4, N]` partial block of a shard (see `combine_partial_stats`)."""
    if shard.group is None:
        return stats[0], stats[1], stats[2]
    return combine_partial_stats(stats, labels, shard)
