"""Policy and value losses. Each returns `(loss, stats)`: a scalar to backpropagate and a dict of detached scalar
tensors for logging (kept on device so logging costs no host sync until the trainer reads them).
"""

from typing import Dict, Optional, Tuple

import torch

from .masked import aggregate_loss, masked_mean
from .registry import register_policy_loss

Stats = Dict[str, torch.Tensor]


@register_policy_loss("ppo")
def ppo_policy_loss(
    log_prob: torch.Tensor,
    old_log_prob: torch.Tensor,
    advantages: torch.Tensor,
    response_mask: torch.Tensor,
    *,
    clip_low: float = 0.2,
    clip_high: float = 0.2,
    clip_c: Optional[float] = None,
    token_weight: Optional[torch.Tensor] = None,
    loss_agg_mode: str = "token-mean",
    norm_constant: Optional[float] = None,
    loss_denominator=None,
) -> Tuple[torch.Tensor, Stats]:
    """PPO clipped surrogate with DAPO's decoupled clip range, optional dual-clip and a per-token weight.

        rho_t = exp(logp_t - old_logp_t)
        L_t   = max(-A_t rho_t, -A_t clip(rho_t, 1 - clip_low, 1 + clip_high))
        L_t   = min(L_t, -A_t * clip_c)   where A_t < 0, when clip_c is set (dual-clip, Ye et al., 2020; c > 1)
        L_t   = w_t * L_t                 with `token_weight` w (the rollout correction, `algorithms.correction`)

    and the token losses are reduced by `aggregate_loss(L, mask, loss_agg_mode, norm_constant, loss_denominator)`
    (`loss_denominator`: the global batch's normaliser when the batch is split into micro-batches or ranks).
    Stats: `pg_clipfrac` (tokens where the clip is active), `pg_clipfrac_lower` (dual clip active),
    `ppo_kl` (mean of old_logp - logp, the k1 estimate of KL(old || new)).
    """
    if clip_c is not None and clip_c <= 1.0:
        raise ValueError(f"dual-clip constant clip_c must be > 1 (typically 3), got {clip_c}")
    mask = response_mask.to(log_prob.dtype)
    log_ratio = log_prob - old_log_prob
    ratio = torch.exp(log_ratio)
    unclipped = -advantages * ratio
    clipped = -advantages * torch.clamp(ratio, 1.0 - clip_low, 1.0 + clip_high)
    token_loss = torch.maximum(unclipped, clipped)
    stats: Stats = {"pg_clipfrac": masked_mean((clipped > unclipped).to(mask.dtype), mask).detach()}
    if clip_c is not None:
        lower_bound = -advantages * clip_c
        dual_active = (advantages < 0) & (token_loss > lower_bound)
        token_loss = torch.where(advantages < 0, torch.minimum(token_loss, lower_bound), token_loss)
        stats["pg_clipfrac_lower"] = masked_mean(dual_active.to(mask.dtype), mask).detach()
    if token_weight is not None:
        token_loss = token_loss * token_weight.detach()
    stats["ppo_kl"] = masked_mean(-log_ratio, mask).detach()
    loss = aggregate_loss(token_loss, mask, loss_agg_mode, norm_constant, loss_denominator)
    return loss, stats


def clipped_value_loss(
    values: torch.Tensor,
    old_values: torch.Tensor,
    returns: torch.Tensor,
    response_mask: torch.Tensor,
    *,
    clip_range: float = 0.2,
    loss_agg_mode: str = "token-mean",
    norm_constant: Optional[float] = None,
    loss_denominator=None,
) -> Tuple[torch.Tensor, Stats]:
    """PPO clipped value loss:

        V^clip_t = old_V_t + clip(V_t - old_V_t, -eps, eps)
        L_t      = 1/2 * max((V_t - R_t)^2, (V^clip_t - R_t)^2)

    reduced by `aggregate_loss` (see `ppo_policy_loss` for the last three arguments). Stats: `vf_clipfrac` (tokens where the clipped term is the larger).
    """
    mask = response_mask.to(values.dtype)
    clipped_values = old_values + torch.clamp(values - old_values, -clip_range, clip_range)
    unclipped_sq = (values - returns) ** 2
    clipped_sq = (clipped_values - returns) ** 2
    token_loss = 0.5 * torch.maximum(unclipped_sq, clipped_sq)
    loss = aggregate_loss(token_loss, mask, loss_agg_mode, norm_constant, loss_denominator)
    return loss, {"vf_clipfrac": masked_mean((clipped_sq > unclipped_sq).to(mask.dtype), mask).detach()}
