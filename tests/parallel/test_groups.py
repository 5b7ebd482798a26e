"""`parallel.init_groups`: every group of a job from the config and the world, on real processes over gloo.

megatron is imported inside the workers: spawned workers import this module before TRITON_INTERPRET is set."""

from megatron_rlvr.testing.distributed import run_workers
from tests.models.common import worker_env


def _groups(rank, world, overrides):
    from megatron_rlvr.config import config_from_dict
    from megatron_rlvr.parallel.groups import init_groups
    from megatron_rlvr.parallel.state import init_distributed

    cfg = config_from_dict({}, overrides)
    init_distributed()
    groups = init_groups(cfg, world, vllm=cfg.rollout.backend == "vllm")
    out = {"trains": groups.trains, "shares": groups.engine_shares_ranks}
    if groups.policy is not None:
        out["policy"] = (groups.policy.tp.size(), groups.policy.pp.size(), groups.policy.dp.size())
    if groups.value is not None:
        out["value"] = (groups.value.tp.size(), groups.value.dp.size(), groups.value is groups.policy)
    if groups.rollout is not None:
        layout = groups.rollout.layout
        out["engines"] = layout.num_engines
        out["engine"] = layout.engine_index(rank)
        out["engine_size"] = groups.rollout.engine_group.size() if groups.rollout.engine_group is not None else None
    return out


def test_split_layout_with_several_engines():
    """parallel.rollout_ranks=2 at rollout TP 1 is two vLLM engines on ranks 0 and 1; rank 2 trains alone."""
    ranks = run_workers(_groups, 3, ["parallel.layout=split", "parallel.rollout_ranks=2", "rollout.backend=vllm",
                                     "parallel.rollout_tensor_parallel=1"], timeout=240, env=worker_env())
    assert [r["trains"] for r in ranks] == [False, False, True]
    assert all(r["engines"] == 2 and not r["shares"] for r in ranks)
    assert [r["engine"] for r in ranks] == [0, 1, None]
    assert [r["engine_size"] for r in ranks] == [1, 1, None]
    assert ranks[2]["policy"] == (1, 1, 1)


def test_colocated_value_model_on_its_own_grid():
    """The megatron backend: no vLLM groups, the engine shares the ranks; a PPO value model at TP 2 gets its own
    grid beside the policy's TP 1 x DP 2."""
    ranks = run_workers(_groups, 2, ["rollout.backend=megatron", "algorithm.advantage_estimator=gae",
                                     "parallel.value_tensor_parallel=2"], timeout=240, env=worker_env())
    for r in ranks:
        assert r["trains"] and r["shares"] and "engines" not in r
        assert r["policy"] == (1, 1, 2)
        assert r["value"] == (2, 1, False)
