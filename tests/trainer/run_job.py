"""Entry point for trainer tests launched under torchrun: `run_job.py [--stale-sampler] KEY=VALUE ...` trains with
the test sampler (tests/trainer/sampling.py) as the rollout engine; `--stale-sampler` keeps its initial weights."""

import os
import sys

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", ".."))

from megatron_rlvr.config import config_from_dict  # noqa: E402


def main() -> None:
    from megatron_rlvr.trainer import train
    from tests.trainer.sampling import loop_sampler, stale_loop_sampler

    args = sys.argv[1:]
    factory = loop_sampler
    if args and args[0] == "--stale-sampler":
        args, factory = args[1:], stale_loop_sampler
    train(config_from_dict({}, args), rollout_factory=factory)


if __name__ == "__main__":
    main()
