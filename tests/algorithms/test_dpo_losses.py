"""The registered DPO losses against hand-computed values and a float64 reference (values and gradients).

The reference is written independently of the module, per pair, in float64 Python arithmetic; its gradients are
central differences (step 1e-6, error ~1e-9). Tolerances: float64 inputs 1e-9 (values) / 1e-6 (gradients), float32
inputs 2e-5 relative."""

import math

import pytest
import torch

from megatron_rlvr.algorithms.dpo import DPO_LOSSES, PairLogps, get_dpo_loss


def _log1pexp(x: float) -> float:
    return math.log1p(math.exp(x)) if x < 30 else x


def _bt(h: float, e: float) -> float:
    """-(1-e) log sigmoid(h) - e log sigmoid(-h), in float64."""
    return (1 - e) * _log1pexp(-h) + e * _log1pexp(h)


def reference_loss(name, pc, pr, rc, rr, nc, nr, beta, e, gamma_ratio):
    """One pair's loss in float64 Python arithmetic (p*: policy sums, r*: reference sums, n*: token counts)."""
    if name == "sigmoid":
        return _bt(beta * ((pc - rc) - (pr - rr)), e)
    if name == "dpo_norm":
        return _bt(beta * ((pc / nc - rc / nc) - (pr / nr - rr / nr)), e)
    if name == "ipo":
        return ((pc / nc - rc / nc) - (pr / nr - rr / nr) - 1 / (2 * beta)) ** 2
    if name == "simpo":
        return _bt(beta * (pc / nc - pr / nr) - beta * gamma_ratio, e)
    raise AssertionError(name)


def _pair(pc, pr, rc, rr, nc, nr, dtype=torch.float64):
    t = lambda v: torch.tensor(v, dtype=dtype)  # noqa: E731
    return PairLogps(t(pc), t(pr), t(nc), t(nr)), PairLogps(t(rc), t(rr), t(nc), t(nr))


def test_registered_names():
    assert DPO_LOSSES.names() == ["dpo_norm", "ipo", "sigmoid", "simpo"]
    with pytest.raises(ValueError, match="known: dpo_norm, ipo, sigmoid, simpo"):
        get_dpo_loss("kto")


# policy sums: chosen -10 over 4 tokens, rejected -12 over 2; reference sums -11 and -11
HAND = [
    # sigmoid, beta 0.1: h = 0.1 * ((-10 + 11) - (-12 + 11)) = 0.2, L = log(1 + e^-0.2); rewards 0.1, -0.1
    ("sigmoid", 0.1, 0.0, 0.0, 0.5981388693815918, 0.1, -0.1),
    # cDPO, e = 0.1: 0.9 log(1 + e^-0.2) + 0.1 log(1 + e^0.2)
    ("sigmoid", 0.1, 0.1, 0.0, 0.6181388693815918, 0.1, -0.1),
    # dpo_norm, beta 5: averages -2.5/-6 vs -2.75/-5.5: r_w = 5 * 0.25, r_l = 5 * -0.5, h = 3.75
    ("dpo_norm", 5.0, 0.0, 0.0, 0.02324546437242503, 1.25, -2.5),
    # ipo, beta 0.5: h = 0.25 - (-0.5) = 0.75, L = (0.75 - 1)^2; rewards 0.5 * 0.25, 0.5 * -0.5
    ("ipo", 0.5, 0.0, 0.0, 0.0625, 0.125, -0.25),
    # simpo, beta 2, gamma/beta 0.5: r_w = 2 * -2.5, r_l = 2 * -6, h = -5 + 12 - 1 = 6
    ("simpo", 2.0, 0.0, 0.5, 0.0024756851377304495, -5.0, -12.0),
]


@pytest.mark.parametrize("name,beta,e,gamma,want,want_chosen,want_rejected", HAND,
                         ids=[f"{h[0]}-ls{h[2]}" for h in HAND])
def test_hand_computed(name, beta, e, gamma, want, want_chosen, want_rejected):
    policy, reference = _pair(-10.0, -12.0, -11.0, -11.0, 4.0, 2.0)
    loss, chosen, rejected = get_dpo_loss(name)(policy, reference, beta=beta, label_smoothing=e,
                                                gamma_beta_ratio=gamma)
    assert loss.item() == pytest.approx(want, abs=1e-12)
    assert chosen.item() == pytest.approx(want_chosen, abs=1e-12)
    assert rejected.item() == pytest.approx(want_rejected, abs=1e-12)


@pytest.mark.parametrize("name", ["sigmoid", "dpo_norm", "ipo", "simpo"])
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32], ids=["fp64", "fp32"])
def test_random_values_and_gradients(name, dtype):
    gen = torch.Generator().manual_seed(11)
    pairs = 16
    nc = torch.randint(1, 40, (pairs,), generator=gen).double()
    nr = torch.randint(1, 40, (pairs,), generator=gen).double()
    # summed log-probs of about -1 per token, reference near the policy
    pc, pr = -nc * torch.rand(pairs, generator=gen).double() * 2, -nr * torch.rand(pairs, generator=gen).double() * 2
    rc = pc + torch.randn(pairs, generator=gen).double()
    rr = pr + torch.randn(pairs, generator=gen).double()
    beta, e, gamma = 0.7, 0.05, 0.3
    inputs = [x.to(dtype).requires_grad_(True) for x in (pc, pr)]
    policy = PairLogps(inputs[0], inputs[1], nc.to(dtype), nr.to(dtype))
    reference = PairLogps(rc.to(dtype), rr.to(dtype), nc.to(dtype), nr.to(dtype))
    losses, _, _ = get_dpo_loss(name)(policy, reference, beta=beta, label_smoothing=e, gamma_beta_ratio=gamma)
    losses.mean().backward()

    ref_values, ref_grads = [], torch.zeros(2, pairs, dtype=torch.float64)
    step = 1e-6
    for i in range(pairs):
        args = [pc[i].item(), pr[i].item(), rc[i].item(), rr[i].item(), nc[i].item(), nr[i].item()]
        ref_values.append(reference_loss(name, *args, beta, e, gamma))
        for which in range(2):
            up, down = list(args), list(args)
            up[which] += step
            down[which] -= step
            ref_grads[which, i] = (reference_loss(name, *up, beta, e, gamma)
                                   - reference_loss(name, *down, beta, e, gamma)) / (2 * step) / pairs
    tol = dict(rtol=1e-9, atol=1e-9) if dtype == torch.float64 else dict(rtol=2e-5, atol=2e-6)
    torch.testing.assert_close(losses.double(), torch.tensor(ref_values, dtype=torch.float64), **tol)
    gtol = dict(rtol=1e-6, atol=1e-8) if dtype == torch.float64 else dict(rtol=2e-5, atol=2e-6)
    for which in range(2):
        torch.testing.assert_close(inputs[which].grad.double(), ref_grads[which], **gtol)
    assert ref_grads.abs().max() > 1e-4, "gradients this small would prove nothing"


def test_simpo_ignores_the_reference():
    policy, reference = _pair(-10.0, -12.0, -11.0, -11.0, 4.0, 2.0)
    with_ref = get_dpo_loss("simpo")(policy, reference, beta=2.0, gamma_beta_ratio=0.5)
    without = get_dpo_loss("simpo")(policy, None, beta=2.0, gamma_beta_ratio=0.5)
    assert torch.equal(with_ref[0], without[0])
