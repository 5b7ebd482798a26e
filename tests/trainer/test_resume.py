"""Kill -9 after the first checkpoint, start again on the same output_dir: the run resumes from the latest complete
checkpoint (step counter, prompt position, optimizer, RNG) and its curve equals an uninterrupted run's exactly.
Also: a half-written checkpoint is never loaded."""

import os
import signal
import time

from megatron_rlvr.checkpoint import COMPLETE, latest_checkpoint, remove_incomplete, step_dir
from megatron_rlvr.metrics import read_metrics
from tests.trainer.common import overrides, run_to_end, tiny_job, torchrun

STEPS, INTERVAL = 6, 2


def test_latest_checkpoint_ignores_incomplete(tmp_path):
    root = str(tmp_path)
    for step, complete in ((2, True), (4, True), (6, False)):
        os.makedirs(step_dir(root, step))
        if complete:
            open(os.path.join(step_dir(root, step), COMPLETE), "w").close()
    os.makedirs(step_dir(root, 8) + ".tmp-abc123")
    open(os.path.join(step_dir(root, 8) + ".tmp-abc123", COMPLETE), "w").close()  # marker, but never renamed
    assert latest_checkpoint(root) == step_dir(root, 4)
    removed = remove_incomplete(root)
    assert sorted(os.path.basename(p) for p in removed) == ["step_000006", "step_000008.tmp-abc123"]
    assert sorted(os.listdir(root)) == ["step_000002", "step_000004"]
    assert latest_checkpoint(str(tmp_path / "missing")) is None


def test_sigkill_then_resume_continues_the_same_curve(tmp_path):
    job = tiny_job(tmp_path)
    # a format reward (any digit) gives the untrained model's samples unequal rewards, so every step updates
    extra = {"train.steps": STEPS, "checkpoint.interval": INTERVAL, "checkpoint.keep": 1, "train.optimizer.lr": 3e-3,
             "reward.format_pattern": "'[0-9]'", "reward.format_reward": 0.5}

    reference = tmp_path / "reference"
    run_to_end(overrides(job, reference, **extra))
    expected = read_metrics(str(reference))
    assert all(r["actor/grad_norm"] > 0 for r in expected), "updates must move the weights for the test to bite"

    run = tmp_path / "run"
    proc = torchrun(overrides(job, run, **extra), start_new_session=True)
    first = os.path.join(step_dir(str(run / "checkpoints"), INTERVAL), COMPLETE)
    deadline = time.monotonic() + 300
    while not os.path.exists(first):
        assert proc.poll() is None, f"training exited before its first checkpoint:\n{proc.stdout.read()[-4000:]}"
        assert time.monotonic() < deadline, "no checkpoint within 300 s"
        time.sleep(0.05)
    os.killpg(proc.pid, signal.SIGKILL)  # torchrun and its ranks: the session this test started
    proc.wait()
    killed_at = [r["step"] for r in read_metrics(str(run))]
    assert max(killed_at) < STEPS, "the run finished before it was killed: the test would prove nothing"

    out = run_to_end(overrides(job, run, **extra))
    got = read_metrics(str(run))
    assert [r["step"] for r in got] == list(range(1, STEPS + 1)), "each step once, in order"
    for want, have in zip(expected, got):
        # same prompts, same samples, same updates: rewards equal exactly, losses to float tolerance
        assert have["reward_mean"] == want["reward_mean"], (have["step"], have["reward_mean"], want["reward_mean"])
        assert have["response_length/mean"] == want["response_length/mean"]
        assert abs(have["actor/entropy"] - want["actor/entropy"]) <= 1e-5 * abs(want["actor/entropy"])
    assert os.path.isfile(os.path.join(step_dir(str(run / "checkpoints"), STEPS), COMPLETE))
    assert not [n for n in os.listdir(run / "checkpoints") if ".tmp-" in n]
    assert "Traceback" not in out
