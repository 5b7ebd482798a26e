"""PPO/GRPO clipped policy loss per token, straight from the logits.

The logits are read once forward (one `token_logprobs` pass giving log-probs and entropies) and once
backward (one gradient pass); everything between is elementwise on `[T]` tensors.
"""

from __future__ import annotations

import torch
import torch.distributed as dist

from .kl import KL_ESTIMATORS, kl_estimate
from .token_logprobs import token_logprobs


def fused_policy_loss(
    logits: torch.Tensor,
    labels: torch.Tensor,
    old_logp: torch.Tensor,
    ref_logp: torch.Tensor | None,
    advantages: torch.Tensor,
    mask: torch.Tensor,
    *,
    clip_low: float = 0.2,
    clip_high: float = 0.2,
    kl_kind: str = "k3",
    kl_coef: float = 0.0,
    entropy_coef: float = 0.0,
    temperature: float = 1.0,
    group: dist.ProcessGroup | None = None,
    valid_vocab_size: int | None = None,
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """Per-token clipped surrogate loss with KL and entropy terms, masked.

    With `log p = log pi(y | tau)` from `token_logprobs(logits / tau)`, `A` the advantages, `m` the mask:

        r      = exp(log p - old_logp)
        pg     = max(-A r, -A clip(r, 1 - clip_low, 1 + clip_high))
        kl     = kl_estimate(log p, ref_logp, kl_kind)              (k1 / k2 / k3, see kl.py)
        loss   = m * (pg + kl_coef kl - entropy_coef H)

    Masked tokens give loss 0 and no gradient, whatever their inputs (their log-ratio is zeroed before
    the exponential, so an extreme old_logp there cannot make inf * 0). Reduction over tokens (token mean,
    sequence mean, ...) is left to the caller.

    Args:
        logits: `[..., V_local]`, the vocab shard of this rank when `group` is given.
        labels, old_logp, advantages, mask: `[...]`; labels are global vocab ids, mask is bool or 0/1.
        ref_logp: `[...]` reference-policy log-probs, or None when `kl_coef == 0`.
        clip_low, clip_high: the ratio is clipped to `[1 - clip_low, 1 + clip_high]` (decoupled clip).

    Returns:
        `(loss, stats)`: fp32 per-token loss `[...]` and detached per-token fp32 stats `logp`, `entropy`,
        `ratio`, `clipped` (1 where the clipped branch is taken, so the token passes no gradient) and,
        when `ref_logp` is given, `kl`.
    """
    if kl_kind not in KL_ESTIMATORS:
        raise ValueError(f"fused_policy_loss: unknown kl_kind {kl_kind!r}; known: {', '.join(KL_ESTIMATORS)}")
    if kl_coef != 0.0 and ref_logp is None:
        raise ValueError("fused_policy_loss: kl_coef != 0 needs ref_logp (reference-policy log-probs)")
    for name, tensor in (("old_logp", old_logp), ("advantages", advantages), ("mask", mask)):
        if tensor.shape != labels.shape:
            raise ValueError(
                f"fused_policy_loss: {name} shape {tuple(tensor.shape)} must equal labels shape {tuple(labels.shape)}"
            )
    logp, entropy = token_logprobs(
        logits,
        labels,
        temperature=temperature,
        group=group,
        return_entropy=True,
        valid_vocab_size=valid_vocab_size,
    )
    if entropy_coef == 0.0:
        entropy = entropy.detach()  # keeps the entropy term out of the backward kernel
    keep = mask.bool()
    zero = torch.zeros_like(logp)
    log_ratio = torch.where(keep, logp - old_logp.float(), zero)
    ratio = torch.exp(log_ratio)
    advantages = advantages.float()
    pg_unclipped = -advantages * ratio
    pg_clipped = -advantages * ratio.clamp(1.0 - clip_low, 1.0 + clip_high)
    loss = torch.maximum(pg_unclipped, pg_clipped) - entropy_coef * entropy
    stats = {
        "logp": logp.detach(),
        "entropy": entropy.detach(),
        "ratio": ratio.detach(),
        "clipped": (keep & (pg_clipped > pg_unclipped)).float(),
    }
    if ref_logp is not None:
        ref_logp = ref_logp.float()
        kl = kl_estimate(torch.where(keep, logp, ref_logp), ref_logp, kl_kind)
        loss = loss + kl_coef * kl
        stats["kl"] = kl.detach()
    return torch.where(keep, loss, zero), stats
