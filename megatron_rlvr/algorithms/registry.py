"""Name -> function registries for advantage estimators and policy losses.

Configs name an algorithm by string (`advantage_estimator: grpo`, `policy_loss: ppo`); the trainer resolves the
name here once, so adding an algorithm is one decorated function and no edits elsewhere.
"""

from typing import Callable

from megatron_rlvr.registry import Registry

ADVANTAGE_ESTIMATORS = Registry("advantage estimator")
POLICY_LOSSES = Registry("policy loss")

register_advantage_estimator = ADVANTAGE_ESTIMATORS.register
register_policy_loss = POLICY_LOSSES.register


def get_advantage_estimator(name: str) -> Callable:
    """The estimator registered as `name`: `fn(token_level_rewards, response_mask, **inputs) -> (adv, returns)`."""
    return ADVANTAGE_ESTIMATORS.get(name)


def get_policy_loss(name: str) -> Callable:
    """The policy loss registered as `name`: `fn(log_prob, old_log_prob, advantages, response_mask, **cfg)`."""
    return POLICY_LOSSES.get(name)
