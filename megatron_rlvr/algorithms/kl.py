"""KL regularisation towards the frozen reference policy, as a reward penalty or as a loss term, and the
controllers that choose its coefficient beta.

The per-token estimators come from the fused kernel `megatron_rlvr.kernels.kl_estimate(logp, ref_logp, kind)`
with x = ref_logp - logp:  k1 = -x,  k2 = x^2 / 2,  k3 = exp(x) - 1 - x  (Schulman, "Approximating KL").
"""

from typing import Dict, Tuple

import torch

from .masked import aggregate_loss, masked_mean, masked_sum


def _kl_estimate(log_prob: torch.Tensor, ref_log_prob: torch.Tensor, kind: str) -> torch.Tensor:
    # Imported on use: the kernels package pulls in triton, which the data and config paths do not need.
    from megatron_rlvr.kernels import kl_estimate

    return kl_estimate(log_prob, ref_log_prob, kind)


def kl_reward_penalty(
    token_level_rewards: torch.Tensor,
    log_prob: torch.Tensor,
    ref_log_prob: torch.Tensor,
    response_mask: torch.Tensor,
    *,
    beta: float,
    kind: str = "k1",
) -> Tuple[torch.Tensor, Dict[str, torch.Tensor]]:
    """KL as a per-token reward penalty (Ziegler et al., 2019; Tülu 3 uses k1 with beta = 0.05):

        r'_t = r_t - beta * kl_t       kl_t = k_kind(logp_t, ref_logp_t), masked, no gradient

    Stats: `kl` (token mean) and `kl_seq` (mean over sequences of the summed per-token KL, the quantity the
    adaptive controller tracks).
    """
    mask = response_mask.to(token_level_rewards.dtype)
    with torch.no_grad():
        kl = _kl_estimate(log_prob, ref_log_prob, kind) * mask
    stats = {"kl": masked_mean(kl, mask), "kl_seq": masked_sum(kl, mask, -1).mean()}
    return token_level_rewards - beta * kl, stats


def kl_loss(
    log_prob: torch.Tensor,
    ref_log_prob: torch.Tensor,
    response_mask: torch.Tensor,
    *,
    kind: str = "k3",
    loss_agg_mode: str = "token-mean",
    loss_denominator=None,
) -> Tuple[torch.Tensor, Dict[str, torch.Tensor]]:
    """KL as a loss term (GRPO: k3, added as beta * kl_loss to the policy loss):

        L = aggregate_loss(k_kind(logp, ref_logp), mask, loss_agg_mode, denominator=loss_denominator),
    differentiable w.r.t. logp.
    """
    mask = response_mask.to(log_prob.dtype)
    kl = _kl_estimate(log_prob, ref_log_prob, kind)
    loss = aggregate_loss(kl, mask, loss_agg_mode, denominator=loss_denominator)
    return loss, {"kl": masked_mean(kl.detach(), mask)}


class FixedKLController:
    """A constant beta."""

    def __init__(self, kl_coef: float):
        self.value = float(kl_coef)

    def update(self, current_kl: float, n_steps: int) -> None:
        """A fixed coefficient ignores the measured KL."""

    def state_dict(self) -> Dict[str, float]:
        return {"value": self.value}

    def load_state_dict(self, state: Dict[str, float]) -> None:
        self.value = float(state["value"])


class AdaptiveKLController(FixedKLController):
    """Adaptive beta steering the measured KL towards a target (Ziegler et al., 2019, Sec. 2.2):

        e      = clip(KL / target - 1, -0.2, 0.2)
        beta  <- beta * (1 + e * n_steps / horizon)

    `current_kl` is the per-sequence KL (`kl_seq` of `kl_reward_penalty`), `n_steps` the number of samples
    (episodes) the measurement covers, and `horizon` how many samples a full 20% correction takes.
    """

    def __init__(self, init_kl_coef: float, target_kl: float, horizon: int):
        if target_kl <= 0 or horizon <= 0:
            raise ValueError(f"adaptive KL needs target_kl > 0 and horizon > 0, got {target_kl} and {horizon}")
        super().__init__(init_kl_coef)
        self.target = float(target_kl)
        self.horizon = int(horizon)

    def update(self, current_kl: float, n_steps: int) -> None:
        error = min(max(float(current_kl) / self.target - 1.0, -0.2), 0.2)
        self.value *= 1.0 + error * n_steps / self.horizon


def make_kl_controller(kl_coef: float, target_kl=None, horizon: int = 10000) -> FixedKLController:
    """A fixed controller, or an adaptive one when `target_kl` is given."""
    if target_kl is None:
        return FixedKLController(kl_coef)
    return AdaptiveKLController(kl_coef, target_kl, horizon)
