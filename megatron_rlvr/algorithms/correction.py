"""Rollout correction: reweighting the update towards the distribution the rollout engine actually sampled from.

The rollout engine (vLLM: other kernels, other precision, and with one-step off-policy older weights) samples
token y_t with log-prob `rollout_logp_t`, while the trainer's policy before the update gives `old_logp_t`. The
per-token importance ratio between the two is

    rho_t = exp(old_logp_t - rollout_logp_t)

and a correction turns it into a detached per-token weight `w_t` multiplying the token's policy loss:

    none  w_t = 1
    tis   w_t = min(rho_t, C)                                    truncated IS (Yao et al., 2025)
    mis   w_t = 1[1/C <= rho_t <= C]                             masked IS, token level
          w_t = 1[1/C <= prod_{t in seq} rho_t <= C]             masked IS, sequence level (the whole response)

A masked token contributes nothing to the loss; the loss normaliser (tokens or sequences of the whole batch) is
left as it is, so masking never raises the weight of the tokens that remain.
"""

from __future__ import annotations

from typing import Dict, Tuple

import torch

from .masked import masked_mean, masked_sum

ROLLOUT_CORRECTIONS = ("none", "tis", "mis")
MIS_LEVELS = ("token", "sequence")


def truncated_is_weight(old_log_prob: torch.Tensor, rollout_log_prob: torch.Tensor, cap: float) -> torch.Tensor:
    """w_t = min(exp(old_logp_t - rollout_logp_t), C), detached."""
    return torch.exp(old_log_prob - rollout_log_prob).clamp(max=cap).detach()


def rollout_correction(
    old_log_prob: torch.Tensor,
    rollout_log_prob: torch.Tensor,
    response_mask: torch.Tensor,
    *,
    kind: str,
    cap: float,
    level: str = "token",
) -> Tuple[torch.Tensor, Dict[str, torch.Tensor]]:
    """The per-token weight `w` `[B, S]` of `kind` (see the module docstring) and its stats:

    - `logprob_abs_diff`: mean |old_logp - rollout_logp| over response tokens (how far the engines disagree);
    - `is_weight_mean`: mean of w over response tokens (with `none`, the mean raw ratio rho, as a diagnostic);
    - `masked_fraction`: share of response tokens with w = 0 (`mis`; 0 otherwise).
    """
    if kind not in ROLLOUT_CORRECTIONS:
        raise ValueError(f"rollout correction {kind!r} is not one of {', '.join(ROLLOUT_CORRECTIONS)}")
    if level not in MIS_LEVELS:
        raise ValueError(f"masked-IS level {level!r} is not one of {', '.join(MIS_LEVELS)}")
    if kind != "none" and not cap > 1.0:
        raise ValueError(f"the importance-weight cap C must be > 1 (the band is [1/C, C]), got {cap}")
    mask = response_mask.to(old_log_prob.dtype)
    with torch.no_grad():
        log_ratio = (old_log_prob - rollout_log_prob) * mask
        ratio = torch.exp(log_ratio)
        if kind == "none":
            weight = torch.ones_like(ratio)
            reported = ratio
        elif kind == "tis":
            weight = ratio.clamp(max=cap)
            reported = weight
        else:
            bound = torch.log(torch.tensor(cap, dtype=log_ratio.dtype, device=log_ratio.device))
            if level == "token":
                inside = log_ratio.abs() <= bound
            else:
                inside = (masked_sum(log_ratio, mask, -1).abs() <= bound).unsqueeze(-1).expand_as(log_ratio)
            weight = inside.to(mask.dtype)
            reported = weight
        stats = {
            "logprob_abs_diff": masked_mean(log_ratio.abs(), mask),
            "is_weight_mean": masked_mean(reported, mask),
            "masked_fraction": masked_mean((weight == 0).to(mask.dtype), mask),
        }
    return weight * mask, stats
