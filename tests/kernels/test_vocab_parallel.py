"""Vocab-parallel kernels on real TP=2 and TP=4 process groups (gloo, CPU tensors through the Triton
interpreter): every rank must get the full-vocab values, its shard's gradient, and the communication must
be one all-gather forward and nothing backward (plus the dhidden all-reduce of the linear variant)."""

from __future__ import annotations

import os
from importlib.metadata import version

import pytest
import torch
import torch.distributed as dist

from megatron_rlvr.kernels import linear_token_logprobs, token_logprobs
from megatron_rlvr.testing.distributed import run_workers

from .reference import assert_close, random_logits, ref_logprobs_entropy

ALL_GATHER = ["all_gather_single" if hasattr(dist, "all_gather_single") else "all_gather_into_tensor"]
COLLECTIVES = ("all_gather_single", "all_gather_into_tensor", "all_gather", "all_reduce", "broadcast", "reduce_scatter_tensor",
               "all_to_all_single", "reduce", "gather", "scatter")
N_TOKENS, HIDDEN = 8, 12
TEMPERATURE = 0.8


def _log_collectives() -> list[str]:
    """Record the name of every torch.distributed collective called from now on in this process."""
    calls: list[str] = []
    for name in COLLECTIVES:
        original = getattr(dist, name, None)
        if original is None:
            continue

        def logged(*args, _original=original, _name=name, **kwargs):
            calls.append(_name)
            return _original(*args, **kwargs)

        setattr(dist, name, logged)
    return calls


def make_problem(seed, vocab, dtype):
    """The same full-vocab problem on every rank (and in the parent) from one seed."""
    gen = torch.Generator().manual_seed(seed)
    logits = random_logits((N_TOKENS, vocab), dtype, "cpu", gen)
    labels = torch.randint(0, vocab, (N_TOKENS,), generator=gen)
    hidden = torch.randn(N_TOKENS, HIDDEN, generator=gen, dtype=torch.float64).to(dtype)
    weight = (torch.randn(vocab, HIDDEN, generator=gen, dtype=torch.float64) * 0.6).to(dtype)
    upstream = torch.randn(2, N_TOKENS, generator=gen, dtype=torch.float64)
    return logits, labels, hidden, weight, upstream


def _edge_labels(labels, vocab_local, world_size, valid_vocab):
    """Put labels on both sides of every shard boundary, at the last valid id and on an ignored id."""
    labels = labels.clone()
    edges = [r * vocab_local + d for r in range(1, world_size) for d in (-1, 0)] + [valid_vocab - 1, -100]
    labels[: len(edges)] = torch.tensor(edges)
    return labels.clamp(max=valid_vocab - 1).where(labels >= 0, labels)


def tp_worker(rank, world_size, seed, vocab_local, valid_vocab, dtype):
    """Every kernel on this rank's shard; the linear variant runs in vocab blocks of 128 columns."""
    vocab = vocab_local * world_size
    logits, labels, hidden, weight, upstream = make_problem(seed, vocab, dtype)
    labels = _edge_labels(labels, vocab_local, world_size, valid_vocab)
    cols = slice(rank * vocab_local, (rank + 1) * vocab_local)
    group = dist.group.WORLD
    calls = _log_collectives()
    out = {}

    leaf = logits[:, cols].clone().requires_grad_()
    logp, ent = token_logprobs(leaf, labels, temperature=TEMPERATURE, group=group, return_entropy=True,
                               valid_vocab_size=valid_vocab)
    out["calls_forward"] = list(calls)
    calls.clear()
    (logp.double() * upstream[0] + ent.double() * upstream[1]).sum().backward()
    out["calls_backward"] = list(calls)
    calls.clear()
    out.update(logp=logp, ent=ent, grad=leaf.grad)

    h, w = hidden.clone().requires_grad_(), weight[cols].clone().requires_grad_()
    lin_logp, lin_ent = linear_token_logprobs(h, w, labels, temperature=TEMPERATURE, group=group,
                                              return_entropy=True, valid_vocab_size=valid_vocab,
                                              workspace_bytes=N_TOKENS * 128 * h.element_size())
    out["linear_calls_forward"] = list(calls)
    calls.clear()
    (lin_logp.double() * upstream[0] + lin_ent.double() * upstream[1]).sum().backward()
    out["linear_calls_backward"] = list(calls)
    out.update(linear_logp=lin_logp.detach(), linear_ent=lin_ent.detach(), dhidden=h.grad, dweight=w.grad)
    return out


def _interpreter_broken_by_numpy() -> bool:
    """Triton < 3.7's interpreter calls int() on 1-element arrays, a TypeError from numpy 2.4 on
    (triton-lang/triton#9171): every kernel with a runtime loop bound fails there."""
    def major_minor(name):
        return tuple(int(part) for part in version(name).split(".")[:2])

    return major_minor("triton") < (3, 7) and major_minor("numpy") >= (2, 4)


@pytest.mark.skipif(_interpreter_broken_by_numpy(), reason="Triton's interpreter is broken by numpy >= 2.4 "
                    "before triton 3.7 (triton-lang/triton#9171); the workers run the kernels interpreted")
@pytest.mark.parametrize(
    "world_size,vocab_local,valid_vocab,dtype",
    [
        (2, 150, 300, torch.float32),
        (2, 140, 271, torch.bfloat16),
        (4, 130, 385, torch.float32),  # the last rank's shard is all padding
    ],
)
def test_vocab_parallel_matches_full_vocab(world_size, vocab_local, valid_vocab, dtype):
    seed = int.from_bytes(os.urandom(4), "little")
    print(f"random seed: {seed}")
    results = run_workers(tp_worker, world_size, seed, vocab_local, valid_vocab, dtype, timeout=180,
                          env={"TRITON_INTERPRET": "1"})
    logits, labels, hidden, weight, upstream = make_problem(seed, vocab_local * world_size, dtype)
    labels = _edge_labels(labels, vocab_local, world_size, valid_vocab)

    for rank, out in enumerate(results):
        assert out["calls_forward"] == ALL_GATHER, out["calls_forward"]
        assert out["calls_backward"] == [], out["calls_backward"]
        assert out["linear_calls_forward"] == ALL_GATHER, out["linear_calls_forward"]
        assert out["linear_calls_backward"] == ["all_reduce"], out["linear_calls_backward"]

    ref_leaf = logits.double().requires_grad_()
    ref_logp, ref_ent = ref_logprobs_entropy(ref_leaf, labels, TEMPERATURE, valid_vocab)
    (ref_logp * upstream[0] + ref_ent * upstream[1]).sum().backward()
    for rank, out in enumerate(results):
        assert_close(out["logp"], ref_logp, dtype, f"rank {rank} log-probs")
        assert_close(out["ent"], ref_ent, dtype, f"rank {rank} entropy")
    assert_close(torch.cat([out["grad"] for out in results], dim=1), ref_leaf.grad, dtype, "dlogits")

    h64, w64 = hidden.double().requires_grad_(), weight.double().requires_grad_()
    ref_logits = h64 @ w64.t()
    if dtype != torch.float32:
        ref_logits = ref_logits.to(dtype).double()
    ref_logp, ref_ent = ref_logprobs_entropy(ref_logits, labels, TEMPERATURE, valid_vocab)
    (ref_logp * upstream[0] + ref_ent * upstream[1]).sum().backward()
    for rank, out in enumerate(results):
        assert_close(out["linear_logp"], ref_logp, dtype, f"rank {rank} linear log-probs")
        assert_close(out["linear_ent"], ref_ent, dtype, f"rank {rank} linear entropy")
        assert_close(out["dhidden"], h64.grad, dtype, f"rank {rank} dhidden")
    assert_close(torch.cat([out["dweight"] for out in results]), w64.grad, dtype, "dweight")
