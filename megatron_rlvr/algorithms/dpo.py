"""Preference losses of DPO and its variants, registered by name (`dpo.loss.name` in a DPO config).

Each loss is a function of per-pair sequence scores: `policy` and `reference` are `PairLogps` (summed log-probs of
the chosen and rejected responses' tokens, with their token counts); it returns per-pair losses and the implicit
rewards of the chosen and rejected responses. Below, for a pair (y_w chosen, y_l rejected) and model m,

    s_m(y)   = sum_t log m(y_t | x, y_<t)          summed log-prob of the response tokens
    a_m(y)   = s_m(y) / |y|                        its per-token average (length-normalised)
    ls(h, e) = -(1 - e) log sigmoid(h) - e log sigmoid(-h)    Bradley-Terry with label smoothing e

and beta is the inverse temperature of the implicit reward.
"""

from __future__ import annotations

import dataclasses
from typing import Callable

import torch
import torch.nn.functional as F

from megatron_rlvr.registry import Registry

DPO_LOSSES = Registry("DPO loss")
register_dpo_loss = DPO_LOSSES.register


@dataclasses.dataclass
class PairLogps:
    """Per-pair sequence log-probs `[P]` of one model, and the response token counts `[P]`."""

    chosen: torch.Tensor
    rejected: torch.Tensor
    chosen_tokens: torch.Tensor
    rejected_tokens: torch.Tensor

    def averaged(self) -> "PairLogps":
        """The per-token averages a_m(y) in place of the sums s_m(y)."""
        return PairLogps(self.chosen / self.chosen_tokens, self.rejected / self.rejected_tokens,
                         self.chosen_tokens, self.rejected_tokens)


LossResult = tuple[torch.Tensor, torch.Tensor, torch.Tensor]
"""(per-pair losses [P], chosen rewards [P], rejected rewards [P]); rewards are detached."""


def _smoothed(h: torch.Tensor, label_smoothing: float) -> torch.Tensor:
    return -(1.0 - label_smoothing) * F.logsigmoid(h) - label_smoothing * F.logsigmoid(-h)


def _reference_dpo(policy: PairLogps, reference: PairLogps, beta: float, label_smoothing: float) -> LossResult:
    chosen = beta * (policy.chosen - reference.chosen)
    rejected = beta * (policy.rejected - reference.rejected)
    return _smoothed(chosen - rejected, label_smoothing), chosen.detach(), rejected.detach()


@register_dpo_loss("sigmoid")
def sigmoid_loss(policy: PairLogps, reference: PairLogps, *, beta: float, label_smoothing: float = 0.0,
                 gamma_beta_ratio: float = 0.0) -> LossResult:
    """DPO (Rafailov et al., 2023), with conservative label smoothing (cDPO):

        r_w = beta (s_pi(y_w) - s_ref(y_w)),  r_l = beta (s_pi(y_l) - s_ref(y_l))
        L   = ls(r_w - r_l, e)
    """
    return _reference_dpo(policy, reference, beta, label_smoothing)


@register_dpo_loss("dpo_norm")
def dpo_norm_loss(policy: PairLogps, reference: PairLogps, *, beta: float, label_smoothing: float = 0.0,
                  gamma_beta_ratio: float = 0.0) -> LossResult:
    """Length-normalised DPO (Tülu 3's DPO loss, open-instruct's `dpo_norm`): DPO on per-token averages,

        r_w = beta (a_pi(y_w) - a_ref(y_w)),  r_l = beta (a_pi(y_l) - a_ref(y_l))
        L   = ls(r_w - r_l, e)
    """
    return _reference_dpo(policy.averaged(), reference.averaged(), beta, label_smoothing)


@register_dpo_loss("ipo")
def ipo_loss(policy: PairLogps, reference: PairLogps, *, beta: float, label_smoothing: float = 0.0,
             gamma_beta_ratio: float = 0.0) -> LossResult:
    """IPO (Azar et al., 2023, eq. 17; beta is their tau), on per-token averages as TRL computes it:

        h = (a_pi(y_w) - a_ref(y_w)) - (a_pi(y_l) - a_ref(y_l))
        L = (h - 1 / (2 beta))^2

    Rewards are beta (a_pi - a_ref); label smoothing does not apply (the loss is a regression to a margin).
    """
    policy, reference = policy.averaged(), reference.averaged()
    chosen = policy.chosen - reference.chosen
    rejected = policy.rejected - reference.rejected
    loss = (chosen - rejected - 1.0 / (2.0 * beta)) ** 2
    return loss, (beta * chosen).detach(), (beta * rejected).detach()


@register_dpo_loss("simpo")
def simpo_loss(policy: PairLogps, reference: PairLogps | None = None, *, beta: float, label_smoothing: float = 0.0,
               gamma_beta_ratio: float = 0.0) -> LossResult:
    """SimPO (Meng et al., 2024): reference-free, per-token averages, a target margin gamma = beta *
    gamma_beta_ratio:

        r_w = beta a_pi(y_w),  r_l = beta a_pi(y_l)
        L   = ls(r_w - r_l - gamma, e)

    `reference` is ignored (no reference model or cache is needed).
    """
    policy = policy.averaged()
    chosen, rejected = beta * policy.chosen, beta * policy.rejected
    loss = _smoothed(chosen - rejected - beta * gamma_beta_ratio, label_smoothing)
    return loss, chosen.detach(), rejected.detach()


REFERENCE_FREE = frozenset({"simpo"})
"""Losses that read no reference log-probs."""


def get_dpo_loss(name: str) -> Callable[..., LossResult]:
    """The loss registered as `name`: `fn(policy, reference, *, beta, label_smoothing, gamma_beta_ratio)`."""
    return DPO_LOSSES.get(name)
