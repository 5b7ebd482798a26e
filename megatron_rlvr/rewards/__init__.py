"""Verifiable rewards: verifiers by open-instruct dataset name, the process pool that bounds their time, and
reward shaping.

- `verify(dataset, prediction, ground_truth) -> float` in [0, 1]: one response, through a shared pool.
- `RewardPool(workers, timeout).score(records)`: batches of `(dataset, prediction, ground_truth)`.
- `RewardConfig` (the job's `reward` section, defined in `config`) + `shape_rewards`: verified score -> training
  reward (scale, truncation penalty, format bonus, overlong punishment); `check_config(cfg)` checks the section.
- `register_verifier("name")`: add a dataset; `run_verifier`: call one in-process with no time limit.
"""

from megatron_rlvr.rewards import gsm8k, ifeval, math_answers  # noqa: F401 - registers the verifiers
from megatron_rlvr.rewards.pool import DEFAULT_TIMEOUT_S, RewardPool, configure_default_pool, default_pool, verify
from megatron_rlvr.rewards.registry import RecordError, known_datasets, register_verifier, run_verifier
from megatron_rlvr.rewards.shaping import RewardConfig, check_config, check_reward_config, shape_rewards

__all__ = [
    "DEFAULT_TIMEOUT_S",
    "RecordError",
    "RewardConfig",
    "RewardPool",
    "check_config",
    "check_reward_config",
    "configure_default_pool",
    "default_pool",
    "known_datasets",
    "register_verifier",
    "run_verifier",
    "shape_rewards",
    "verify",
]
