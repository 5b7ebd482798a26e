"""Verifiers registered by open-instruct `dataset` name, and the unguarded call into them.

A verifier is `fn(prediction: str, ground_truth) -> float` in [0, 1], registered with
`@register_verifier("name")`; adding a dataset is that one decorated function, imported from
`megatron_rlvr/rewards/__init__.py`. `run_verifier` calls it in the current process with no time limit:
the reward pool runs it inside worker processes that it can kill, and `verify` goes through that pool.
"""

from __future__ import annotations

from typing import Any, Callable

from megatron_rlvr.registry import Registry

Verifier = Callable[[str, Any], float]

VERIFIERS = Registry("verifier dataset")
register_verifier = VERIFIERS.register


class RecordError(ValueError):
    """The record itself is wrong (unknown dataset, malformed ground truth), not the response.

    Raised to the caller rather than scored 0: a bad record silently scored 0 would look like a wrong answer and
    quietly bias training. Any other exception inside a verifier is about the response and scores 0.
    """


def known_datasets() -> list[str]:
    return VERIFIERS.names()


def get_verifier(dataset: str) -> Verifier:
    """The verifier for an open-instruct `dataset` field (case-insensitive); ValueError naming the known ones."""
    if not isinstance(dataset, str):
        raise RecordError(f"dataset must be a string naming a verifier ({', '.join(known_datasets())}), "
                          f"got {type(dataset).__name__} {dataset!r}")
    try:
        return VERIFIERS.get(dataset.strip().lower())
    except ValueError as err:
        raise RecordError(f"{err} (the record's 'dataset' field selects the verifier)") from None


def run_verifier(dataset: str, prediction: str, ground_truth: Any) -> float:
    """Score one response in this process, with no time limit (use `verify` or `RewardPool` for that).

    An empty or whitespace-only response scores 0 whatever the verifier says: "no commas" or "all lowercase"
    hold for nothing at all, and a policy rewarded for saying nothing learns to say nothing. The verifier still
    runs on it, so a malformed ground truth is reported all the same.
    """
    verifier = get_verifier(dataset)
    if not isinstance(prediction, str):
        raise RecordError(f"prediction must be a string, got {type(prediction).__name__}")
    score = float(verifier(prediction, ground_truth))
    if not 0.0 <= score <= 1.0:
        raise RuntimeError(f"verifier {dataset!r} returned {score}, outside [0, 1]: fix the verifier")
    return score if prediction.strip() else 0.0
