"""`megatron-rlvr bench NAME`: dispatch to the benchmark modules in `megatron_rlvr.benchmarks`."""

from __future__ import annotations

import argparse
import importlib

# benchmark name -> (module, one-line help)
BENCHMARKS: dict[str, tuple[str, str]] = {
    "kernels": ("megatron_rlvr.benchmarks.kernels", "fused log-prob/entropy/KL kernels vs torch baselines"),
    "sync": ("megatron_rlvr.benchmarks.sync", "trainer -> rollout weight sync vs raw broadcast"),
    "sync-inplace": ("megatron_rlvr.benchmarks.sync_inplace",
                     "colocated in-place sync into vLLM's parameter layout vs a device copy (no vLLM needed)"),
    "train": ("megatron_rlvr.benchmarks.train", "forward+backward tokens/s and MFU of the policy"),
    "step": ("megatron_rlvr.benchmarks.step", "update phase on a long-tailed rollout batch, padded vs packed"),
    "partition": ("megatron_rlvr.benchmarks.partition", "balanced sequence partitioning, C++ vs Python"),
    "rewards": ("megatron_rlvr.benchmarks.rewards", "verifier throughput of the reward pool"),
    "generate": ("megatron_rlvr.benchmarks.generate",
                 "KV-cached megatron generation vs HF static-cache generate and the bandwidth limit"),
}


def add_arguments(parser: argparse.ArgumentParser) -> None:
    sub = parser.add_subparsers(dest="benchmark", metavar="NAME", required=True)
    for name, (module_name, help_text) in BENCHMARKS.items():
        bench_parser = sub.add_parser(name, help=help_text, description=help_text)
        try:
            module = importlib.import_module(module_name)
        except ModuleNotFoundError as err:
            if err.name != module_name:
                raise
            bench_parser.set_defaults(bench_module=None)
            continue
        module.add_arguments(bench_parser)
        # the name, not the module: benchmarks hand `args` to spawned workers, which pickle it
        bench_parser.set_defaults(bench_module=module_name)


def run(args: argparse.Namespace) -> int:
    if args.bench_module is None:
        print(f"megatron-rlvr bench {args.benchmark}: not built yet in this version")
        return 3
    return int(importlib.import_module(args.bench_module).run(args) or 0)
