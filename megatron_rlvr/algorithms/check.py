"""The algorithm section checked against the registries and the settings it depends on: names that are
registered, the dual clip and the rollout-correction cap in range, group estimators given groups, and dynamic
sampling's bounds."""

from __future__ import annotations

from megatron_rlvr.config import ConfigError, JobConfig

from .masked import LOSS_AGG_MODES
from .registry import ADVANTAGE_ESTIMATORS, POLICY_LOSSES

# the estimators that do not compare a response with the other samples of its prompt
_NO_GROUP_ESTIMATORS = ("reinforce_plus_plus", "gae")


def check_config(cfg: JobConfig) -> None:
    """ConfigError naming the key and the fix for the first problem of `cfg.algorithm`."""
    algo = cfg.algorithm
    for key, value, known in (
        ("algorithm.advantage_estimator", algo.advantage_estimator, list(ADVANTAGE_ESTIMATORS.names())),
        ("algorithm.policy_loss", algo.policy_loss, list(POLICY_LOSSES.names())),
        ("algorithm.loss_agg_mode", algo.loss_agg_mode, list(LOSS_AGG_MODES)),
    ):
        if value not in known:
            raise ConfigError(f"{key}={value!r} is not registered; known: {', '.join(known)}")
    if algo.advantage_estimator not in _NO_GROUP_ESTIMATORS and cfg.rollout.n < 2:
        raise ConfigError(f"algorithm.advantage_estimator={algo.advantage_estimator!r} compares samples of the "
                          f"same prompt: set rollout.n >= 2 (got {cfg.rollout.n})")
    if algo.clip_ratio_c is not None and algo.clip_ratio_c <= 1:
        raise ConfigError(f"algorithm.clip_ratio_c={algo.clip_ratio_c} must be > 1 (typically 3), or null for no "
                          "dual clip")
    if algo.rollout_correction != "none" and algo.rollout_is_cap <= 1:
        raise ConfigError(f"algorithm.rollout_is_cap={algo.rollout_is_cap} must be > 1: the importance ratio is "
                          "kept inside [1/C, C] (typical: 2)")
    if algo.dynamic_sampling:
        if algo.dynamic_sampling_max_rounds < 1:
            raise ConfigError(f"algorithm.dynamic_sampling_max_rounds={algo.dynamic_sampling_max_rounds} must be >= 1")
        if cfg.rollout.one_step_off_policy:
            raise ConfigError("algorithm.dynamic_sampling=true cannot be combined with rollout.one_step_off_policy="
                              "true (the next step's prompts are drawn before this step's rewards are known); turn "
                              "one of them off")
