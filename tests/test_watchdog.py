"""Hang safety.

Unit: the watchdog reports an overdue phase with its step and where every other rank is (from the store), waits
3x a phase's longest time before calling it overdue, and ends the process past the timeout.

End to end, `megatron-rlvr train` under torchrun (2 ranks, the megatron rollout backend, a tiny model):
- rank 1 stopped with SIGSTOP: rank 0's watchdog names the phase, the step and rank 1 in the console and in
  <output_dir>/log.txt within parallel.watchdog_s (plus a poll), and the job exits non-zero after
  parallel.timeout_s with that report, not a gloo stack;
- rank 0 killed with SIGKILL after its first checkpoint (megatron's writer and the reward pool have run): every
  process the job had started is gone once torchrun exits (no orphan adopted by init).
"""

import os
import signal
import subprocess
import sys
import time

import psutil
import pytest

from megatron_rlvr.checkpoint import COMPLETE, step_dir
from megatron_rlvr.testing.distributed import free_port
from megatron_rlvr.watchdog import EXIT_CODE, Watchdog
from tests.trainer.common import job_env, overrides, tiny_job


class DictStore:
    """The two store calls the watchdog makes, over a dict (what the job's TCP store holds)."""

    def __init__(self):
        self.data = {}

    def set(self, key, value):
        self.data[key] = value.encode() if isinstance(value, str) else value

    def get(self, key):
        return self.data[key]

    def check(self, keys):
        return all(k in self.data for k in keys)


def test_report_names_phase_step_and_the_ranks_elsewhere():
    store, exits = DictStore(), []
    dogs = [Watchdog(r, 3, report_after_s=5, timeout_s=60, store=store, exit_fn=exits.append) for r in range(3)]
    dogs[0].enter("sync", 7)
    dogs[1].enter("sync", 7)
    dogs[2].enter("train", 7)
    t0 = dogs[0]._position.since
    for dog in dogs:
        assert dog.check(t0 + 1) is None  # publishes; nothing overdue yet
    for dog in dogs[1:]:
        dog.check(t0 + 6)  # alive: their heartbeats go on
    report = dogs[0].check(t0 + 6)
    assert report is not None and "phase 'sync' of step 7 has run 6 s" in report
    assert "rank 2 (in 'train' of step 7" in report and "rank 1 (" not in report
    assert dogs[0].check(t0 + 7) is None, "reported again only after another threshold"
    dogs[2].check(t0 + 20)  # rank 1 falls silent in the same phase (SIGSTOP): no longer counted as there
    report = dogs[0].check(t0 + 20)
    assert "rank 1 (silent for 14 s" in report and "last seen in 'sync' of step 7" in report, report
    assert not exits
    dogs[0].check(t0 + 60 + dogs[0].grace_s)
    assert exits == [EXIT_CODE]


def test_threshold_is_three_times_the_longest_so_far():
    dog = Watchdog(0, 1, report_after_s=2, timeout_s=600, exit_fn=lambda code: None)
    dog.enter("train", 1)
    dog._position.since -= 40  # this phase took 40 s once
    dog.enter("sync", 1)
    dog.enter("train", 2)
    start = dog._position.since
    assert dog.threshold("train") >= 120
    assert dog.check(start + 100) is None
    assert "phase 'train' of step 2" in dog.check(start + 121)


def test_bad_thresholds_are_refused():
    with pytest.raises(ValueError, match="below timeout_s"):
        Watchdog(0, 1, report_after_s=10, timeout_s=10)


# ---------------------------------------------------------------------------------------------- end to end

TIMEOUT_S, WATCHDOG_S = 40, 8


def _launch(tmp_path, name, **extra):
    job = tiny_job(tmp_path, num_train=64, num_eval=8)
    out = tmp_path / name
    args = overrides(job, out, **{"train.steps": 200, "checkpoint.interval": 1, "parallel.timeout_s": TIMEOUT_S,
                                  "parallel.watchdog_s": WATCHDOG_S, **extra})
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node=2", "--master-addr=127.0.0.1",
           f"--master-port={free_port()}", "-m", "megatron_rlvr.cli", "train", *args]
    proc = subprocess.Popen(cmd, env=job_env(), stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            start_new_session=True, cwd=os.getcwd())
    return proc, out


def _wait_for(path, proc, seconds=600):
    deadline = time.monotonic() + seconds
    while not os.path.exists(path):
        assert proc.poll() is None, f"the job ended early:\n{proc.stdout.read()[-4000:]}"
        assert time.monotonic() < deadline, f"{path} did not appear within {seconds} s"
        time.sleep(0.2)


def _rank_process(proc, rank):
    for child in psutil.Process(proc.pid).children(recursive=True):
        try:
            if child.environ().get("RANK") == str(rank) and child.parent().pid == proc.pid:
                return child
        except psutil.Error:
            continue
    raise AssertionError(f"no process of rank {rank} under torchrun {proc.pid}")


def _finish(proc, seconds):
    try:
        out, _ = proc.communicate(timeout=seconds)
    except subprocess.TimeoutExpired as err:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
        try:  # a worker that outlived the launcher can hold the pipe open: never wait on it unbounded
            out, _ = proc.communicate(timeout=30)
        except subprocess.TimeoutExpired:
            out = (err.output or b"").decode(errors="replace") if isinstance(err.output, bytes) else (err.output or "")
        raise AssertionError(f"the job did not end within {seconds} s (launcher status {proc.poll()}):\n"
                             f"{out[-4000:]}")
    return out


def test_sigstopped_rank_is_reported_and_the_job_ends(tmp_path):
    proc, out_dir = _launch(tmp_path, "stop")
    try:
        _wait_for(os.path.join(step_dir(str(out_dir / "checkpoints"), 2), COMPLETE), proc)
        stopped = _rank_process(proc, 1)
        stopped.send_signal(signal.SIGSTOP)
        stopped_at = time.monotonic()
        log = out_dir / "log.txt"
        deadline = stopped_at + 10 * WATCHDOG_S
        while "not there: rank 1" not in log.read_text():
            assert time.monotonic() < deadline, f"no watchdog report naming rank 1:\n{log.read_text()[-3000:]}"
            time.sleep(0.5)
        reported_after = time.monotonic() - stopped_at
        out = _finish(proc, TIMEOUT_S * 4)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
    report = next(line for line in log.read_text().splitlines() if "not there: rank 1" in line)
    assert "rank 0: phase '" in report and "of step " in report, report
    assert reported_after < TIMEOUT_S, reported_after
    assert proc.returncode != 0
    assert "parallel.timeout_s" in out and "not there: rank 1" in out, out[-4000:]
    assert "ProcessGroupGloo" not in out and "[rank0]: Traceback" not in out, out[-4000:]


def test_no_orphans_after_a_rank_is_killed(tmp_path):
    proc, out_dir = _launch(tmp_path, "kill")
    try:
        _wait_for(os.path.join(step_dir(str(out_dir / "checkpoints"), 1), COMPLETE), proc)
        time.sleep(1)  # the next step's rollout has started the reward pool's work again
        started = [p for p in psutil.Process(proc.pid).children(recursive=True)]
        assert len(started) >= 3, "the ranks and at least one reward worker"
        _rank_process(proc, 0).kill()
        _finish(proc, 180)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
    deadline = time.monotonic() + 15
    alive = started
    while alive and time.monotonic() < deadline:
        alive = [p for p in started if p.is_running() and p.status() != psutil.STATUS_ZOMBIE]
        time.sleep(0.5)
    assert not alive, [(p.pid, p.cmdline()[:4]) for p in alive]
