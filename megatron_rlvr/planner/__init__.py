"""Layout planner: per-GPU memory and predicted generate / sync / train seconds of an RLVR layout, with its
problems and the smallest change that fixes each (`megatron-rlvr plan`)."""

from megatron_rlvr.planner.plan import Plan, Problem, assumptions, format_report, make_plan
from megatron_rlvr.planner.specs import (
    CLUSTER_PRESETS, NAMED_MODELS, ClusterSpec, Efficiency, Layout, ModelSpec, load_model,
)

__all__ = [
    "CLUSTER_PRESETS", "NAMED_MODELS", "ClusterSpec", "Efficiency", "Layout", "ModelSpec", "Plan", "Problem",
    "assumptions", "format_report", "load_model", "make_plan",
]
