"""`megatron-rlvr dpo` end to end under torchrun (2 ranks, DP 2) on the demo task's preference pairs and a tiny model:
the training curve's rewards/accuracy and margin rise, held-out pairs are scored at step 0 and at the end, the curves
plot; a run killed with SIGKILL after its first checkpoint and started again continues the same curve."""

import os
import signal
import time

from megatron_rlvr.checkpoint import COMPLETE, step_dir
from megatron_rlvr.metrics import plot_metrics, read_metrics
from tests.dpo.common import dpo_cli, dpo_overrides, run_dpo_cli, tiny_dpo_job


def _mean(records, key):
    return sum(r[key] for r in records) / len(records)


def test_rewards_accuracy_and_margin_rise(tmp_path):
    # 16 training pairs seen 8 times over: the policy learns to prefer their chosen responses
    job = tiny_dpo_job(tmp_path, num_train=16, num_eval=8)
    out = tmp_path / "dpo"
    run_dpo_cli(dpo_overrides(job, out, **{
        "train.steps": 16, "train.optimizer.lr": 3e-3, "loss.reference": "on_the_fly",
        "data.eval_files": f"[{job['dpo_eval']}]", "checkpoint.interval": 0}) + ["--export-hf"])
    records = read_metrics(str(out))
    steps = [r for r in records if "loss" in r]
    assert [r["step"] for r in steps] == list(range(1, 17))
    first, last = steps[:4], steps[-4:]
    assert _mean(last, "rewards/accuracy") >= _mean(first, "rewards/accuracy") + 0.3, steps
    assert _mean(last, "rewards/margin") > _mean(first, "rewards/margin") + 0.05, steps
    assert _mean(last, "loss") < _mean(first, "loss")
    assert all(r["tokens_per_s"] > 0 and r["lr"] > 0 for r in steps)
    evals = [r for r in records if "eval/rewards/accuracy" in r]
    assert [r["step"] for r in evals] == [0, 16]
    assert evals[0]["eval/rewards/margin"] == 0.0 or abs(evals[0]["eval/rewards/margin"]) < 1e-5  # policy = reference
    assert os.path.isfile(out / "hf" / "model.safetensors")
    drawn = {os.path.basename(p) for p in plot_metrics(str(out))}
    assert {"loss.png", "dpo_accuracy.png", "dpo_rewards.png", "dpo_logps.png"} <= drawn


STEPS, INTERVAL = 6, 2


def test_sigkill_then_resume_continues_the_same_curve(tmp_path):
    job = tiny_dpo_job(tmp_path, num_train=32, num_eval=0)
    extra = {"train.steps": STEPS, "checkpoint.interval": INTERVAL, "checkpoint.keep": 1, "train.optimizer.lr": 3e-3,
             "train.optimizer.schedule": "cosine", "train.optimizer.warmup_steps": 2}
    reference = tmp_path / "reference"
    run_dpo_cli(dpo_overrides(job, reference, **extra))
    expected = read_metrics(str(reference))

    run = tmp_path / "run"
    proc = dpo_cli(dpo_overrides(job, run, **extra), start_new_session=True)
    first = os.path.join(step_dir(str(run / "checkpoints"), INTERVAL), COMPLETE)
    deadline = time.monotonic() + 400
    while not os.path.exists(first):
        assert proc.poll() is None, f"dpo exited before its first checkpoint:\n{proc.stdout.read()[-4000:]}"
        assert time.monotonic() < deadline, "no checkpoint within 400 s"
        time.sleep(0.05)
    os.killpg(proc.pid, signal.SIGKILL)  # torchrun and its ranks: the session this test started
    proc.wait()
    assert max(r["step"] for r in read_metrics(str(run))) < STEPS, "the run finished before it was killed"

    out = run_dpo_cli(dpo_overrides(job, run, **extra))
    got = read_metrics(str(run))
    assert [r["step"] for r in got] == list(range(1, STEPS + 1)), "each step once, in order"
    for want, have in zip(expected, got):
        assert have["lr"] == want["lr"]
        for key in ("loss", "rewards/margin", "logps/chosen", "logps/rejected"):
            assert abs(have[key] - want[key]) <= 1e-5 * max(abs(want[key]), 1e-3), (have["step"], key)
    assert expected[-1]["logps/chosen"] != expected[0]["logps/chosen"], "the weights must move for the test to bite"
    assert "Traceback" not in out
