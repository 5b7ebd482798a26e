"""Masked reductions, group statistics and loss aggregation shared by the estimators and losses.

Shapes: per-token tensors are `[B, T]` (B sequences, T response positions, right padding marked by a 0 in
`mask`); per-sequence tensors are `[B]`.
"""

from typing import Optional, Sequence, Tuple, Union

import torch

GroupIds = Union[torch.Tensor, Sequence]

LOSS_AGG_MODES = ("token-mean", "seq-mean-token-mean", "seq-mean-token-sum-norm")


def masked_sum(x: torch.Tensor, mask: torch.Tensor, dim=None) -> torch.Tensor:
    """sum(x * mask) over `dim` (all dims when None)."""
    if dim is None:
        return (x * mask).sum()
    return (x * mask).sum(dim)


def masked_mean(x: torch.Tensor, mask: torch.Tensor, dim=None) -> torch.Tensor:
    """sum(x * mask) / max(sum(mask), 1): an all-masked row gives 0 rather than NaN."""
    return masked_sum(x, mask, dim) / masked_sum(torch.ones_like(x), mask, dim).clamp(min=1)


def masked_whiten(x: torch.Tensor, mask: torch.Tensor, eps: float = 1e-8) -> torch.Tensor:
    """(x - mu) / sqrt(var + eps) over the masked entries, zero outside the mask.

    mu = sum(x m) / N and var = sum((x - mu)^2 m) / (N - 1) (Bessel-corrected), N = sum(m) >= 2.
    """
    n = mask.sum()
    if n < 2:
        raise ValueError(f"masked_whiten needs at least 2 unmasked entries to estimate a variance, got {int(n)}")
    mean = masked_sum(x, mask) / n
    var = masked_sum((x - mean) ** 2, mask) / (n - 1)
    return (x - mean) * torch.rsqrt(var + eps) * mask


def group_index(group_ids: GroupIds, batch_size: int) -> Tuple[torch.Tensor, int]:
    """Dense group index in [0, G) per sequence and G, from integer tensor ids or any hashable ids (prompt uids)."""
    if isinstance(group_ids, torch.Tensor):
        _, index = torch.unique(group_ids, return_inverse=True)
    else:
        dense = {}
        index = torch.tensor([dense.setdefault(g, len(dense)) for g in group_ids], dtype=torch.long)
    if index.numel() != batch_size:
        raise ValueError(f"group_ids has {index.numel()} entries but the batch has {batch_size} sequences")
    return index, int(index.max()) + 1 if index.numel() else 0


def group_mean_std(
    scores: torch.Tensor, group_ids: GroupIds, min_group_size: int = 1
) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Per-sequence (group mean, Bessel-corrected group std, group size) of `scores [B]`.

    Groups smaller than `min_group_size` are rejected with the offending id, because a baseline or a
    standard deviation from a group that small is undefined.
    """
    index, num_groups = group_index(group_ids, scores.shape[0])
    index = index.to(scores.device)
    counts = torch.zeros(num_groups, dtype=scores.dtype, device=scores.device).index_add_(
        0, index, torch.ones_like(scores)
    )
    small = (counts < min_group_size).nonzero().flatten()
    if small.numel():
        first = int((index == small[0].item()).nonzero()[0])
        example = group_ids[first]
        raise ValueError(
            f"{small.numel()} group(s) have fewer than {min_group_size} samples (e.g. the group of sequence "
            f"{first}, id {example.item() if isinstance(example, torch.Tensor) else example!r}, has "
            f"{int(counts[small[0]])}); sample at least {min_group_size} responses per prompt"
        )
    sums = torch.zeros_like(counts).index_add_(0, index, scores)
    mean = sums / counts
    sq_dev = torch.zeros_like(counts).index_add_(0, index, (scores - mean[index]) ** 2)
    std = torch.sqrt(sq_dev / (counts - 1).clamp(min=1))
    return mean[index], std[index], counts[index]


def _check_mode(mode: str) -> None:
    if mode not in LOSS_AGG_MODES:
        raise ValueError(f"unknown loss aggregation mode {mode!r}; known: {', '.join(LOSS_AGG_MODES)}")


def loss_denominator(mask: torch.Tensor, mode: str = "token-mean", norm_constant: Optional[float] = None):
    """The normaliser `aggregate_loss` divides by for this batch: the token count (`token-mean`), the count of
    non-empty sequences (`seq-mean-token-mean`) or B * C (`seq-mean-token-sum-norm`).

    Sum it over micro-batches and data-parallel ranks and pass the total as `aggregate_loss(denominator=...)` so
    that the summed gradients equal those of one aggregate over the whole global batch.
    """
    _check_mode(mode)
    if mode == "token-mean":
        return mask.sum()
    if mode == "seq-mean-token-mean":
        return (mask.sum(-1) > 0).sum()
    constant = mask.shape[-1] if norm_constant is None else norm_constant
    return torch.as_tensor(mask.shape[0] * constant, dtype=mask.dtype, device=mask.device)


def aggregate_loss(
    loss_mat: torch.Tensor,
    mask: torch.Tensor,
    mode: str = "token-mean",
    norm_constant: Optional[float] = None,
    denominator=None,
) -> torch.Tensor:
    """Reduce a per-token loss `[B, T]` to a scalar.

    - `token-mean`: sum_{i,t} L_it m_it / sum_{i,t} m_it (every token weighs the same; DAPO).
    - `seq-mean-token-mean`: (1/B') sum_i [sum_t L_it m_it / sum_t m_it] over the B' sequences with at least one
      token (every sequence weighs the same; the original GRPO).
    - `seq-mean-token-sum-norm`: (1/B) sum_i sum_t L_it m_it / C with a constant C (`norm_constant`, default T, the
      padded response length; pass the configured maximum response length so C does not depend on padding), so
      no length-dependent normaliser biases the gradient (Dr.GRPO).

    `denominator` replaces the batch's own `loss_denominator(mask, mode, norm_constant)`, typically by its sum
    over the micro-batches and data-parallel ranks of a global batch.
    """
    if denominator is None:
        denominator = loss_denominator(mask, mode, norm_constant)
    else:
        _check_mode(mode)
    if mode == "seq-mean-token-mean":
        numerator = (masked_sum(loss_mat, mask, -1) / mask.sum(-1).clamp(min=1)).sum()
    else:
        numerator = masked_sum(loss_mat, mask)
    return numerator / torch.as_tensor(denominator).clamp(min=1e-12)
