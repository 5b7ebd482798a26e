"""A verifier that misbehaves on command, registered for the reward pool tests (imported by the workers through
`RewardPool(verifier_modules=[__name__])`)."""

import os
import time

from megatron_rlvr.rewards import RecordError, register_verifier


@register_verifier("test_misbehaving")
def misbehaving(prediction: str, ground_truth: str) -> float:
    """Exact string match, except: "crash" kills the worker, "hang" never returns, "raise" raises, "bad record"
    raises RecordError."""
    if prediction == "crash":
        os._exit(3)
    if prediction == "hang":
        time.sleep(3600)
    if prediction == "raise":
        raise RuntimeError("verifier exploded")
    if prediction == "bad record":
        raise RecordError("this record's ground truth is unusable")
    return float(prediction == ground_truth)
