"""token_logprobs: values and gradients against the float64 reference, on the Triton path (compiled on a
GPU, interpreted on CPU) and on its plain-torch twin."""

from __future__ import annotations

import pytest
import torch

from megatron_rlvr.kernels import token_logprobs
from megatron_rlvr.kernels.backend import backend_name

from .reference import assert_close, random_logits, ref_logprobs_entropy


@pytest.fixture(params=["auto", "torch"])
def backend(request, monkeypatch):
    monkeypatch.setenv("MEGATRON_RLVR_KERNELS", request.param)
    return request.param


def _labels(shape, vocab, generator, device):
    labels = torch.randint(0, vocab, shape, generator=generator)
    flat = labels.view(-1)
    flat[0], flat[-1] = 0, vocab - 1  # both ends of the vocab
    return labels.to(device)


def _check(logits, labels, *, temperature, return_entropy, valid_vocab=None, generator=None):
    """Kernel vs reference on the values and on d(sum g_lp logp + g_H H)/dlogits."""
    dtype = logits.dtype
    leaf = logits.detach().clone().requires_grad_()
    out = token_logprobs(
        leaf, labels, temperature=temperature, return_entropy=return_entropy, valid_vocab_size=valid_vocab
    )
    logp, ent = out if return_entropy else (out, None)
    ref_leaf = logits.detach().double().requires_grad_()
    ref_logp, ref_ent = ref_logprobs_entropy(ref_leaf, labels, temperature, valid_vocab)

    assert logp.dtype == torch.float32 and logp.shape == labels.shape
    assert_close(logp, ref_logp, dtype, "log-probs")
    g_lp = torch.randn(labels.shape, generator=generator, dtype=torch.float64).to(logits.device)
    loss, ref_loss = (logp.double() * g_lp).sum(), (ref_logp * g_lp).sum()
    if return_entropy:
        assert ent.dtype == torch.float32 and ent.shape == labels.shape
        assert_close(ent, ref_ent, dtype, "entropy")
        g_ent = torch.randn(labels.shape, generator=generator, dtype=torch.float64).to(logits.device)
        loss, ref_loss = loss + (ent.double() * g_ent).sum(), ref_loss + (ref_ent * g_ent).sum()
    loss.backward()
    ref_loss.backward()
    assert leaf.grad.dtype == dtype
    assert_close(leaf.grad, ref_leaf.grad, dtype, "dlogits")


CASES = [
    # shape, vocab, dtype, temperature, return_entropy
    ((5,), 200, torch.float32, 1.0, True),
    ((3, 4), 129, torch.bfloat16, 0.7, True),
    ((6,), 100, torch.float16, 1.3, False),
    ((2, 3), 257, torch.float32, 0.6, False),
    ((4,), 33, torch.bfloat16, 1.0, False),
]


@pytest.mark.parametrize("shape,vocab,dtype,temperature,return_entropy", CASES)
def test_matches_reference(shape, vocab, dtype, temperature, return_entropy, backend, device, rng):
    logits = random_logits((*shape, vocab), dtype, device, rng)
    labels = _labels(shape, vocab, rng, device)
    if backend == "auto":
        assert backend_name(logits) in ("triton", "triton-interpreter")
    _check(logits, labels, temperature=temperature, return_entropy=return_entropy, generator=rng)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_padded_vocab_and_ignored_labels(dtype, backend, device, rng):
    """Columns >= valid_vocab_size count as -inf; labels there or negative give log-prob 0, no gradient."""
    vocab, valid = 150, 137
    logits = random_logits((6, vocab), dtype, device, rng)
    labels = _labels((6,), valid, rng, device)
    labels[1], labels[2], labels[3] = -100, valid, vocab - 1
    _check(logits, labels, temperature=0.9, return_entropy=True, valid_vocab=valid, generator=rng)


def test_minus_inf_logits_from_the_caller(backend, device, rng):
    """Logits already masked to -inf by the caller give finite results and zero gradient there."""
    logits = random_logits((4, 90), torch.float32, device, rng)
    logits[:, 80:] = float("-inf")
    labels = _labels((4,), 80, rng, device)
    _check(logits, labels, temperature=1.0, return_entropy=True, generator=rng)


def test_strided_rows_without_copy(backend, device, rng):
    """A `[:, :-1]` slice of `[B, S+1, V]` (rows not uniformly strided) gives the same values and grads."""
    full = random_logits((2, 5, 70), torch.float32, device, rng)
    labels = _labels((2, 4), 70, rng, device)
    _check(full[:, :-1], labels, temperature=1.1, return_entropy=True, generator=rng)


def test_entropy_only_loss(backend, device, rng):
    """When only the entropy reaches the loss, the log-prob term contributes no gradient."""
    logits = random_logits((5, 120), torch.float32, device, rng)
    labels = _labels((5,), 120, rng, device)
    leaf = logits.clone().requires_grad_()
    _, ent = token_logprobs(leaf, labels, return_entropy=True)
    ent.sum().backward()
    ref_leaf = logits.double().requires_grad_()
    ref_logprobs_entropy(ref_leaf, labels)[1].sum().backward()
    assert_close(leaf.grad, ref_leaf.grad, torch.float32, "dlogits of the entropy")


@pytest.mark.parametrize(
    "kwargs,error,match",
    [
        ({"logits_dtype": torch.float64}, TypeError, "dtype"),
        ({"labels_shape": (3,)}, ValueError, "labels shape"),
        ({"temperature": 0.0}, ValueError, "temperature"),
        ({"valid_vocab_size": 65}, ValueError, "valid_vocab_size"),
    ],
)
def test_clear_errors(kwargs, error, match, device):
    logits = torch.zeros((4, 64), dtype=kwargs.pop("logits_dtype", torch.float32), device=device)
    labels = torch.zeros(kwargs.pop("labels_shape", (4,)), dtype=torch.long, device=device)
    with pytest.raises(error, match=match):
        token_logprobs(logits, labels, **kwargs)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a GPU with > 10 GiB free (2^31+ logits)")
def test_more_than_2_to_the_31_logits(rng):
    """Rows past element 2^31 are addressed with int64 offsets: check the last rows, values and grads."""
    n_tokens, vocab = 16800, 128256  # 2.15e9 elements
    assert n_tokens * vocab > 2**31
    logits = torch.randn(n_tokens, vocab, device="cuda", dtype=torch.bfloat16)
    labels = torch.randint(0, vocab, (n_tokens,), device="cuda")
    logits.requires_grad_()
    logp, ent = token_logprobs(logits, labels, return_entropy=True)
    (logp + ent).sum().backward()
    tail = slice(n_tokens - 8, n_tokens)
    ref_leaf = logits.detach()[tail].double().requires_grad_()
    ref_logp, ref_ent = ref_logprobs_entropy(ref_leaf, labels[tail])
    (ref_logp + ref_ent).sum().backward()
    assert_close(logp[tail], ref_logp, torch.bfloat16, "log-probs of the last rows")
    assert_close(ent[tail], ref_ent, torch.bfloat16, "entropy of the last rows")
    assert_close(logits.grad[tail], ref_leaf.grad, torch.bfloat16, "dlogits of the last rows")
