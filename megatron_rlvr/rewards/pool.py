"""The reward pool: verifiers in worker processes, each response under a time limit, and `verify` on top.

Why processes: a verifier can run for ever on a hostile answer (`\\boxed{9^{9^{9^{9}}}}` makes sympy build a
number with ~10^8 digits; deep nesting or a megabyte of LaTeX can do the same to a parser). Python cannot stop a
thread, and SIGALRM (math-verify's own timeout) works only on a main thread; a process can be killed. So
`RewardPool` keeps N long-lived workers, sends each a chunk of records, and gets one result back per record. Each result restarts that worker's clock; a worker silent for longer than
`timeout` seconds is killed, the record it was on scores 0 (logged as a warning), a fresh worker replaces it and
the rest of its chunk is sent out again, so one pathological response costs one timeout and nothing else.

Errors: a malformed record (`RecordError`: unknown dataset, bad ground truth) or a missing verifier dependency
is raised to the caller once the batch in flight has drained; any other exception inside a verifier is a
property of the response and scores 0 with a warning, like a timeout.

`verify(dataset, prediction, ground_truth)` goes through one shared pool, created on first use in each process
(`configure_default_pool` sets its size and time limit), so it never hangs either; its cost is one round trip
to a worker, so score batches with `RewardPool.score` rather than calling `verify` in a loop.

Workers are fresh interpreters running `python -m megatron_rlvr.rewards.worker` (not multiprocessing's spawn or
forkserver children, which re-import the caller's `__main__`): a plain script or a notebook cell calls `verify`
without an `if __name__ == "__main__"` guard, and the trainer's threads and device state are never copied. A
worker that dies while starting is reported with the end of its own stderr (the real cause, e.g. an import
error); each worker exits by itself when the process that started it is gone.
"""

from __future__ import annotations

import collections
import importlib
import logging
import math
import multiprocessing.connection
import os
import socket
import subprocess
import sys
import tempfile
import threading
import time
import weakref
from dataclasses import dataclass, field
from typing import Any, Iterable, Sequence

from megatron_rlvr.rewards.registry import RecordError, get_verifier

logger = logging.getLogger(__name__)

DEFAULT_TIMEOUT_S = 10.0
_STARTUP_TIMEOUT_S = 300.0  # importing sympy/math-verify on a loaded machine; generous, it happens once
_SHUTDOWN_GRACE_S = 2.0

Record = tuple[str, str, Any]  # (dataset, prediction, ground_truth)

# Warm-up records run once in each worker before it reports ready, so that imports and lazy initialisation
# (math-verify's regexes, langdetect's language profiles) are not charged to the first real record's time limit.
WARM_UP_RECORDS: tuple[Record, ...] = (
    ("gsm8k", "The answer is 4.", "#### 4"),
    ("math", "So $\\boxed{\\frac{1}{2}}$.", "0.5"),
    ("ifeval", "This is an English sentence.", '{"func_name": "validate_response_language", "language": "en"}'),
)

_OK, _RAISE, _FAILED = "ok", "raise", "failed"
_STDERR_TAIL = 2000  # characters of a dead worker's stderr quoted in the error


class _WorkerProcess:
    """One verifier worker: `python -m megatron_rlvr.rewards.worker FD MODULE...` talking over a socket pair
    (`multiprocessing.connection.Connection` on our end), its stderr kept in a temporary file."""

    def __init__(self, verifier_modules: tuple[str, ...]):
        ours, theirs = socket.socketpair()
        self.stderr = tempfile.TemporaryFile()
        # the worker imports what this process can: the same module search path
        env = dict(os.environ, PYTHONPATH=os.pathsep.join(p or os.getcwd() for p in sys.path))
        with theirs:
            self.popen = subprocess.Popen(
                [sys.executable, "-m", "megatron_rlvr.rewards.worker", str(theirs.fileno()), str(os.getpid()),
                 *verifier_modules],
                pass_fds=(theirs.fileno(),), stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                stderr=self.stderr, env=env)
        self.conn = multiprocessing.connection.Connection(ours.detach())
        # readable once the process has exited (Linux pidfd); elsewhere the closed socket says the same
        self.sentinel = os.pidfd_open(self.popen.pid) if hasattr(os, "pidfd_open") else self.conn

    def is_alive(self) -> bool:
        return self.popen.poll() is None

    @property
    def exitcode(self) -> int | None:
        return self.popen.poll()

    def kill(self) -> None:
        if self.is_alive():
            self.popen.kill()

    def join(self, timeout: float | None = None) -> None:
        try:
            self.popen.wait(timeout)
        except subprocess.TimeoutExpired:
            pass

    def stderr_tail(self) -> str:
        self.popen.wait(5)
        self.stderr.seek(0)
        text = self.stderr.read().decode(errors="replace").strip()
        return text[-_STDERR_TAIL:] if text else "(it wrote nothing to stderr)"

    def close(self) -> None:
        self.conn.close()
        self.stderr.close()
        if self.sentinel is not self.conn:
            os.close(self.sentinel)


@dataclass(eq=False)
class _Worker:
    process: _WorkerProcess
    conn: multiprocessing.connection.Connection
    started: float
    ready: bool = False
    inflight: collections.deque = field(default_factory=collections.deque)  # record indices, oldest first
    deadline: float = math.inf


def _stop_workers(workers: list[_Worker]) -> None:
    for worker in workers:
        try:
            worker.conn.send(None)
        except OSError:
            pass
    for worker in workers:
        worker.process.join(_SHUTDOWN_GRACE_S)
        if worker.process.is_alive():
            worker.process.kill()
            worker.process.join()
        worker.process.close()
    workers.clear()


def _describe(record: Record) -> str:
    dataset, prediction, _ = record
    preview = prediction[:60] + ("..." if len(prediction) > 60 else "")
    return f"dataset {dataset!r}, prediction {preview!r} ({len(prediction)} chars)"


class RewardPool:
    """Verifier worker processes with a per-record time limit.

    Args:
        workers: number of worker processes (default: the CPUs this process may run on).
        timeout: seconds one record may take; past it the record scores 0 and its worker is replaced.
        max_chunk: most records sent to a worker at once (chunks amortise the pipe round trip).
        verifier_modules: modules that register more verifiers (`@register_verifier`), imported here and in
            every worker; the built-in gsm8k, math and ifeval need none.
    """

    def __init__(
        self,
        workers: int | None = None,
        timeout: float = DEFAULT_TIMEOUT_S,
        max_chunk: int = 64,
        verifier_modules: Sequence[str] = (),
    ):
        workers = len(os.sched_getaffinity(0)) if workers is None else workers
        if workers < 1:
            raise ValueError(f"RewardPool needs at least 1 worker, got workers={workers}")
        if not timeout > 0:
            raise ValueError(f"RewardPool timeout must be a positive number of seconds, got {timeout}")
        if max_chunk < 1:
            raise ValueError(f"RewardPool max_chunk must be >= 1, got {max_chunk}")
        self.verifier_modules = tuple(verifier_modules)
        for name in self.verifier_modules:
            importlib.import_module(name)  # here too: records are checked against the registry before dispatch
        self.num_workers = workers
        self.timeout = float(timeout)
        self.max_chunk = max_chunk
        self.pid = os.getpid()
        self.num_timeouts = 0
        self.num_failures = 0
        self._lock = threading.Lock()
        self._workers: list[_Worker] = [self._start_worker() for _ in range(workers)]
        self._finalizer = weakref.finalize(self, _stop_workers, self._workers)

    @property
    def closed(self) -> bool:
        return not self._finalizer.alive

    def close(self) -> None:
        """Stop the workers (also done at interpreter exit or when the pool is garbage-collected)."""
        self._finalizer()

    def __enter__(self) -> "RewardPool":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def score(self, records: Iterable[Record]) -> list[float]:
        """Scores in [0, 1] for `(dataset, prediction, ground_truth)` records, in the order given."""
        records = list(records)
        for index, record in enumerate(records):
            _check_record(index, record)
        if not records:
            return []
        with self._lock:
            if self.closed:
                raise RuntimeError("RewardPool.score called after close(); create a new pool")
            if os.getpid() != self.pid:
                raise RuntimeError(f"RewardPool created in process {self.pid} used in forked process "
                                   f"{os.getpid()}; its workers belong to the parent: create a pool here")
            return self._score(records)

    def _start_worker(self) -> _Worker:
        process = _WorkerProcess(self.verifier_modules)
        return _Worker(process=process, conn=process.conn, started=time.monotonic())

    def _replace(self, worker: _Worker) -> None:
        worker.process.kill()
        worker.process.join()
        worker.process.close()
        self._workers[self._workers.index(worker)] = self._start_worker()

    def _score(self, records: list[Record]) -> list[float]:
        results: list[float | None] = [None] * len(records)
        chunk = max(1, min(self.max_chunk, math.ceil(len(records) / (4 * self.num_workers))))
        queue = collections.deque(range(start, min(start + chunk, len(records)))
                                  for start in range(0, len(records), chunk))
        errors: list[str] = []
        try:
            while (queue and not errors) or any(w.inflight for w in self._workers):
                if not errors:
                    self._dispatch(queue, records)
                self._collect(queue, records, results, errors)
                self._expire(queue, records, results)
        except BaseException:
            # Interrupted mid-batch: workers still busy would answer into the next batch, so replace them.
            for worker in list(self._workers):
                if worker.inflight:
                    self._replace(worker)
            raise
        if errors:
            raise RecordError(errors[0] + (f" (and {len(errors) - 1} more)" if len(errors) > 1 else ""))
        return results  # type: ignore[return-value] - every index was filled above

    def _dispatch(self, queue: collections.deque, records: list[Record]) -> None:
        for worker in self._workers:
            if queue and worker.ready and not worker.inflight:
                indices = queue[0]
                try:
                    worker.conn.send([(i, *records[i]) for i in indices])
                except OSError:  # died while idle (e.g. killed by the OOM killer): its replacement takes it
                    self._replace(worker)
                    continue
                queue.popleft()
                worker.inflight.extend(indices)
                worker.deadline = time.monotonic() + self.timeout

    def _collect(self, queue: collections.deque, records: list[Record], results: list, errors: list[str]) -> None:
        waiting = [w for w in self._workers if w.inflight or not w.ready]
        if not waiting:
            return
        now = time.monotonic()
        next_deadline = min(w.deadline if w.ready else w.started + _STARTUP_TIMEOUT_S for w in waiting)
        handles = [w.conn for w in waiting] + [w.process.sentinel for w in waiting]
        ready = set(multiprocessing.connection.wait(handles, timeout=max(0.0, next_deadline - now)))
        for worker in waiting:
            if worker.conn in ready or worker.process.sentinel in ready:
                self._drain(worker, queue, records, results, errors)

    def _drain(
        self, worker: _Worker, queue: collections.deque, records: list[Record], results: list, errors: list[str]
    ) -> None:
        """Read everything `worker` has sent; a worker that died mid-record is handled like a timeout."""
        try:
            while worker.conn.poll():
                message = worker.conn.recv()
                if message == ("ready",):
                    worker.ready = True
                    continue
                index, status, payload = message
                if worker.inflight.popleft() != index:
                    raise RuntimeError(f"reward worker answered record {index} out of order; this is a bug")
                worker.deadline = time.monotonic() + self.timeout
                if status == _OK:
                    results[index] = payload
                elif status == _RAISE:
                    results[index] = 0.0
                    errors.append(f"record {index} ({records[index][0]}): {payload}")
                else:
                    results[index] = 0.0
                    self.num_failures += 1
                    logger.warning("reward verifier raised %s on record %d (%s); scored 0",
                                   payload, index, _describe(records[index]))
        except (EOFError, OSError):
            pass
        if worker.process.is_alive():
            return
        if not worker.ready:
            raise RuntimeError(f"reward worker exited during start-up (exit code {worker.process.exitcode}); its "
                               f"stderr ends with:\n{worker.process.stderr_tail()}")
        if worker.inflight:
            index = worker.inflight.popleft()
            results[index] = 0.0
            self.num_failures += 1
            logger.warning("reward worker died (exit code %s) on record %d (%s); scored 0, worker restarted",
                           worker.process.exitcode, index, _describe(records[index]))
        self._requeue_and_replace(worker, queue)

    def _expire(self, queue: collections.deque, records: list[Record], results: list) -> None:
        now = time.monotonic()
        for worker in list(self._workers):
            if not worker.ready and now > worker.started + _STARTUP_TIMEOUT_S:
                raise RuntimeError(f"reward worker did not start within {_STARTUP_TIMEOUT_S:.0f} s")
            if worker.inflight and now >= worker.deadline:
                index = worker.inflight.popleft()
                results[index] = 0.0
                self.num_timeouts += 1
                logger.warning("reward verifier exceeded %.3g s on record %d (%s); scored 0, worker restarted",
                               self.timeout, index, _describe(records[index]))
                self._requeue_and_replace(worker, queue)

    def _requeue_and_replace(self, worker: _Worker, queue: collections.deque) -> None:
        """Send the records `worker` had not reached to the front of the queue, and replace the worker."""
        if worker.inflight:
            queue.appendleft(list(worker.inflight))
            worker.inflight.clear()
        self._replace(worker)


def _check_record(index: int, record: Sequence) -> None:
    """Fail fast in the caller on records no worker could score (unknown dataset, non-string prediction)."""
    if not isinstance(record, (tuple, list)) or len(record) != 3:
        raise RecordError(f"record {index} must be (dataset, prediction, ground_truth), got {record!r:.200}")
    dataset, prediction, _ = record
    try:
        get_verifier(dataset)
    except RecordError as err:
        raise RecordError(f"record {index}: {err}") from None
    if not isinstance(prediction, str):
        raise RecordError(f"record {index}: prediction must be a string, got {type(prediction).__name__}")


_default_pool: RewardPool | None = None
_default_settings: dict[str, Any] = {"workers": 1, "timeout": DEFAULT_TIMEOUT_S}
_default_lock = threading.Lock()


def configure_default_pool(workers: int = 1, timeout: float = DEFAULT_TIMEOUT_S) -> None:
    """Size and time limit of the shared pool behind `verify`; takes effect on the next `verify` call."""
    global _default_pool
    with _default_lock:
        _default_settings.update(workers=workers, timeout=timeout)
        if _default_pool is not None:
            _default_pool.close()
            _default_pool = None


def default_pool() -> RewardPool:
    """The shared pool behind `verify`, created on first use (and again in a forked child, whose copy of the
    parent's pool would talk to the parent's workers)."""
    global _default_pool
    with _default_lock:
        if _default_pool is None or _default_pool.closed or _default_pool.pid != os.getpid():
            _default_pool = RewardPool(**_default_settings)
        return _default_pool


def verify(dataset: str, prediction: str, ground_truth: Any) -> float:
    """Score one response in [0, 1] with the verifier for `dataset` (gsm8k, math, ifeval; case-insensitive).

    Raises ValueError (`RecordError`) for an unknown dataset or malformed ground truth. Never hangs: the check
    runs in the shared reward pool, and a verifier that runs past the pool's timeout scores 0 (logged).
    """
    get_verifier(dataset)
    return default_pool().score([(dataset, prediction, ground_truth)])[0]
