"""Logging for every command: the package's loggers (`megatron_rlvr.*`) to the console and to
`<output_dir>/log.txt`, each line with its time and rank.

Every rank appends to the same log.txt (short lines, opened in append mode); the console gets INFO from rank 0
and warnings from every rank, so a report of one rank (the watchdog's, a skipped record) is never lost.
"""

from __future__ import annotations

import logging
import os
import sys

LOG_FILE = "log.txt"
_FORMAT = "%(asctime)s rank {rank} %(levelname)s %(name)s: %(message)s"
_installed: list[logging.Handler] = []


def configure_logging(output_dir: str | None, rank: int | None = None) -> str | None:
    """(Re)install the console and file handlers on the `megatron_rlvr` logger; returns the log file's path."""
    rank = int(os.environ.get("RANK", "0")) if rank is None else rank
    package = logging.getLogger("megatron_rlvr")
    for handler in _installed:
        package.removeHandler(handler)
        handler.close()
    _installed.clear()
    formatter = logging.Formatter(_FORMAT.format(rank=rank), datefmt="%H:%M:%S")
    console = logging.StreamHandler(sys.stderr)
    console.setLevel(logging.INFO if rank == 0 else logging.WARNING)
    _installed.append(console)
    path = None
    if output_dir:
        os.makedirs(output_dir, exist_ok=True)
        path = os.path.join(output_dir, LOG_FILE)
        to_file = logging.FileHandler(path, mode="a", encoding="utf-8")
        to_file.setLevel(logging.INFO)
        _installed.append(to_file)
    for handler in _installed:
        handler.setFormatter(formatter)
        package.addHandler(handler)
    package.setLevel(logging.INFO)
    return path
