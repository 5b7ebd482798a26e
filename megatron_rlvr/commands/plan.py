"""`megatron-rlvr plan`: per-GPU memory and predicted seconds per RLVR step of a layout, or what is wrong with
it and the smallest change that fixes it. Every layout, cluster and efficiency field is a flag (see
megatron_rlvr/planner/specs.py for their meaning and sources); --preset starts from a published layout."""

from __future__ import annotations

import argparse
import dataclasses
import json

from megatron_rlvr.planner import CLUSTER_PRESETS, ClusterSpec, Efficiency, Layout, format_report, load_model, make_plan
from megatron_rlvr.planner.presets import PRESETS
from megatron_rlvr.config import field_docs

_CLUSTER_FIELDS = ("gpus_per_node", "memory_gib", "reserved_gib", "nvlink_gbps", "inter_gbps", "bf16_tflops",
                   "hbm_tbps")


def _flag(name: str) -> str:
    return "--" + name.replace("_", "-")


def _add_fields(group, cls, names=None) -> None:
    docs = field_docs(cls)
    for f in dataclasses.fields(cls):
        if names is not None and f.name not in names:
            continue
        default = f.default
        help_text = f"{docs.get(f.name, '')} (default {default!r})".replace("%", "%%")
        if isinstance(default, bool):
            group.add_argument(_flag(f.name), dest=f.name, action=argparse.BooleanOptionalAction, default=None,
                               help=help_text)
        else:
            group.add_argument(_flag(f.name), dest=f.name, type=type(default), default=None, metavar=f.name.upper(),
                               help=help_text)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--preset", choices=sorted(PRESETS), help="start from a published layout (flags override)")
    parser.add_argument("--model", help="8B, 70B, 405B (Llama 3.1 shapes) or an HF config.json path")
    parser.add_argument("--cluster", choices=sorted(CLUSTER_PRESETS), help="hardware preset (default h100-80g)")
    parser.add_argument("--gpus", type=int, help="GPUs in the cluster")
    parser.add_argument("--nodes", type=int, help="nodes in the cluster (GPUs = nodes x gpus-per-node)")
    parser.add_argument("--json", action="store_true", help="print the plan as JSON")
    _add_fields(parser.add_argument_group("cluster"), ClusterSpec, _CLUSTER_FIELDS)
    _add_fields(parser.add_argument_group("layout"), Layout)
    _add_fields(parser.add_argument_group("measured inputs (efficiencies)"), Efficiency)


def _given(args: argparse.Namespace, cls, names=None) -> dict:
    return {f.name: getattr(args, f.name) for f in dataclasses.fields(cls)
            if (names is None or f.name in names) and getattr(args, f.name) is not None}


def run(args: argparse.Namespace) -> int:
    preset = PRESETS[args.preset] if args.preset else None
    model_name = args.model or (preset.model if preset else None)
    if not model_name:
        raise SystemExit("megatron-rlvr plan: give --model (8B, 70B, 405B or a config.json) or --preset")
    hardware = dict(CLUSTER_PRESETS[args.cluster or (preset.cluster if preset else "h100-80g")])
    hardware.update(_given(args, ClusterSpec, _CLUSTER_FIELDS))
    gpus = args.gpus or (args.nodes * hardware["gpus_per_node"] if args.nodes else None) or (
        preset.gpus if preset else None)
    if not gpus:
        raise SystemExit("megatron-rlvr plan: give --gpus or --nodes (or a --preset)")
    layout_fields = dict(preset.layout) if preset else {}
    if preset:
        layout_fields.setdefault("value_model", preset.value_model)
    layout_fields.update(_given(args, Layout))
    efficiency = dict(preset.efficiency) if preset else {}
    efficiency.update(_given(args, Efficiency))
    plan = make_plan(load_model(model_name), ClusterSpec(gpus=gpus, **hardware), Layout(**layout_fields),
                     Efficiency(**efficiency))
    published = preset.published if preset else {}
    if args.json:
        report = plan.to_dict()
        if published:
            report["published_seconds"] = published
        print(json.dumps(report, indent=2))
    else:
        print(format_report(plan))
        if published and plan.train is not None:
            print("\npredicted vs published seconds per step (" + args.preset + "):")
            for name, phase in (("generate", plan.generate), ("sync", plan.sync), ("train", plan.train)):
                print(f"  {name:<10}{phase.seconds:9.0f} {published[name]:9.0f}   x{phase.seconds / published[name]:.2f}")
            total = sum(published.values())
            print(f"  {'step':<10}{plan.step_seconds:9.0f} {total:9.0f}   x{plan.step_seconds / total:.2f}")
    return 0 if plan.ok else 1
