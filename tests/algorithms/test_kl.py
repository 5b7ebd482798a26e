"""KL regularisation: reward penalty and loss term on top of `megatron_rlvr.kernels.kl_estimate`, and the
fixed / adaptive coefficient controllers."""

import pytest
import torch

from megatron_rlvr.algorithms import AdaptiveKLController, FixedKLController, kl_loss, kl_reward_penalty
from megatron_rlvr.algorithms import make_kl_controller

D = torch.float64


def test_k1_reward_penalty_tulu3_by_hand():
    logp = torch.tensor([[-1.0, -2.0, -0.1], [-0.5, -3.0, -9.0]], dtype=D)
    ref = torch.tensor([[-1.5, -1.0, -0.1], [-0.5, -2.0, -1.0]], dtype=D)
    mask = torch.tensor([[1, 1, 1], [1, 1, 0]], dtype=D)
    rewards = torch.tensor([[0.0, 0.0, 1.0], [0.0, 1.0, 0.0]], dtype=D)
    # k1 = logp - ref = (.5, -1, 0 | 0, -1, pad);  r - .05 * k1
    shaped, stats = kl_reward_penalty(rewards, logp, ref, mask, beta=0.05, kind="k1")
    torch.testing.assert_close(shaped, torch.tensor([[-0.025, 0.05, 1.0], [0.0, 1.05, 0.0]], dtype=D))
    assert stats["kl"].item() == pytest.approx(-1.5 / 5)
    assert stats["kl_seq"].item() == pytest.approx((-0.5 + -1.0) / 2)


def test_kl_reward_penalty_carries_no_gradient():
    logp = torch.randn(2, 4, dtype=D, requires_grad=True)
    shaped, _ = kl_reward_penalty(torch.zeros(2, 4, dtype=D), logp, torch.randn(2, 4, dtype=D),
                                  torch.ones(2, 4, dtype=D), beta=0.1)
    assert not shaped.requires_grad


@pytest.mark.parametrize("kind", ["k1", "k2", "k3"])
def test_kl_loss_value_and_gradient_match_reference(kind):
    gen = torch.Generator().manual_seed(2)
    logp = (-3 * torch.rand(3, 6, generator=gen, dtype=D)).requires_grad_(True)
    ref = logp.detach() + 0.5 * torch.randn(3, 6, generator=gen, dtype=D)
    mask = torch.tensor([[1] * 6, [1, 1, 1, 0, 0, 0], [1, 0, 0, 0, 0, 0]], dtype=D)
    loss, stats = kl_loss(logp, ref, mask, kind=kind)
    (grad,) = torch.autograd.grad(loss, logp)

    lp = logp.detach().clone().requires_grad_(True)
    x = ref - lp
    per_token = {"k1": -x, "k2": x ** 2 / 2, "k3": torch.exp(x) - 1 - x}[kind]
    expected = (per_token * mask).sum() / mask.sum()
    (expected_grad,) = torch.autograd.grad(expected, lp)
    torch.testing.assert_close(loss, expected, rtol=1e-10, atol=1e-10)
    torch.testing.assert_close(grad, expected_grad, rtol=1e-10, atol=1e-10)
    assert stats["kl"].item() == pytest.approx(expected.item())


def test_adaptive_controller_by_hand():
    ctl = AdaptiveKLController(0.1, target_kl=6.0, horizon=10000)
    ctl.update(current_kl=12.0, n_steps=256)  # error clipped to +0.2: 0.1 * (1 + .2 * 256 / 10000)
    assert ctl.value == pytest.approx(0.1 * 1.00512)
    ctl.update(current_kl=6.6, n_steps=1000)  # error +0.1: * (1 + .1 * .1)
    assert ctl.value == pytest.approx(0.1 * 1.00512 * 1.01)
    ctl.update(current_kl=0.0, n_steps=5000)  # error clipped to -0.2: * (1 - .2 * .5)
    assert ctl.value == pytest.approx(0.1 * 1.00512 * 1.01 * 0.9)

    resumed = AdaptiveKLController(0.1, target_kl=6.0, horizon=10000)
    resumed.load_state_dict(ctl.state_dict())
    assert resumed.value == ctl.value


def test_fixed_controller_and_factory():
    ctl = make_kl_controller(0.05)
    assert type(ctl) is FixedKLController
    ctl.update(current_kl=100.0, n_steps=10)
    assert ctl.value == 0.05
    assert isinstance(make_kl_controller(0.05, target_kl=3.0), AdaptiveKLController)
    with pytest.raises(ValueError, match="target_kl > 0"):
        AdaptiveKLController(0.1, target_kl=0.0, horizon=10)
