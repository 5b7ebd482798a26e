"""Thin wrapper: `python tools/bench_kernels.py ARGS` == `megatron-rlvr bench kernels ARGS`."""

import argparse
import sys

from megatron_rlvr.benchmarks import kernels

if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=kernels.__doc__.splitlines()[0])
    kernels.add_arguments(parser)
    sys.exit(kernels.run(parser.parse_args()))
