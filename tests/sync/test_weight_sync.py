"""`build_weight_sync` picks the sync from the engine's capability, not its backend name: an engine that samples
with the trainer's own model gets the no-op sync (0 bytes, verified); one holding its own weights needs the layout's
groups. The path choice, the copies and the checks of `WeightSync` run on real vLLM engines (`test_sync_vllm.py`,
`test_sync_inplace.py`)."""

import types

import pytest

from megatron_rlvr.sync.weight_sync import NoSync, build_weight_sync


def test_engine_sharing_the_trainers_weights_gets_no_sync():
    sync = build_weight_sync(types.SimpleNamespace(shares_trainer_weights=True), None)
    assert isinstance(sync, NoSync)
    stats = sync.push(model=None)
    assert (stats.bytes, stats.verified) == (0, True)


def test_engines_declare_whether_they_share_the_trainers_weights():
    from megatron_rlvr.rollout.megatron_engine import MegatronEngine
    from megatron_rlvr.rollout.vllm_engine import VllmEngine
    from tests.trainer.sampling import LoopSampler

    assert MegatronEngine.shares_trainer_weights and LoopSampler.shares_trainer_weights
    assert not VllmEngine.shares_trainer_weights


def test_engine_with_its_own_weights_needs_the_layout_groups():
    engine = types.SimpleNamespace(shares_trainer_weights=False)
    with pytest.raises(ValueError, match="layout's groups"):
        build_weight_sync(engine, None)
