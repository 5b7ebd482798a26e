"""Rollout engines behind one interface (`base.RolloutEngine`), chosen by the `backend` config key.

- `vllm`: in-process vLLM on the layout's rollout ranks (`vllm_engine.VllmEngine`).
- `megatron`: sampling with the trainer's own megatron model (`megatron_engine.MegatronEngine`), for machines
  without vLLM.
"""

from __future__ import annotations

import torch

from megatron_rlvr.parallel.layout import LayoutGroups
from megatron_rlvr.rollout.base import RolloutEngine, Sample, SamplingConfig

BACKENDS = ("vllm", "megatron")


def build_rollout_engine(
    backend: str, groups: LayoutGroups, model_dir: str, model: torch.nn.Module | None = None, **opts
) -> RolloutEngine:
    """The rollout engine of `backend`; collective over the world (call on every rank).

    `model` is the trainer's policy on trainer ranks (None elsewhere); the megatron backend samples from it and
    needs every rank to be a trainer. `opts` go to the engine (e.g. `dtype`, `max_model_len`, `kv_cache_gib`,
    `cpu_plain_weights` for vLLM). Its weight sync is built next to it (`sync.weight_sync.build_weight_sync`).
    """
    if backend == "vllm":
        from megatron_rlvr.rollout.vllm_engine import VllmEngine

        return VllmEngine(groups, model_dir, **opts)
    if backend == "megatron":
        from megatron_rlvr.models.llama import LlamaArch
        from megatron_rlvr.rollout.megatron_engine import MegatronEngine, eos_token_ids

        layout = groups.layout
        if len(layout.trainer_ranks) != layout.world_size:
            raise ValueError(
                "rollout backend 'megatron' samples with the trainer's model, so every rank must train: use the "
                f"colocated layout (this {layout.kind} layout has {layout.world_size - len(layout.trainer_ranks)} "
                "rollout-only ranks)"
            )
        if model is None:
            raise ValueError("rollout backend 'megatron' needs the trainer's model (model=...)")
        return MegatronEngine(model, groups.pg, LlamaArch.from_pretrained(model_dir), eos_token_ids(model_dir),
                              **opts)
    raise ValueError(f"rollout backend {backend!r} is unknown; known: {', '.join(BACKENDS)}")


__all__ = ["BACKENDS", "RolloutEngine", "Sample", "SamplingConfig", "build_rollout_engine"]
