"""Balanced partitioning benchmark, C++ vs Python: same as `megatron-rlvr bench partition`."""

import argparse
import sys

from megatron_rlvr.benchmarks import partition

if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=partition.__doc__.splitlines()[0])
    partition.add_arguments(parser)
    sys.exit(partition.run(parser.parse_args()))
