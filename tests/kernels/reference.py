"""Float64 plain-torch references for the kernel tests: the textbook formulas on the full vocab, with
autograd for the gradients, sharing no code with the kernels."""

from __future__ import annotations

import torch

# Tolerances on max |actual - expected| / max |expected|.
TOLERANCE = {torch.float32: 1e-5, torch.bfloat16: 1e-2, torch.float16: 1e-2}


def rel_err(actual: torch.Tensor, expected: torch.Tensor) -> float:
    actual, expected = actual.detach().double().cpu(), expected.detach().double().cpu()
    assert actual.shape == expected.shape, (actual.shape, expected.shape)
    assert torch.isfinite(actual).all(), "non-finite values in the kernel output"
    return ((actual - expected).abs().max() / expected.abs().max().clamp_min(1e-30)).item()


def assert_close(actual: torch.Tensor, expected: torch.Tensor, dtype: torch.dtype, what: str) -> None:
    err = rel_err(actual, expected)
    assert err <= TOLERANCE[dtype], f"{what}: relative error {err:.3g} > {TOLERANCE[dtype]:.0e} ({dtype})"


def ref_logprobs_entropy(
    logits: torch.Tensor, labels: torch.Tensor, temperature: float = 1.0, valid_vocab: int | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """log softmax(logits / T)[label] (0 for labels outside [0, valid_vocab)) and -sum p log p, float64,
    differentiable w.r.t. `logits` (full vocab, last dim)."""
    z = logits.double() / temperature
    if valid_vocab is not None:
        z = z.masked_fill(torch.arange(z.shape[-1], device=z.device) >= valid_vocab, float("-inf"))
    logp_all = torch.log_softmax(z, dim=-1)
    vocab = z.shape[-1] if valid_vocab is None else valid_vocab
    valid = (labels >= 0) & (labels < vocab)
    logp = logp_all.gather(-1, labels.clamp(0, vocab - 1).unsqueeze(-1)).squeeze(-1)
    logp = torch.where(valid, logp, torch.zeros_like(logp))
    p = logp_all.exp()
    entropy = -(p * torch.where(p > 0, logp_all, torch.zeros_like(logp_all))).sum(-1)
    return logp, entropy


def random_logits(shape, dtype, device, generator=None, scale: float = 3.0) -> torch.Tensor:
    """Logits with a spread like a trained LM head (a few large, many small), rounded to `dtype`."""
    base = torch.randn(shape, generator=generator, dtype=torch.float64) * scale
    return base.to(dtype).to(device)
