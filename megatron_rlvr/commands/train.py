"""`megatron-rlvr train --config PATH [key=value ...] [--dry-run] [--export-hf]`: run RLVR (see trainer.py).

Launch with torchrun for more than one rank (`torchrun --nproc-per-node 2 -m megatron_rlvr.cli train ...`);
without torchrun it runs as a world of one. `--dry-run` validates the config and prints the layout, the process
groups and the planner's per-GPU memory estimate without building anything.
"""

from __future__ import annotations

import argparse
import os
import sys

from megatron_rlvr.config import ConfigError, describe, load_config, validate


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--config", help="YAML job config (examples/configs/*.yaml)")
    parser.add_argument("overrides", nargs="*", metavar="key=value", help="dotted overrides, e.g. train.steps=20")
    parser.add_argument("--dry-run", action="store_true",
                        help="validate and print layout, process groups and memory estimate; build nothing")
    parser.add_argument("--world-size", type=int, default=None,
                        help="--dry-run: plan for this many ranks (default: WORLD_SIZE, or what the layout needs)")
    parser.add_argument("--export-hf", action="store_true",
                        help="write the final policy as a HuggingFace directory, <output_dir>/hf")
    parser.add_argument("--list-keys", action="store_true", help="print every config key with its doc and exit")


def single_process_env() -> None:
    """Let `megatron-rlvr train` run without torchrun as a world of one."""
    if "RANK" not in os.environ:
        from megatron_rlvr.testing.distributed import free_port

        os.environ.update(RANK="0", LOCAL_RANK="0", WORLD_SIZE="1", LOCAL_WORLD_SIZE="1",
                          MASTER_ADDR="127.0.0.1", MASTER_PORT=str(free_port()))


def run(args: argparse.Namespace) -> int:
    if args.list_keys:
        print("\n".join(describe()))
        return 0
    try:
        overrides = list(args.overrides) + (["checkpoint.export_hf=true"] if args.export_hf else [])
        cfg = load_config(args.config, overrides)
        if args.dry_run:
            from megatron_rlvr.dry_run import dry_run_report

            print(dry_run_report(cfg, args.world_size))
            return 0
        validate(cfg, int(os.environ.get("WORLD_SIZE", "1")))
    except ConfigError as err:
        print(f"megatron-rlvr train: config error: {err}", file=sys.stderr)
        return 2
    single_process_env()
    from megatron_rlvr.trainer import train

    train(cfg)
    return 0
