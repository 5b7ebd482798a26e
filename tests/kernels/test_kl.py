"""kl_estimate: k1/k2/k3 values and gradients against the hand-derived formulas (kl.py docstring)."""

from __future__ import annotations

import pytest
import torch

from megatron_rlvr.kernels import kl_estimate

from .reference import assert_close

# kind -> (value(d), d value / d logp) with d = logp - ref_logp
FORMULAS = {
    "k1": (lambda d: d, lambda d: torch.ones_like(d)),
    "k2": (lambda d: d * d / 2, lambda d: d),
    "k3": (lambda d: torch.exp(-d) - 1 + d, lambda d: 1 - torch.exp(-d)),
}


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("kind", sorted(FORMULAS))
def test_values_and_grads(kind, dtype, device, rng):
    logp = (-torch.rand(64, generator=rng, dtype=torch.float64) * 5).to(device)
    ref = (logp + torch.randn(64, generator=rng, dtype=torch.float64).to(device)).to(dtype)
    logp = logp.to(dtype).requires_grad_()
    upstream = torch.randn(64, generator=rng, dtype=torch.float64).to(device)
    kl = kl_estimate(logp, ref, kind)
    (kl.double() * upstream).sum().backward()
    value, grad = FORMULAS[kind]
    d = logp.detach().double() - ref.double()
    tolerance_dtype = torch.float32  # the tightest tolerance in the suite, also for the fp64 inputs
    assert_close(kl, value(d), tolerance_dtype, f"{kind} value")
    assert_close(logp.grad, upstream * grad(d), tolerance_dtype, f"{kind} gradient")
    if kind != "k1":
        assert (kl >= 0).all()


def test_k3_keeps_precision_near_zero(device):
    """For |d| ~ 1e-5..1e-4, fp32 k3 ~ d^2/2 keeps ~2 digits (naive fp32 exp(r) - 1 - r is off by 100x)."""
    d = torch.tensor([1e-4, -3e-4, 2e-5], dtype=torch.float64)
    ref = torch.full_like(d, -2.0)
    kl = kl_estimate((ref + d).float().to(device), ref.float().to(device), "k3")
    d32 = (ref + d).float().double() - ref.float().double()
    expected = torch.exp(-d32) - 1 + d32
    assert ((kl.double().cpu() - expected).abs() / expected).max() < 1e-2


def test_unknown_kind_names_the_known_ones(device):
    x = torch.zeros(3, device=device)
    with pytest.raises(ValueError, match="k1, k2, k3"):
        kl_estimate(x, x, "k4")
