"""Trainer -> vLLM weight sync vs raw broadcast: same as `megatron-rlvr bench sync`."""

import argparse
import sys

from megatron_rlvr.benchmarks import sync

if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=sync.__doc__.splitlines()[0])
    sync.add_arguments(parser)
    sys.exit(sync.run(parser.parse_args()))
