"""linear_token_logprobs against the float64 reference on `hidden @ weight.T`, gradients of hidden and
weight included, with workspaces small enough to force several vocab blocks, and token blocks too."""

from __future__ import annotations

import pytest
import torch

from megatron_rlvr.kernels import linear_token_logprobs
from megatron_rlvr.kernels.linear_logprobs import DEFAULT_WORKSPACE_BYTES, block_shape

from .reference import assert_close, ref_logprobs_entropy


def make_inputs(n_tokens, hidden_size, vocab, dtype, device, generator):
    hidden = torch.randn(n_tokens, hidden_size, generator=generator, dtype=torch.float64)
    weight = torch.randn(vocab, hidden_size, generator=generator, dtype=torch.float64) * (2.0 / hidden_size**0.5)
    labels = torch.randint(0, vocab, (n_tokens,), generator=generator)
    return hidden.to(dtype).to(device), weight.to(dtype).to(device), labels.to(device)


@pytest.mark.parametrize(
    "dtype,temperature,return_entropy,valid_vocab,block",
    [
        (torch.float32, 1.0, True, None, (11, 128)),  # vocab blocks of 128 columns over all tokens
        (torch.float32, 0.7, False, 290, (3, 128)),  # token and vocab blocks; padded vocab
        (torch.bfloat16, 1.3, True, None, (11, 300)),  # one block
    ],
)
def test_matches_reference(dtype, temperature, return_entropy, valid_vocab, block, device, rng):
    n_tokens, hidden_size, vocab = 11, 24, 300
    hidden, weight, labels = make_inputs(n_tokens, hidden_size, vocab, dtype, device, rng)
    labels[0] = -100
    workspace = block[0] * block[1] * hidden.element_size()
    assert block_shape(n_tokens, vocab, hidden.element_size(), workspace) == block
    h, w = hidden.clone().requires_grad_(), weight.clone().requires_grad_()
    out = linear_token_logprobs(h, w, labels, temperature=temperature, return_entropy=return_entropy,
                                valid_vocab_size=valid_vocab, workspace_bytes=workspace)
    logp, ent = out if return_entropy else (out, None)

    h64, w64 = hidden.double().requires_grad_(), weight.double().requires_grad_()
    # A bf16 kernel rounds the logits it forms to bf16, as megatron's output layer does.
    ref_logits = (h64 @ w64.t()).to(dtype).double() if dtype != torch.float32 else h64 @ w64.t()
    ref_logp, ref_ent = ref_logprobs_entropy(ref_logits, labels, temperature, valid_vocab)
    g_lp = torch.randn(n_tokens, generator=rng, dtype=torch.float64).to(device)
    g_ent = torch.randn(n_tokens, generator=rng, dtype=torch.float64).to(device)
    loss, ref_loss = (logp.double() * g_lp).sum(), (ref_logp * g_lp).sum()
    if return_entropy:
        loss, ref_loss = loss + (ent.double() * g_ent).sum(), ref_loss + (ref_ent * g_ent).sum()
        assert_close(ent, ref_ent, dtype, "entropy")
    assert_close(logp, ref_logp, dtype, "log-probs")
    loss.backward()
    ref_loss.backward()
    assert h.grad.dtype == w.grad.dtype == dtype
    assert_close(h.grad, h64.grad, dtype, "dhidden")
    assert_close(w.grad, w64.grad, dtype, "dweight")


def test_default_workspace_blocks_for_llama3_vocab():
    """T=16384, V=128256, bf16: 16 vocab blocks of 8192 columns over all tokens, 256 MiB."""
    tokens, columns = block_shape(16384, 128256, 2, DEFAULT_WORKSPACE_BYTES)
    assert (tokens, columns) == (16384, 8192)
    assert tokens * columns * 2 <= DEFAULT_WORKSPACE_BYTES < 2**30
    # Past ~1M tokens the block keeps 128 columns and takes fewer tokens.
    assert block_shape(2**21, 128256, 2, DEFAULT_WORKSPACE_BYTES) == (2**20, 128)


def test_frozen_weight_gives_only_dhidden(device, rng):
    hidden, weight, labels = make_inputs(6, 16, 70, torch.float32, device, rng)
    h = hidden.clone().requires_grad_()
    logp = linear_token_logprobs(h.view(2, 3, 16), weight, labels.view(2, 3), workspace_bytes=2 * 70 * 4)
    assert logp.shape == (2, 3)
    logp.sum().backward()
    h64 = hidden.double().requires_grad_()
    ref_logprobs_entropy(h64 @ weight.double().t(), labels)[0].sum().backward()
    assert_close(h.grad, h64.grad, torch.float32, "dhidden")


def test_shape_mismatch_is_reported(device):
    hidden = torch.zeros(4, 16, device=device)
    with pytest.raises(ValueError, match=r"weight shape \(70, 8\)"):
        linear_token_logprobs(hidden, torch.zeros(70, 8, device=device), torch.zeros(4, dtype=torch.long, device=device))
