"""Verifier score -> training reward, as the job's `reward` section (`config.RewardConfig`) says: a verified-answer
scale, a truncation penalty, a format bonus and DAPO's overlong punishment (Tülu 3's RLVR recipe: verified_reward
10, truncation_penalty -10)."""

from __future__ import annotations

import functools
import math
import re
from dataclasses import fields
from typing import Sequence

from megatron_rlvr.config import ConfigError, JobConfig, RewardConfig

# R1-style structure: reasoning in <think>, then the final answer in <answer>, nothing around them.
THINK_ANSWER_FORMAT = r"^\s*<think>.*?</think>\s*<answer>.*?</answer>\s*$"


def check_reward_config(cfg: RewardConfig) -> None:
    """ConfigError (a ValueError) naming the field when `cfg` cannot shape rewards: every number finite, a format
    reward with a pattern to earn it by, a valid pattern, a non-negative overlong buffer."""
    for spec in fields(cfg):
        value = getattr(cfg, spec.name)
        if isinstance(value, float) and not math.isfinite(value):
            raise ConfigError(f"RewardConfig.{spec.name} must be finite, got {value}")
    if cfg.format_reward != 0.0 and cfg.format_pattern is None:
        raise ConfigError(f"RewardConfig.format_reward={cfg.format_reward} needs a format_pattern to match, "
                          "e.g. megatron_rlvr.rewards.shaping.THINK_ANSWER_FORMAT")
    if cfg.overlong_buffer < 0:
        raise ConfigError(f"RewardConfig.overlong_buffer must be >= 0 tokens (0: off), got {cfg.overlong_buffer}")
    if cfg.format_pattern is not None:
        try:
            _compiled(cfg.format_pattern)
        except re.error as err:
            raise ConfigError(f"RewardConfig.format_pattern {cfg.format_pattern!r} is not a valid regular "
                              f"expression: {err}") from None


def check_config(cfg: JobConfig) -> None:
    """The job's `reward` section: `check_reward_config`, and the overlong buffer within rollout.max_tokens."""
    reward = cfg.reward
    if reward.overlong_buffer > cfg.rollout.max_tokens:
        raise ConfigError(f"reward.overlong_buffer={reward.overlong_buffer} must be at most rollout.max_tokens="
                          f"{cfg.rollout.max_tokens} (the punishment ramps up over the last overlong_buffer tokens)")
    try:
        check_reward_config(reward)
    except ConfigError as err:
        raise ConfigError(f"reward: {err}") from None


@functools.lru_cache(maxsize=16)
def _compiled(pattern: str) -> re.Pattern:
    return re.compile(pattern, re.DOTALL)


def shape_rewards(
    scores: Sequence[float], finished: Sequence[bool], responses: Sequence[str], cfg: RewardConfig,
    response_lengths: Sequence[int] | None = None, max_tokens: int | None = None,
) -> list[float]:
    """Per-response rewards:

        reward_i = truncation_penalty                                   if not finished_i (and a penalty is set)
        reward_i = verified_reward * score_i + format_reward * [response_i matches format_pattern]
                   + overlong_i                                         otherwise

    `finished[i]` is whether response i ended with an end-of-sequence token rather than at the length limit;
    overlong_i is DAPO's soft punishment of response i's `response_lengths[i]` tokens against `max_tokens` (both
    needed when `cfg.overlong_buffer` is set). A `cfg` that `check_reward_config` refuses raises ConfigError.
    """
    check_reward_config(cfg)
    if not len(scores) == len(finished) == len(responses):
        raise ValueError(f"shape_rewards needs one score, finished flag and response per sample; got "
                         f"{len(scores)} scores, {len(finished)} finished flags, {len(responses)} responses")
    pattern = _compiled(cfg.format_pattern) if cfg.format_pattern is not None else None
    overlong = [0.0] * len(scores)
    if cfg.overlong_buffer:
        if response_lengths is None or max_tokens is None:
            raise ValueError("shape_rewards: overlong_buffer is set, so pass response_lengths and max_tokens")
        import torch

        from megatron_rlvr.algorithms.dapo import overlong_reward_penalty

        overlong = overlong_reward_penalty(torch.tensor(list(response_lengths)), max_tokens, cfg.overlong_buffer,
                                           cfg.overlong_penalty).tolist()
    rewards = []
    for index, (score, done, response) in enumerate(zip(scores, finished, responses)):
        if not 0.0 <= score <= 1.0:
            raise ValueError(f"shape_rewards: score {score} of sample {index} is outside [0, 1]; scores are "
                             "verifier outputs, shaping happens here")
        if not done and cfg.truncation_penalty is not None:
            rewards.append(float(cfg.truncation_penalty))
            continue
        reward = cfg.verified_reward * score
        if pattern is not None and pattern.search(response):
            reward += cfg.format_reward
        rewards.append(float(reward + overlong[index]))
    return rewards
