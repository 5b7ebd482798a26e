"""Layouts: sizes that do not fit are refused naming those that do; rank roles; the process groups of a layout
(the trainer block's megatron groups, the default-group swap vLLM relies on) on real processes.

megatron is imported inside the functions: spawned workers import this module before TRITON_INTERPRET is set.
"""

import pytest
import torch

from megatron_rlvr.testing.distributed import run_workers
from tests.models.common import hf_reference_logprobs, random_batch, tiny_model_dir, worker_env


def test_split_refuses_world_that_does_not_fit():
    from megatron_rlvr.parallel.layout import make_layout

    # 2 rollout ranks + trainers in multiples of tp*pp = 4: 6, 10, 14, ... fit; 5 does not
    with pytest.raises(ValueError, match=r"world size 5 does not fit.*world sizes that fit: 6, 10, 14, 18"):
        make_layout("split", 5, train_tp=2, train_pp=2, rollout_tp=2)
    with pytest.raises(ValueError, match=r"world sizes that fit: 5, 6, 7"):
        make_layout("split", 4, rollout_tp=4)  # no rank left to train


def test_colocated_refuses_world_that_does_not_fit():
    from megatron_rlvr.parallel.layout import make_layout

    with pytest.raises(ValueError, match=r"world size 6 is not a multiple.*world sizes that fit: 4, 8, 12"):
        make_layout("colocated", 6, train_tp=2, rollout_tp=4)
    with pytest.raises(ValueError, match="train_pp=2 is not supported"):
        make_layout("colocated", 4, train_pp=2)
    with pytest.raises(ValueError, match="layout kind 'mixed' is unknown"):
        make_layout("mixed", 4)


def test_roles():
    from megatron_rlvr.parallel.layout import make_layout

    split = make_layout("split", 6, train_tp=2, rollout_tp=2, num_engines=2)
    assert list(split.rollout_ranks) == [0, 1, 2, 3] and list(split.trainer_ranks) == [4, 5]
    assert (split.train.tp, split.train.dp) == (2, 1)
    split = make_layout("split", 8, train_tp=2, rollout_tp=2, num_engines=2)
    assert split.train.dp == 2
    assert [split.engine_index(r) for r in range(8)] == [0, 0, 1, 1, None, None, None, None]
    # megatron order: TP fastest, then DP: replica 0 is ranks 4, 5
    assert split.sync_sources() == [4, 5] and split.trainer_rank(1, 0, 1) == 7
    colocated = make_layout("colocated", 4, train_tp=2, rollout_tp=1)
    assert colocated.num_engines == 4 and colocated.is_trainer(3) and colocated.is_rollout(3)
    # what the weight sync and the engine read instead of the kind
    assert colocated.trainers_host_engines and not split.trainers_host_engines


def test_slice_receivers():
    """Sender i (training TP shard [i/t, (i+1)/t)) goes to the vLLM ranks, of every engine, whose slice
    [j/r, (j+1)/r) overlaps it."""
    from megatron_rlvr.parallel.layout import make_layout

    # t=2, r=2, two engines (ranks 0-1, 2-3), trainers 4-5: shard i -> vLLM rank i of each engine
    split = make_layout("split", 6, train_tp=2, rollout_tp=2, num_engines=2)
    assert [split.slice_receivers(src) for src in split.sync_sources()] == [[0, 2], [1, 3]]
    # t=1: the one shard is the whole model; every rollout rank needs part of it
    assert make_layout("split", 3, rollout_tp=2).slice_receivers(2) == [0, 1]
    # t=2, r=4: each shard covers two vLLM slices
    split = make_layout("split", 6, train_tp=2, rollout_tp=4)
    assert [split.slice_receivers(src) for src in split.sync_sources()] == [[0, 1], [2, 3]]
    # t=4, r=2, PP=2: two shards per vLLM slice, on every stage
    split = make_layout("split", 10, train_tp=4, train_pp=2, rollout_tp=2)
    assert [split.slice_receivers(src) for src in split.sync_sources()] == [[0], [0], [1], [1]] * 2
    # t=2, r=3: the middle vLLM slice [1/3, 2/3) straddles both shards
    split = make_layout("split", 5, train_tp=2, rollout_tp=3)
    assert [split.slice_receivers(src) for src in split.sync_sources()] == [[0, 1], [1, 2]]


def _sync_groups_worker(rank, world):
    import torch.distributed as dist

    from megatron_rlvr.parallel.layout import init_sync_groups, make_layout

    layout = make_layout("split", world, train_tp=2, rollout_tp=2)
    groups = init_sync_groups(layout)
    members = {src: (dist.get_process_group_ranks(g.slice) if g.slice is not None else None,
                     dist.get_process_group_ranks(g.full)) for src, g in groups.items()}
    received = {}
    for src, g in sorted(groups.items()):  # every group carries a broadcast from its sender
        for route in ("slice", "full"):
            if g.group(route) is not None:
                t = torch.tensor([float(rank if rank == src else -1)])
                dist.broadcast(t, src=src, group=g.group(route))
                received[src, route] = t.item()
    return members, received


def test_sync_groups_route_slices():
    """Split world 4 (vLLM TP 2 on ranks 0-1, training TP 2 on ranks 2-3): sender 2's slice group holds vLLM
    rank 0 only, sender 3's rank 1 only; both full groups hold both; groups rendezvous on every rank."""
    results = run_workers(_sync_groups_worker, 4)
    (m0, r0), (m1, r1), (m2, _), (m3, _) = results
    assert m0 == {2: ([0, 2], [0, 1, 2]), 3: (None, [0, 1, 3])}
    assert m1 == {2: (None, [0, 1, 2]), 3: ([1, 3], [0, 1, 3])}
    assert m2 == {2: ([0, 2], [0, 1, 2])} and m3 == {3: ([1, 3], [0, 1, 3])}
    assert r0 == {(2, "slice"): 2.0, (2, "full"): 2.0, (3, "full"): 3.0}
    assert r1 == {(2, "full"): 2.0, (3, "slice"): 3.0, (3, "full"): 3.0}


def _swap_worker(rank, world):
    import os

    import torch.distributed as dist
    from torch.distributed import distributed_c10d as c10d

    from megatron_rlvr.parallel.layout import align_group_counters, group_as_world

    sub = dist.new_group([0, 1])
    inside = None
    if rank < 2:
        with group_as_world(sub):
            inner = dist.new_group([0, 1])  # a group created as vLLM would: over the swapped world
            t = torch.tensor([rank + 1.0])
            dist.all_reduce(t)  # default group = ranks 0, 1 only
            dist.all_reduce(t, group=inner)
            inside = (dist.get_rank(), dist.get_world_size(), os.environ["RANK"], os.environ["WORLD_SIZE"], t.item())
    counts_before = c10d._world.group_count
    align_group_counters()
    after = dist.new_group(list(range(world)))  # must rendezvous although ranks 0, 1 created one more group
    t = torch.tensor([1.0])
    dist.all_reduce(t, group=after)
    return inside, counts_before, dist.get_rank(), dist.get_world_size(), os.environ["RANK"], t.item()


def test_group_as_world_swaps_and_restores():
    """Guards the private torch hook vLLM's placement relies on (`_update_default_pg`)."""
    results = run_workers(_swap_worker, 3)
    for rank, (inside, counts, r, w, env_rank, total) in enumerate(results):
        if rank < 2:
            assert inside == (rank, 2, str(rank), "2", 6.0)
        assert (r, w, env_rank, total) == (rank, 3, str(rank), 3.0)
    assert results[0][1] == results[2][1] + 1, "the group counter did not diverge: the test proves nothing"


def _block_worker(rank, world, model_dir, tokens):
    import torch.distributed as dist

    from megatron_rlvr.models.forward import forward_backward, split_micro_batches
    from megatron_rlvr.models.llama import LlamaArch, build_llama, transformer_config
    from megatron_rlvr.models.weights import load_hf_into_model, read_hf_state
    from megatron_rlvr.parallel.layout import init_layout, make_layout

    groups = init_layout(make_layout("split", world, train_tp=2, rollout_tp=1))
    if groups.pg is None:
        return None
    ranks = {name: dist.get_process_group_ranks(getattr(groups.pg, name)) for name in ("tp", "pp", "dp", "mp")}
    arch = LlamaArch.from_pretrained(model_dir)
    model = build_llama(arch, transformer_config(arch, tp=2), groups.pg, pad_vocab_multiple=16)
    load_hf_into_model(model, read_hf_state(model_dir), arch, groups.pg)
    with torch.no_grad():
        out = forward_backward(model, split_micro_batches(tokens, 1), groups.pg, valid_vocab_size=arch.vocab_size)
    return ranks, torch.cat([o["logprobs"] for o in out])


def test_trainer_block_groups_run_the_model(tmp_path):
    """Split world=3: rank 0 rolls out, ranks 1-2 train with TP=2 on groups built over the block only."""
    model_dir = tiny_model_dir(tmp_path, "tiny")
    tokens, _ = random_batch(model_dir, batch=2, max_len=10, seed=3)
    tokens[:, :] = tokens.clamp_min(1)  # no padding: every position is scored
    results = run_workers(_block_worker, 3, model_dir, tokens, env=worker_env())
    assert results[0] is None
    ref = hf_reference_logprobs(model_dir, tokens)
    for rank in (1, 2):
        ranks, logprobs = results[rank]
        assert ranks == {"tp": [1, 2], "pp": [rank], "dp": [rank], "mp": [1, 2]}
        torch.testing.assert_close(logprobs.double(), ref, rtol=1e-5, atol=1e-5)
