"""Colocated in-place weight sync into vLLM's parameter layout vs a device copy: same as `megatron-rlvr bench
sync-inplace`."""

import argparse
import sys

from megatron_rlvr.benchmarks import sync_inplace

if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=sync_inplace.__doc__.splitlines()[0])
    sync_inplace.add_arguments(parser)
    sys.exit(sync_inplace.run(parser.parse_args()))
