"""GRPO learns: on 2 ranks (DP=2) the tiny model, rewarded 1 for a response containing a digit (a format reward,
so an untrained model already earns it about half the time), raises its reward mean within a few steps."""

from megatron_rlvr.metrics import read_metrics
from tests.trainer.common import overrides, run_to_end, tiny_job


def test_grpo_reward_mean_rises(tmp_path):
    job = tiny_job(tmp_path)
    extra = {"train.steps": 12, "rollout.n": 8, "train.optimizer.lr": 1e-2, "checkpoint.interval": 0,
             "reward.verified_reward": 0.0, "reward.format_pattern": "'[0-9]'", "reward.format_reward": 1.0}
    run_to_end(overrides(job, tmp_path / "out", **extra))
    rewards = [r["reward_mean"] for r in read_metrics(str(tmp_path / "out"))]
    assert len(rewards) == 12
    first, last = sum(rewards[:3]) / 3, sum(rewards[-3:]) / 3
    assert last > first + 0.2, f"reward mean did not rise: {[round(r, 3) for r in rewards]}"
