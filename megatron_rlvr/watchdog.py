"""A watchdog thread on every rank: a phase that runs far past its usual time is reported with the step and
where every other rank is; a phase past `parallel.timeout_s` ends the job with that report.

The main thread only marks phase boundaries (`Watchdog.enter("sync", step)`: a field update, no I/O). The
thread publishes this rank's position to the job's TCP store (the one torchrun or `init_process_group` runs, over
a connection of its own) and reads the others' from it, so a rank stopped or wedged inside a collective is seen
by the ones waiting for it. A report (logger `megatron_rlvr.watchdog`, so the console and `<output_dir>/log.txt`):

    rank 0: phase 'sync' of step 3 has run 12 s (reported after 5 s; longest so far 0.4 s); not there: rank 1
    (silent for 11 s: stopped, or stuck where no Python thread runs; last seen in 'sync' of step 3 for 12 s)

A collective that times out raises in the main thread; `timed_out_report()` gives the command line the report
to print instead of the backend's stack. A phase still running `timeout_s` plus a grace after it began (a wait
outside any collective) ends the process with `EXIT_CODE` from the thread.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
import threading
import time
from datetime import timedelta
from typing import Callable

logger = logging.getLogger(__name__)

EXIT_CODE = 124
"""exit status of a rank the watchdog ends (the `timeout` command's)"""
SLOWER_THAN_USUAL = 3.0
"""a phase is reported once it has run this many times its longest time so far (or `report_after_s`)"""
_KEY_PREFIX = "megatron_rlvr/watchdog/"

_active: "Watchdog | None" = None


@dataclasses.dataclass
class _Position:
    phase: str
    step: int
    since: float  # wall-clock time.time() the phase began


class Watchdog:
    """Collective-free: each rank runs its own. `store`: a `torch.distributed.Store` (default: a new client of
    the job's store at MASTER_ADDR:MASTER_PORT), None to see this rank alone."""

    def __init__(self, rank: int, world_size: int, *, report_after_s: float, timeout_s: float,
                 store=None, exit_fn: Callable[[int], None] = os._exit, poll_s: float | None = None):
        if not 0 < report_after_s < timeout_s:
            raise ValueError(f"watchdog: report_after_s={report_after_s} must be > 0 and below timeout_s={timeout_s}")
        self.rank = rank
        self.world_size = world_size
        self.report_after_s = report_after_s
        self.timeout_s = timeout_s
        self.grace_s = min(30.0, 0.25 * timeout_s)
        self.store = store
        self.exit_fn = exit_fn
        self.poll_s = poll_s if poll_s is not None else min(1.0, report_after_s / 4)
        self.longest: dict[str, float] = {}
        self._position: _Position | None = None
        self._reported_at = 0.0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="megatron-rlvr-watchdog", daemon=True)

    # -- main thread

    def enter(self, phase: str, step: int) -> None:
        """This rank begins `phase` of `step` (the previous phase ends here)."""
        now = time.time()
        self._close_phase(now)
        self._position = _Position(phase, step, now)
        self._reported_at = 0.0

    def idle(self) -> None:
        """No phase runs (between jobs, at the end)."""
        self._close_phase(time.time())
        self._position = None

    def start(self) -> "Watchdog":
        global _active
        _active = self
        self._thread.start()
        return self

    def stop(self) -> None:
        global _active
        self._stop.set()
        if self._thread.is_alive():
            self._thread.join(timeout=5)
        if _active is self:
            _active = None

    def _close_phase(self, now: float) -> None:
        if self._position is not None:
            name = self._position.phase
            self.longest[name] = max(self.longest.get(name, 0.0), now - self._position.since)

    # -- the thread

    def threshold(self, phase: str) -> float:
        return max(self.report_after_s, SLOWER_THAN_USUAL * self.longest.get(phase, 0.0))

    def _run(self) -> None:
        while not self._stop.wait(self.poll_s):
            try:
                self.check(time.time())
            except Exception as err:  # noqa: BLE001 - the watchdog must never take a healthy job down
                logger.debug("watchdog check failed: %s", err)

    def check(self, now: float) -> str | None:
        """Publish this rank's position; report (and return) when its phase is overdue; end the job past the
        timeout plus a grace."""
        position = self._position
        self._publish(position, now)
        if position is None:
            return None
        running = now - position.since
        threshold = self.threshold(position.phase)
        if running >= self.timeout_s + self.grace_s:
            report = self.report(now)
            logger.error("%s; parallel.timeout_s=%g passed: ending the job", report, self.timeout_s)
            _flush_logs()
            self.exit_fn(EXIT_CODE)
            return report
        if running >= threshold and now - self._reported_at >= threshold:
            self._reported_at = now
            report = self.report(now)
            logger.warning("%s", report)
            return report
        return None

    def report(self, now: float | None = None) -> str:
        """Where this rank is and which ranks are elsewhere."""
        now = time.time() if now is None else now
        position = self._position
        if position is None:
            return f"rank {self.rank}: no phase running"
        longest = self.longest.get(position.phase)
        usual = f"; longest so far {longest:.3g} s" if longest is not None else "; first time"
        text = (f"rank {self.rank}: phase {position.phase!r} of step {position.step} has run "
                f"{now - position.since:.0f} s (reported after {self.threshold(position.phase):.3g} s{usual})")
        others = self._others(now, position)
        if others is not None:
            text += "; not there: " + (", ".join(others) if others else "none (every rank is in this phase)")
        return text

    def _others(self, now: float, mine: _Position) -> list[str] | None:
        if self.store is None:
            return None
        away = []
        for rank in range(self.world_size):
            if rank == self.rank:
                continue
            try:
                raw = self.store.get(_KEY_PREFIX + str(rank)) if self.store.check([_KEY_PREFIX + str(rank)]) else b""
            except Exception:  # noqa: BLE001 - the store itself may be what hangs
                return ["(the job's store did not answer; ranks unknown)"]
            if not raw:
                away.append(f"rank {rank} (no report yet)")
                continue
            theirs = json.loads(raw)
            silent = now - theirs["beat"]
            where = "idle" if theirs["phase"] is None else (
                f"in {theirs['phase']!r} of step {theirs['step']} for {now - theirs['since']:.0f} s")
            if silent > max(3 * self.poll_s, 5.0):
                away.append(f"rank {rank} (silent for {silent:.0f} s: stopped, or stuck where no Python thread "
                            f"runs; last seen {where})")
            elif theirs["phase"] is None or (theirs["phase"], theirs["step"]) != (mine.phase, mine.step):
                away.append(f"rank {rank} ({where})")
        return away

    def _publish(self, position: _Position | None, now: float) -> None:
        """This rank's position and a heartbeat, every poll: a rank whose beat stops (stopped, or stuck where
        Python threads cannot run) is told apart from one waiting in the same phase."""
        if self.store is None:
            return
        value = {"phase": None, "step": None, "since": None} if position is None else dataclasses.asdict(position)
        value["beat"] = now
        self.store.set(_KEY_PREFIX + str(self.rank), json.dumps(value))


def job_store(timeout_s: float = 10.0):
    """A client of the job's TCP store (torchrun's, or the one `init_process_group` started on rank 0), or None
    outside a torch.distributed job."""
    import torch.distributed as dist

    host, port = os.environ.get("MASTER_ADDR"), os.environ.get("MASTER_PORT")
    if not host or not port:
        return None
    return dist.TCPStore(host, int(port), is_master=False, timeout=timedelta(seconds=timeout_s),
                         wait_for_workers=False)


def start_watchdog(parallel, rank: int, world_size: int) -> Watchdog:
    """This rank's watchdog with `parallel.watchdog_s` and `parallel.timeout_s` (config.ParallelConfig)."""
    return Watchdog(rank, world_size, report_after_s=parallel.watchdog_s, timeout_s=parallel.timeout_s,
                    store=job_store()).start()


def timed_out_report() -> str | None:
    """The running watchdog's report when its phase is past the report threshold (a collective that raised is
    then a timeout or a peer gone, and the report says where everyone is); None otherwise."""
    watchdog = _active
    if watchdog is None or watchdog._position is None:
        return None
    position = watchdog._position
    if time.time() - position.since < watchdog.threshold(position.phase):
        return None
    return watchdog.report()


def _flush_logs() -> None:
    for handler in logging.getLogger("megatron_rlvr").handlers:
        try:
            handler.flush()
        except (OSError, ValueError):  # a closed stream must not keep a hung job from ending
            pass
