"""How `train`, `sft`, `dpo` and `eval` run a job: logging to the console and `<output_dir>/log.txt`, and the
failures a user acts on ended with one clear message instead of a stack of every rank's traceback."""

from __future__ import annotations

import logging
import sys
import traceback
from typing import Callable

logger = logging.getLogger("megatron_rlvr.job")


def run_job(command: str, output_dir: str | None, job: Callable[[], object]) -> int:
    """Run `job` with logging configured; exit status 0, 2 for an input file the job cannot use (named in the
    message), or the watchdog's exit code when a collective failed after a phase ran past the watchdog's threshold
    (a timeout, or a rank gone): the watchdog's report then says which phase, which step and where each rank was.
    """
    from megatron_rlvr.logs import configure_logging
    from megatron_rlvr.preflight import InputError
    from megatron_rlvr.watchdog import EXIT_CODE, timed_out_report

    configure_logging(output_dir)
    try:
        job()
    except InputError as err:
        print(f"megatron-rlvr {command}: input error: {err}", file=sys.stderr)
        return 2
    except Exception as err:
        report = timed_out_report()
        if report is None:
            raise
        logger.debug("the failed collective: %s", traceback.format_exc())
        logger.error("%s; then a collective failed (%s: %s): ending the job (parallel.timeout_s bounds the wait)",
                     report, type(err).__name__, str(err).splitlines()[0] if str(err) else "")
        return EXIT_CODE
    return 0
