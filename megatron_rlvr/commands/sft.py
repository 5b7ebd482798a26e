"""`megatron-rlvr sft --config PATH [key=value ...]`: supervised warm start on response tokens (see sft.py);
writes `<output_dir>/hf` for an RLVR run's `model.path`."""

from __future__ import annotations

import argparse
import os
import sys

from megatron_rlvr.config import ConfigError


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--config", help="YAML SFT config (sections: output_dir, model, parallel, data, train)")
    parser.add_argument("overrides", nargs="*", metavar="key=value", help="dotted overrides, e.g. train.steps=50")


def run(args: argparse.Namespace) -> int:
    from megatron_rlvr.commands.train import single_process_env
    from megatron_rlvr.sft import load_sft_config, run_sft, validate_sft

    try:
        cfg = load_sft_config(args.config, args.overrides)
        validate_sft(cfg, int(os.environ.get("WORLD_SIZE", "1")))
    except ConfigError as err:
        print(f"megatron-rlvr sft: config error: {err}", file=sys.stderr)
        return 2
    single_process_env()
    from megatron_rlvr.commands.running import run_job

    return run_job("sft", cfg.output_dir, lambda: run_sft(cfg))
