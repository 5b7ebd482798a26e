"""Reward verification throughput, pool vs in-line: same as `megatron-rlvr bench rewards`."""

import argparse
import sys

from megatron_rlvr.benchmarks import rewards

if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=rewards.__doc__.splitlines()[0])
    rewards.add_arguments(parser)
    sys.exit(rewards.run(parser.parse_args()))
