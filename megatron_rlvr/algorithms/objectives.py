"""The per-micro-batch objectives the trainer's update passes minimise, built from the config: each receives the
algorithm section, the rollout log-probs and the batch fields, the way verl's `PolicyLossFn` does, so a new
option is a registered loss or a new field here, not an argument threaded through the trainer.

An objective is `fn(outputs, entropy, micro_batch) -> (loss, stats)` (what `models.forward.forward_backward`
calls on the last pipeline stage): `outputs` are the model's log-probs (policy) or values (value model)
`[b, s-1]` and `micro_batch.fields` holds the batch's per-token tensors. Every loss is the micro-batch's share
of the global mini-batch loss (`denominator`, summed over micro-batches and data-parallel ranks), so the
summed gradients equal those of one aggregate over the whole mini-batch; `loss/*` stats are those shares.
"""

from __future__ import annotations

from typing import Callable

import torch

from megatron_rlvr.algorithms.correction import rollout_correction
from megatron_rlvr.algorithms.kl import kl_loss
from megatron_rlvr.algorithms.losses import clipped_value_loss
from megatron_rlvr.algorithms.masked import aggregate_loss
from megatron_rlvr.algorithms.registry import get_policy_loss

Objective = Callable[..., tuple[torch.Tensor, dict]]


def _token_mean(values: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    return (values.detach() * mask).sum() / mask.sum().clamp(min=1)


def policy_objective(algo, *, norm_constant: int, denominator: torch.Tensor, kl_coef: float) -> Objective:
    """The policy's loss (`algo`: the job's `algorithm` section): the registered `algo.policy_loss` against the
    old policy (the batch's `old_logprobs`, or the detached current ones when the update is on-policy), each
    token weighted or masked by the rollout correction (`algo.rollout_correction`: the engine sampled from
    pi_rollout, not pi_old), plus `kl_coef` x the KL to the reference when `algo.kl_mode == "loss"`, minus
    `algo.entropy_coef` x the entropy. Stats: `actor/*`, `rollout/*` (the correction's), `loss/*`, and `kl`
    (the k1 token mean of KL(policy || reference) at update time, the curve Tülu 3 reports)."""
    policy_loss = get_policy_loss(algo.policy_loss)
    kl_in_loss = kl_coef > 0 and algo.kl_mode == "loss"
    correct = algo.rollout_correction != "none"

    def objective(logprobs, entropy, mb):
        f = mb.fields
        mask = f["mask"]
        old = f["old_logprobs"] if "old_logprobs" in f else logprobs.detach()
        weight, correction = rollout_correction(old, f["rollout_logprobs"], mask, kind=algo.rollout_correction,
                                                cap=algo.rollout_is_cap, level=algo.rollout_mis_level)
        loss, stats = policy_loss(logprobs, old, f["advantages"], mask, clip_low=algo.clip_low,
                                  clip_high=algo.clip_high, clip_c=algo.clip_ratio_c,
                                  token_weight=weight if correct else None, loss_agg_mode=algo.loss_agg_mode,
                                  norm_constant=norm_constant, loss_denominator=denominator)
        stats = {f"actor/{k}": v for k, v in stats.items()}
        stats.update({f"rollout/{k}": v for k, v in correction.items()})
        stats["loss/policy"] = loss.detach()
        if kl_in_loss:
            kl, _ = kl_loss(logprobs, f["ref_logprobs"], mask, kind=algo.kl_estimator,
                            loss_agg_mode=algo.loss_agg_mode, loss_denominator=denominator)
            loss = loss + kl_coef * kl
            stats["loss/kl"] = kl.detach()
        if algo.entropy_coef:
            loss = loss - algo.entropy_coef * aggregate_loss(entropy, mask, algo.loss_agg_mode, norm_constant,
                                                             denominator)
        if "ref_logprobs" in f:
            stats["kl"] = _token_mean(logprobs - f["ref_logprobs"], mask)
        if entropy is not None:
            stats["actor/entropy"] = _token_mean(entropy, mask)
        return loss, stats

    return objective


def value_objective(algo, *, norm_constant: int, denominator: torch.Tensor) -> Objective:
    """The value model's loss: `algo.value_loss_coef` x the clipped value loss of the values against the
    batch's `returns`, clipped around the values before the update (`values`, `algo.value_clip`)."""

    def objective(values, _, mb):
        f = mb.fields
        loss, stats = clipped_value_loss(values, f["values"], f["returns"], f["mask"], clip_range=algo.value_clip,
                                         loss_agg_mode=algo.loss_agg_mode, norm_constant=norm_constant,
                                         loss_denominator=denominator)
        return algo.value_loss_coef * loss, {"critic/vf_clipfrac": stats["vf_clipfrac"], "loss/value": loss.detach()}

    return objective
