"""Verifier score -> training reward, as configured (Tülu 3's RLVR recipe by default)."""

from __future__ import annotations

import functools
import math
import re
from dataclasses import dataclass, fields
from typing import Sequence

# R1-style structure: reasoning in <think>, then the final answer in <answer>, nothing around them.
THINK_ANSWER_FORMAT = r"^\s*<think>.*?</think>\s*<answer>.*?</answer>\s*$"


@dataclass(frozen=True)
class RewardConfig:
    """How verifier scores in [0, 1] become rewards."""

    verified_reward: float = 10.0
    """Reward for a response the verifier accepts; a score s in [0, 1] earns s * verified_reward (Tülu 3: 10)."""

    truncation_penalty: float | None = -10.0
    """Reward for a response cut off before its end-of-sequence token, replacing all other terms (Tülu 3: -10).
    None leaves truncated responses to be scored like finished ones."""

    format_pattern: str | None = None
    """Regular expression (`re.search`, `.` matching newlines) a response must match to earn `format_reward`,
    e.g. `THINK_ANSWER_FORMAT`; None: no format term."""

    format_reward: float = 0.0
    """Reward added when the response matches `format_pattern`."""

    overlong_buffer: int = 0
    """DAPO's soft overlong punishment: a finished response longer than max_tokens - overlong_buffer tokens loses
    up to `overlong_penalty`, linearly over the buffer (`algorithms.overlong_reward_penalty`); 0: off."""

    overlong_penalty: float = 1.0
    """The penalty at the length limit."""

    def __post_init__(self):
        for spec in fields(self):
            value = getattr(self, spec.name)
            if isinstance(value, float) and not math.isfinite(value):
                raise ValueError(f"RewardConfig.{spec.name} must be finite, got {value}")
        if self.format_reward != 0.0 and self.format_pattern is None:
            raise ValueError(f"RewardConfig.format_reward={self.format_reward} needs a format_pattern to match, "
                             "e.g. megatron_rlvr.rewards.shaping.THINK_ANSWER_FORMAT")
        if self.overlong_buffer < 0:
            raise ValueError(f"RewardConfig.overlong_buffer must be >= 0 tokens (0: off), got {self.overlong_buffer}")
        if self.format_pattern is not None:
            try:
                _compiled(self.format_pattern)
            except re.error as err:
                raise ValueError(f"RewardConfig.format_pattern {self.format_pattern!r} is not a valid regular "
                                 f"expression: {err}") from None


    @classmethod
    def from_settings(cls, settings) -> "RewardConfig":
        """The RewardConfig of an object with the same fields (the job config's `reward` section)."""
        return cls(**{spec.name: getattr(settings, spec.name) for spec in fields(cls)})


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
    needed when `cfg.overlong_buffer` is set).
    """
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
