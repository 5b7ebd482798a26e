"""The `megatron-rlvr` command line: one subcommand per job, each registered below with its own --help.

A subcommand is a module that exposes `add_arguments(parser)` and `run(args) -> int`; the module is imported
only when its subcommand runs, so `megatron-rlvr --help` stays fast and works without optional dependencies.
"""

from __future__ import annotations

import argparse
import importlib
import sys

# name -> (module implementing it, one-line help). Modules are imported lazily.
SUBCOMMANDS: dict[str, tuple[str, str]] = {
    "train": ("megatron_rlvr.commands.train", "run RLVR training from a YAML config"),
    "sft": ("megatron_rlvr.commands.sft", "supervised warm start on response tokens"),
    "dpo": ("megatron_rlvr.commands.dpo", "DPO on preference pairs; --make-pairs makes them with the verifiers"),
    "convert": ("megatron_rlvr.commands.convert", "convert checkpoints between HF and megatron layouts"),
    "bench": ("megatron_rlvr.commands.bench", "benchmarks: kernels, sync, train, step, partition, rewards, generate"),
    "plan": ("megatron_rlvr.commands.plan", "predict memory and step time of a layout"),
    "eval": ("megatron_rlvr.commands.eval", "score a policy on held-out verifiable prompts"),
    "plot": ("megatron_rlvr.commands.plot", "draw metric curves of an output directory to PNG"),
}


def _load(name: str):
    module_name, _ = SUBCOMMANDS[name]
    try:
        return importlib.import_module(module_name)
    except ModuleNotFoundError as err:
        if err.name == module_name:
            return None
        raise


def build_parser(selected: str | None = None) -> argparse.ArgumentParser:
    """The parser; only the `selected` subcommand's module is imported to add its arguments."""
    parser = argparse.ArgumentParser(
        prog="megatron-rlvr",
        description="RLVR post-training engine: megatron-core 3D parallelism, fused Triton kernels, "
        "in-process vLLM rollouts.",
    )
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for name, (_, help_text) in SUBCOMMANDS.items():
        sub_parser = sub.add_parser(name, help=help_text, description=help_text)
        module = _load(name) if name == selected else None
        if module is not None:
            module.add_arguments(sub_parser)
    return parser


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    selected = argv[0] if argv and argv[0] in SUBCOMMANDS else None
    parser = build_parser(selected)
    args = parser.parse_args(argv)
    if args.command is None:
        parser.print_help()
        return 2
    module = _load(args.command)
    if module is None:
        print(f"megatron-rlvr {args.command}: not built yet in this version", file=sys.stderr)
        return 3
    return int(module.run(args) or 0)


if __name__ == "__main__":
    sys.exit(main())
