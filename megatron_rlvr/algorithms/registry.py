"""Name -> function registries for advantage estimators and policy losses.

Configs name an algorithm by string (`advantage_estimator: grpo`, `policy_loss: ppo`); the trainer resolves the
name here once, so adding an algorithm is one decorated function and no edits elsewhere.
"""

from typing import Callable, Dict


class Registry:
    """A named table of functions, filled by a decorator and read with a clear error for unknown names."""

    def __init__(self, kind: str):
        self.kind = kind
        self._table: Dict[str, Callable] = {}

    def register(self, name: str) -> Callable[[Callable], Callable]:
        def decorator(fn: Callable) -> Callable:
            if name in self._table:
                raise ValueError(f"{self.kind} {name!r} is already registered (by {self._table[name].__qualname__})")
            self._table[name] = fn
            return fn

        return decorator

    def get(self, name: str) -> Callable:
        if name not in self._table:
            raise ValueError(f"unknown {self.kind} {name!r}; known: {', '.join(sorted(self._table))}")
        return self._table[name]

    def names(self):
        return sorted(self._table)


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
