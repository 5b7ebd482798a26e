"""Thin wrapper: `python tools/convert_checkpoint.py ARGS` == `megatron-rlvr convert ARGS`."""

import sys

from megatron_rlvr.cli import main

if __name__ == "__main__":
    sys.exit(main(["convert", *sys.argv[1:]]))
