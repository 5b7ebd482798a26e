"""The rollout interface the trainer programs against; backends (in-process vLLM, megatron-core inference)
implement `RolloutEngine`. Weights reach an engine through its sync (`sync.weight_sync`), not through the engine."""

from __future__ import annotations

import dataclasses
from typing import Protocol


@dataclasses.dataclass
class SamplingConfig:
    """How responses are sampled."""

    n: int = 4
    """samples per prompt (the GRPO group size)"""
    temperature: float = 1.0
    top_p: float = 1.0
    max_tokens: int = 64
    """response length limit; a response that hits it without EOS is `finished=False`"""
    stop_token_ids: tuple[int, ...] = ()
    """token ids that end a response (EOS is always one)"""
    seed: int = 0


@dataclasses.dataclass
class Sample:
    """One sampled response."""

    prompt_index: int
    """index of its prompt in the `generate` call"""
    prompt_ids: list[int]
    response_ids: list[int]
    """generated tokens, the stop/EOS token included when one was produced"""
    logprobs: list[float]
    """the sampler's log-prob of each response token (under the sampling temperature)"""
    finished: bool
    """True when the response ended with EOS/stop, False when cut at max_tokens"""


class RolloutEngine(Protocol):
    shares_trainer_weights: bool
    """True when the engine samples with the trainer's own model (nothing to sync), False when it holds its own
    copy of the weights; `sync.weight_sync.build_weight_sync` picks the sync from it"""

    def generate(self, prompt_ids: list[list[int]], sampling: SamplingConfig) -> list[Sample]:
        """`sampling.n` samples per prompt, grouped by prompt in prompt order (len = n * len(prompt_ids)).

        Collective over the ranks that take part in rollouts; every such rank gets the full list.
        """

    def sleep(self) -> None:
        """Release generation memory (KV cache, and in the colocated layout the weights) while training runs."""

    def wake(self) -> None:
        """Take generation memory back before the next `generate`."""

    def close(self) -> None:
        """Release the engine (and its process groups) before the torch.distributed world is destroyed."""
