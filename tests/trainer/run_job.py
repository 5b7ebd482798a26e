"""Entry point for trainer tests launched under torchrun: `run_job.py KEY=VALUE ...` trains with the test
sampler (tests/trainer/sampling.py) as the rollout engine."""

import os
import sys

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", ".."))

from megatron_rlvr.config import config_from_dict  # noqa: E402


def main() -> None:
    from megatron_rlvr.trainer import train
    from tests.trainer.sampling import loop_sampler

    train(config_from_dict({}, sys.argv[1:]), rollout_factory=loop_sampler)


if __name__ == "__main__":
    main()
