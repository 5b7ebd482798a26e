"""Rollout correction end to end (`algorithm.rollout_correction`), through `train` on the tiny model.

The test sampler scores its own tokens with the trainer's model, so on-policy the engine's log-probs equal the
trainer's (`rollout/logprob_abs_diff` ~ 0) and no token is masked. A sampler that keeps the initial weights for the
whole run (a weight sync that never lands) makes the gap grow with every update: the metrics show it, and the
corrections act on it (masked IS drops the tokens outside [1/C, C], truncated IS weights them by min(ratio, C)).
"""

from megatron_rlvr.metrics import read_metrics
from tests.trainer.common import overrides, run_to_end, tiny_job

STEPS = 4
# a format reward gives the untrained model's samples unequal rewards, and a large lr makes each update count
EXTRA = {"train.steps": STEPS, "checkpoint.interval": 0, "checkpoint.export_hf": "false", "train.optimizer.lr": 1e-2,
         "reward.format_pattern": "'[0-9]'", "reward.format_reward": 0.5, "algorithm.rollout_is_cap": 1.02}


def test_correction_metrics_on_policy_and_with_stale_weights(tmp_path):
    job = tiny_job(tmp_path)
    fresh = tmp_path / "fresh"
    run_to_end(overrides(job, fresh, **EXTRA, **{"algorithm.rollout_correction": "mis"}))
    for record in read_metrics(str(fresh)):
        if "rollout/logprob_abs_diff" in record:
            assert record["rollout/logprob_abs_diff"] < 1e-4, record  # fp32, same weights: rounding only
            assert record["rollout/masked_fraction"] == 0.0, record

    stale = tmp_path / "stale"
    run_to_end(["--stale-sampler", *overrides(job, stale, **EXTRA, **{"algorithm.rollout_correction": "mis"})])
    records = [r for r in read_metrics(str(stale)) if "rollout/logprob_abs_diff" in r]
    assert len(records) == STEPS
    assert records[0]["rollout/logprob_abs_diff"] < 1e-4  # step 1 samples with the weights the trainer holds
    gaps = [r["rollout/logprob_abs_diff"] for r in records[1:]]
    assert min(gaps) > 1e-2, gaps  # then the sampler lags by 1, 2, 3 updates
    assert all(r["rollout/masked_fraction"] > 0 for r in records[1:]), records
    # masked tokens carry no weight: the reported mean weight is the kept share
    for r in records:
        assert abs(r["rollout/is_weight_mean"] - (1 - r["rollout/masked_fraction"])) < 1e-6, r

    tis = tmp_path / "tis"
    run_to_end(["--stale-sampler", *overrides(job, tis, **EXTRA, **{"algorithm.rollout_correction": "tis"})])
    records = [r for r in read_metrics(str(tis)) if "rollout/logprob_abs_diff" in r]
    assert all(r["rollout/masked_fraction"] == 0 for r in records)
    # weights min(ratio, C) with ratios on both sides of 1: the mean leaves 1 but never exceeds C
    assert all(r["rollout/is_weight_mean"] <= 1.02 + 1e-6 for r in records), records
    assert any(abs(r["rollout/is_weight_mean"] - 1) > 1e-3 for r in records[1:]), records
