"""RLVR algorithms: advantage estimators and policy losses registered by name, KL regularisation, DAPO pieces.

    from megatron_rlvr.algorithms import compute_advantages, get_policy_loss
    adv, ret = compute_advantages("grpo", token_rewards, mask, group_ids=uids)
    loss, stats = get_policy_loss("ppo")(logp, old_logp, adv, mask, clip_high=0.28)

`check_config(cfg)` checks a job's `algorithm` section against the registries.
"""

from .advantages import compute_advantages
from .check import check_config
from .dapo import DynamicSamplingBuffer, informative_group_mask, overlong_reward_penalty
from .kl import AdaptiveKLController, FixedKLController, kl_loss, kl_reward_penalty, make_kl_controller
from .correction import MIS_LEVELS, ROLLOUT_CORRECTIONS, rollout_correction, truncated_is_weight
from .losses import clipped_value_loss, ppo_policy_loss
from .masked import LOSS_AGG_MODES, aggregate_loss, loss_denominator, masked_mean, masked_sum, masked_whiten
from .registry import ADVANTAGE_ESTIMATORS, POLICY_LOSSES, get_advantage_estimator, get_policy_loss

__all__ = [
    "ADVANTAGE_ESTIMATORS",
    "POLICY_LOSSES",
    "LOSS_AGG_MODES",
    "MIS_LEVELS",
    "ROLLOUT_CORRECTIONS",
    "AdaptiveKLController",
    "DynamicSamplingBuffer",
    "FixedKLController",
    "aggregate_loss",
    "check_config",
    "clipped_value_loss",
    "compute_advantages",
    "get_advantage_estimator",
    "get_policy_loss",
    "informative_group_mask",
    "kl_loss",
    "kl_reward_penalty",
    "loss_denominator",
    "make_kl_controller",
    "masked_mean",
    "masked_sum",
    "masked_whiten",
    "overlong_reward_penalty",
    "ppo_policy_loss",
    "rollout_correction",
    "truncated_is_weight",
]
