"""DAPO's batch-level pieces (Yu et al., 2025): dynamic sampling and overlong reward shaping.

Dynamic sampling drops prompt groups whose sampled responses all got the same reward: their group-relative
advantage is 0 everywhere, so they cost a training step's compute and contribute no gradient. The buffer
keeps generating until enough informative groups are collected.
"""

import logging
import warnings
from typing import Any, List, Sequence

import torch

from .masked import GroupIds, group_index

logger = logging.getLogger(__name__)


def informative_group_mask(scores: torch.Tensor, group_ids: GroupIds) -> torch.Tensor:
    """Bool `[B]`: True for sequences whose group has at least two distinct scores (max_g(s) > min_g(s))."""
    index, num_groups = group_index(group_ids, scores.shape[0])
    index = index.to(scores.device)
    high = torch.full((num_groups,), -torch.inf, dtype=scores.dtype, device=scores.device)
    low = torch.full((num_groups,), torch.inf, dtype=scores.dtype, device=scores.device)
    high = high.scatter_reduce(0, index, scores, "amax")
    low = low.scatter_reduce(0, index, scores, "amin")
    return (high > low)[index]


class DynamicSamplingBuffer:
    """Collects informative prompt groups over generation rounds until `num_groups` are in hand.

        buffer = DynamicSamplingBuffer(num_groups=64, max_rounds=4)
        while buffer.needs_more():
            groups = generate_and_score(...)           # one payload and one score list per prompt group
            buffer.add([g.scores for g in groups], groups)
        batch = buffer.take()                          # exactly 64 groups (surplus from the last round dropped)

    After `max_rounds` rounds without enough groups, `needs_more()` raises (on_exhausted="error") or warns and
    stops: with on_exhausted="warn" `take()` then returns the smaller batch, with on_exhausted="fill" it fills the
    batch up with uninformative groups of those rounds (in the order they came; `filled` counts them).
    """

    def __init__(self, num_groups: int, max_rounds: int, on_exhausted: str = "error"):
        if num_groups < 1 or max_rounds < 1:
            raise ValueError(f"need num_groups >= 1 and max_rounds >= 1, got {num_groups} and {max_rounds}")
        if on_exhausted not in ("error", "warn", "fill"):
            raise ValueError(f"on_exhausted must be 'error', 'warn' or 'fill', got {on_exhausted!r}")
        self.num_groups = num_groups
        self.max_rounds = max_rounds
        self.on_exhausted = on_exhausted
        self.rounds = 0
        self.seen_groups = 0
        self.filled = 0
        """uninformative groups the last `take()` filled the batch up with"""
        self._kept: List[Any] = []
        self._uninformative: List[Any] = []

    def add(self, group_scores: Sequence[Sequence[float]], payloads: Sequence[Any]) -> int:
        """Record one generation round; keep the payloads of groups with at least two distinct scores.

        Returns how many groups of this round were kept.
        """
        if len(group_scores) != len(payloads):
            raise ValueError(f"got {len(group_scores)} score lists for {len(payloads)} payloads; pass one per group")
        self.rounds += 1
        self.seen_groups += len(payloads)
        informative = [len(set(float(s) for s in scores)) > 1 for scores in group_scores]
        kept = [p for p, keep in zip(payloads, informative) if keep]
        self._kept.extend(kept)
        if self.on_exhausted == "fill":
            self._uninformative.extend(p for p, keep in zip(payloads, informative) if not keep)
        logger.info("dynamic sampling round %d: kept %d/%d groups (%d/%d collected)", self.rounds, len(kept),
                    len(payloads), len(self._kept), self.num_groups)
        return len(kept)

    def needs_more(self) -> bool:
        """True while another generation round is needed and allowed."""
        if len(self._kept) >= self.num_groups:
            return False
        if self.rounds < self.max_rounds:
            return True
        message = (
            f"dynamic sampling exhausted: after {self.rounds} generation rounds only {len(self._kept)} of the "
            f"{self.num_groups} requested groups had non-identical rewards ({self.seen_groups} groups generated); "
            "raise max_rounds, sample more responses per prompt, or lower the batch size"
        )
        if self.on_exhausted == "error":
            raise RuntimeError(message)
        if self.on_exhausted == "fill":
            logger.warning("%s; filling the batch up with uninformative groups", message)
            return False
        warnings.warn(message, RuntimeWarning, stacklevel=2)
        return False

    def take(self) -> List[Any]:
        """The first `num_groups` kept payloads (fewer only after a warned exhaustion, filled up after a filled
        one); resets the buffer."""
        batch = self._kept[: self.num_groups]
        self.filled = min(self.num_groups - len(batch), len(self._uninformative))
        batch += self._uninformative[: self.filled]
        self._kept = []
        self._uninformative = []
        self.rounds = 0
        self.seen_groups = 0
        return batch


def overlong_reward_penalty(
    response_lengths: torch.Tensor, max_response_length: int, overlong_buffer: int, penalty_factor: float = 1.0
) -> torch.Tensor:
    """DAPO soft overlong punishment, added to the verifier score of each response:

        R(l) = 0                                         l <= L_max - L_buf
        R(l) = -penalty_factor * (l - (L_max - L_buf)) / L_buf      L_max - L_buf < l <= L_max
        R(l) = -penalty_factor                           l > L_max

    with l the response length in tokens, L_max = `max_response_length`, L_buf = `overlong_buffer`.
    """
    if not 0 < overlong_buffer <= max_response_length:
        raise ValueError(
            f"overlong_buffer must be in (0, max_response_length={max_response_length}], got {overlong_buffer}"
        )
    excess = (response_lengths.to(torch.float64) - (max_response_length - overlong_buffer)).clamp(min=0)
    return (-penalty_factor * (excess / overlong_buffer).clamp(max=1.0)).to(torch.get_default_dtype())
