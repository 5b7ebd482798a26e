"""One DPO step (reference log-probs cached with the starting weights, then the update) at TP 2, PP 2 and DP 2 gives
the same loss, rewards and updated weights as the single-rank step on the same batch (fp32; SGD, so a wrong gradient
scale would show; weights rtol 1e-5 atol 1e-6, metrics rtol 1e-5)."""

import pytest
import torch

from megatron_rlvr.testing.distributed import run_workers
from tests.dpo.common import dpo_overrides, tiny_dpo_job
from tests.trainer.common import worker_env


def _dpo_worker(rank, world, overrides):
    from megatron_rlvr.dpo.config import load_dpo_config
    from megatron_rlvr.dpo.loop import run_dpo

    return run_dpo(load_dpo_config(None, overrides))


def _step(job, out, world, **parallel):
    extra = {"train.steps": 1, "train.batch_size": 4, "train.micro_batch_size": 1, "train.optimizer.name": "sgd",
             "train.optimizer.lr": 0.5, "train.optimizer.clip_grad": 0.0, "checkpoint.interval": 0,
             "checkpoint.export_hf": "true", "loss.name": "dpo_norm", "loss.beta": 2.0, **parallel}
    record = run_workers(_dpo_worker, world, dpo_overrides(job, out, **extra), env=worker_env())[0]
    from megatron_rlvr.models.weights import read_hf_state

    return record, read_hf_state(str(out / "hf"))


@pytest.mark.parametrize("parallel", [
    {"parallel.tensor_parallel": 2, "parallel.sequence_parallel": "true"},
    {"parallel.pipeline_parallel": 2},
    {},
], ids=["tp2-sp", "pp2", "dp2"])
def test_step_matches_single_rank(tmp_path, parallel):
    job = tiny_dpo_job(tmp_path, num_train=8, num_eval=0)
    want, want_weights = _step(job, tmp_path / "single", 1)
    got, got_weights = _step(job, tmp_path / "parallel", 2, **parallel)
    for key in ("loss", "rewards/chosen", "rewards/rejected", "rewards/margin", "logps/chosen", "logps/rejected",
                "rewards/accuracy", "grad_norm"):
        assert got[key] == pytest.approx(want[key], rel=1e-5, abs=1e-7), key
    from megatron_rlvr.models.weights import read_hf_state

    initial = read_hf_state(job["model"])
    moved = 0
    for name, ref in want_weights.items():
        torch.testing.assert_close(got_weights[name], ref, rtol=1e-5, atol=1e-6, msg=lambda m: f"{name}: {m}")
        moved += int(not torch.equal(ref, initial[name]))
    assert moved >= len(want_weights) - 1, "the step left most weights unchanged: the test would prove nothing"
