"""A reward-pool worker: `python -m megatron_rlvr.rewards.worker FD PARENT_PID [MODULE ...]` (started by
`RewardPool`, never by hand).

It imports the extra verifier modules, runs the warm-up records, says ready, then scores chunks
`[(index, dataset, prediction, ground_truth)]` from the connection on file descriptor FD, answering
`(index, status, payload)` per record; `None` or a closed connection ends it. A thread ends the process when
PARENT_PID is gone (a rank killed with SIGKILL leaves no worker behind, even one stuck in a verifier).
"""

from __future__ import annotations

import importlib
import multiprocessing.connection
import os
import signal
import sys
import threading
import time

from megatron_rlvr.rewards.pool import _FAILED, _OK, _RAISE, WARM_UP_RECORDS
from megatron_rlvr.rewards.registry import RecordError, run_verifier

_PARENT_POLL_S = 1.0


def _exit_with_parent(parent_pid: int) -> None:
    def watch() -> None:
        while os.getppid() == parent_pid:
            time.sleep(_PARENT_POLL_S)
        os._exit(0)

    threading.Thread(target=watch, name="parent-watch", daemon=True).start()


def main(argv: list[str]) -> None:
    fd, parent_pid, modules = int(argv[0]), int(argv[1]), argv[2:]
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C is the parent's to handle; it shuts the pool down
    _exit_with_parent(parent_pid)
    conn = multiprocessing.connection.Connection(fd)
    for name in modules:
        importlib.import_module(name)
    for record in WARM_UP_RECORDS:
        try:
            run_verifier(*record)
        except Exception:  # noqa: BLE001 - e.g. math-verify missing: reported on the first real math record
            pass
    conn.send(("ready",))
    while True:
        try:
            chunk = conn.recv()
        except EOFError:
            return
        if chunk is None:
            return
        for index, dataset, prediction, ground_truth in chunk:
            try:
                conn.send((index, _OK, run_verifier(dataset, prediction, ground_truth)))
            except (RecordError, ImportError) as err:
                conn.send((index, _RAISE, f"{type(err).__name__}: {err}"))
            except Exception as err:  # noqa: BLE001 - a response that breaks a verifier scores 0
                conn.send((index, _FAILED, f"{type(err).__name__}: {str(err)[:300]}"))


if __name__ == "__main__":
    main(sys.argv[1:])
