"""Rollout engines behind one interface (`base.RolloutEngine`), chosen by the `backend` config key.

- `vllm`: in-process vLLM on the layout's rollout ranks (`vllm_engine.VllmEngine`).
- `megatron`: sampling with the trainer's own megatron model (`megatron_engine.MegatronEngine`), for machines
  without vLLM.

A job builds its engine with `producer.build_engine` and the engine's weight sync with
`sync.weight_sync.build_weight_sync`.
"""

from __future__ import annotations

from megatron_rlvr.rollout.base import RolloutEngine, Sample, SamplingConfig

BACKENDS = ("vllm", "megatron")


__all__ = ["BACKENDS", "RolloutEngine", "Sample", "SamplingConfig"]
