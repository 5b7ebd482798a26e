"""Policy and value losses: hand-computed values, and gradients w.r.t. log-probs against autograd of the
textbook formulas written out here independently (float64, random inputs)."""

import math

import pytest
import torch

from megatron_rlvr.algorithms import (
    POLICY_LOSSES,
    aggregate_loss,
    clipped_value_loss,
    get_policy_loss,
    ppo_policy_loss,
    rollout_correction,
)

D = torch.float64

# Five tokens in two rows (3 + 2, one padded slot holding junk): ratios and advantages chosen so each clip
# branch is hit once.  clip_low = 0.2, clip_high = 0.28 (DAPO clip-higher), dual clip c = 3.
#   tok  ratio  A    -A*r    -A*clip(r)   max       dual-clip min(., -c*A)
#   0    1.5    +1   -1.5    -1.28        -1.28     (A > 0, unchanged)
#   1    0.5    +1   -0.5    -0.8         -0.5
#   2    1.1    -1    1.1     1.1          1.1       1.1
#   3    0.7    -1    0.7     0.8          0.8       0.8
#   4    5.0    -1    5.0     1.28         5.0       3.0
RATIOS = torch.tensor([[1.5, 0.5, 1.1], [0.7, 5.0, 100.0]], dtype=D)
ADV = torch.tensor([[1.0, 1.0, -1.0], [-1.0, -1.0, 1.0]], dtype=D)
MASK = torch.tensor([[1, 1, 1], [1, 1, 0]], dtype=D)
OLD = torch.tensor([[-1.0, -2.0, -0.5], [-3.0, -2.5, -1.0]], dtype=D)
LOGP = OLD + RATIOS.log()
CLIP = {"clip_low": 0.2, "clip_high": 0.28}


def test_ppo_clip_higher_by_hand():
    loss, stats = ppo_policy_loss(LOGP, OLD, ADV, MASK, **CLIP)
    assert loss.item() == pytest.approx((-1.28 - 0.5 + 1.1 + 0.8 + 5.0) / 5)
    assert stats["pg_clipfrac"].item() == pytest.approx(2 / 5)  # tokens 0 and 3
    kl = -sum(math.log(r) for r in (1.5, 0.5, 1.1, 0.7, 5.0)) / 5
    assert stats["ppo_kl"].item() == pytest.approx(kl)
    assert "pg_clipfrac_lower" not in stats


def test_ppo_dual_clip_by_hand():
    loss, stats = ppo_policy_loss(LOGP, OLD, ADV, MASK, clip_c=3.0, **CLIP)
    assert loss.item() == pytest.approx((-1.28 - 0.5 + 1.1 + 0.8 + 3.0) / 5)
    assert stats["pg_clipfrac_lower"].item() == pytest.approx(1 / 5)  # token 4


@pytest.mark.parametrize(
    "mode,constant,expected",
    [
        ("seq-mean-token-mean", None, ((-1.28 - 0.5 + 1.1) / 3 + (0.8 + 3.0) / 2) / 2),
        ("seq-mean-token-sum-norm", None, 3.12 / (2 * 3)),  # C defaults to T = 3
        ("seq-mean-token-sum-norm", 4.0, 3.12 / (2 * 4)),
    ],
)
def test_ppo_aggregation_modes_by_hand(mode, constant, expected):
    loss, _ = ppo_policy_loss(LOGP, OLD, ADV, MASK, clip_c=3.0, loss_agg_mode=mode, norm_constant=constant, **CLIP)
    assert loss.item() == pytest.approx(expected)


def test_ppo_truncated_importance_sampling_by_hand():
    # exp(old - rollout) = (2, .5, 1, 1, 1) capped at C = 1.5 -> w = (1.5, .5, 1, 1, 1)
    rollout = OLD - torch.tensor([[2.0, 0.5, 1.0], [1.0, 1.0, 1.0]], dtype=D).log()
    rollout.requires_grad_(True)
    weight, stats = rollout_correction(OLD, rollout, MASK, kind="tis", cap=1.5)
    loss, _ = ppo_policy_loss(LOGP, OLD, ADV, MASK, clip_c=3.0, token_weight=weight, **CLIP)
    assert loss.item() == pytest.approx((-1.28 * 1.5 - 0.5 * 0.5 + 1.1 + 0.8 + 3.0) / 5)
    assert stats["is_weight_mean"].item() == pytest.approx((1.5 + 0.5 + 3) / 5)
    assert stats["masked_fraction"].item() == 0
    assert not loss.requires_grad  # the weight is detached: no gradient reaches the rollout log-probs


def test_masked_importance_sampling_by_hand():
    # rho = (1.9, .55, 1 | 1.25, 4, junk) with C = 2: the band [0.5, 2] keeps tokens 0-3 and masks token 4
    rho = torch.tensor([[1.9, 0.55, 1.0], [1.25, 4.0, 9.0]], dtype=D)
    rollout = OLD - rho.log()
    weight, stats = rollout_correction(OLD, rollout, MASK, kind="mis", cap=2.0)
    torch.testing.assert_close(weight, torch.tensor([[1.0, 1.0, 1.0], [1.0, 0.0, 0.0]], dtype=D))
    assert stats["masked_fraction"].item() == pytest.approx(1 / 5)
    assert stats["is_weight_mean"].item() == pytest.approx(4 / 5)
    diff = sum(abs(math.log(r)) for r in (1.9, 0.55, 1.0, 1.25, 4.0)) / 5
    assert stats["logprob_abs_diff"].item() == pytest.approx(diff)
    # sequence level: row 0's product is 1.045 (kept whole), row 1's is 5 > C (masked whole); padding stays 0
    weight, stats = rollout_correction(OLD, rollout, MASK, kind="mis", cap=2.0, level="sequence")
    torch.testing.assert_close(weight, torch.tensor([[1.0, 1.0, 1.0], [0.0, 0.0, 0.0]], dtype=D))
    assert stats["masked_fraction"].item() == pytest.approx(2 / 5)
    # none: weight 1 on response tokens, the raw ratio reported as a diagnostic
    weight, stats = rollout_correction(OLD, rollout, MASK, kind="none", cap=2.0)
    torch.testing.assert_close(weight, MASK)
    assert stats["is_weight_mean"].item() == pytest.approx((1.9 + 0.55 + 1 + 1.25 + 4) / 5)
    # a masked token's loss is gone, the normaliser (5 tokens) unchanged
    weight, _ = rollout_correction(OLD, rollout, MASK, kind="mis", cap=2.0)
    loss, _ = ppo_policy_loss(LOGP, OLD, ADV, MASK, token_weight=weight, **CLIP)
    assert loss.item() == pytest.approx((-1.28 - 0.5 + 1.1 + 0.8) / 5)


def reference_policy_loss(logp, old, adv, mask, lo, hi, c, weight, mode, constant):
    """Textbook PPO objective (maximisation form) turned into a loss, written independently of the package."""
    ratio = torch.exp(logp - old)
    surrogate = torch.min(ratio * adv, torch.clamp(ratio, 1 - lo, 1 + hi) * adv)
    surrogate = torch.where(adv < 0, torch.max(surrogate, c * adv), surrogate)
    token_loss = -surrogate * weight
    if mode == "token-mean":
        return (token_loss * mask).sum() / mask.sum()
    if mode == "seq-mean-token-mean":
        rows = [(token_loss[i] * mask[i]).sum() / mask[i].sum() for i in range(mask.shape[0])]
        return torch.stack(rows).mean()
    return (token_loss * mask).sum() / (mask.shape[0] * constant)


@pytest.mark.parametrize("mode", ["token-mean", "seq-mean-token-mean", "seq-mean-token-sum-norm"])
def test_ppo_gradient_matches_reference_formula(mode):
    gen = torch.Generator().manual_seed(0)
    b, n = 4, 7
    old = -torch.rand(b, n, generator=gen, dtype=D) * 3
    rollout = old + 0.3 * torch.randn(b, n, generator=gen, dtype=D)
    adv = torch.randn(b, n, generator=gen, dtype=D)
    lengths = torch.tensor([7, 5, 1, 3])
    mask = (torch.arange(n) < lengths[:, None]).to(D)
    # ratios spread over [0.3, 3.3] so the low, high and dual clips are all active somewhere
    logp = (old + torch.log(0.3 + 3 * torch.rand(b, n, generator=gen, dtype=D))).requires_grad_(True)
    cfg = dict(clip_low=0.2, clip_high=0.28, clip_c=2.0, norm_constant=9.0)

    weight, _ = rollout_correction(old, rollout, mask, kind="tis", cap=1.2)
    loss, _ = ppo_policy_loss(logp, old, adv, mask, token_weight=weight, loss_agg_mode=mode, **cfg)
    (grad,) = torch.autograd.grad(loss, logp)

    ref_logp = logp.detach().clone().requires_grad_(True)
    weight = torch.clamp(torch.exp(old - rollout), max=1.2)
    ref = reference_policy_loss(ref_logp, old, adv, mask, 0.2, 0.28, 2.0, weight, mode, 9.0)
    (ref_grad,) = torch.autograd.grad(ref, ref_logp)
    torch.testing.assert_close(loss, ref, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(grad, ref_grad, rtol=1e-12, atol=1e-12)
    assert grad[mask == 0].abs().max() == 0
    assert grad[mask == 1].abs().max() > 0


def test_value_loss_by_hand():
    values = torch.tensor([[1.5, 0.0, 2.0, 5.0]], dtype=D)
    old = torch.tensor([[1.0, 0.0, 1.0, 0.0]], dtype=D)
    returns = torch.tensor([[2.0, 1.0, 0.0, 0.0]], dtype=D)
    mask = torch.tensor([[1, 1, 1, 0]], dtype=D)
    loss, stats = clipped_value_loss(values, old, returns, mask, clip_range=0.2)
    # tok 0: clipped V 1.2, max(.25, .64) -> .32;  tok 1: max(1, 1) -> .5;  tok 2: clipped 1.2, max(4, 1.44) -> 2
    assert loss.item() == pytest.approx((0.32 + 0.5 + 2.0) / 3)
    assert stats["vf_clipfrac"].item() == pytest.approx(1 / 3)


def test_value_loss_gradient_matches_reference_formula():
    gen = torch.Generator().manual_seed(1)
    old = torch.randn(3, 5, generator=gen, dtype=D)
    values = (old + 0.4 * torch.randn(3, 5, generator=gen, dtype=D)).requires_grad_(True)
    returns = torch.randn(3, 5, generator=gen, dtype=D)
    mask = torch.tensor([[1, 1, 1, 1, 1], [1, 1, 0, 0, 0], [1, 1, 1, 1, 0]], dtype=D)
    loss, _ = clipped_value_loss(values, old, returns, mask, clip_range=0.2)
    (grad,) = torch.autograd.grad(loss, values)

    v = values.detach().clone().requires_grad_(True)
    clipped = torch.max(torch.min(v, old + 0.2), old - 0.2)
    ref = (0.5 * torch.max((v - returns) ** 2, (clipped - returns) ** 2) * mask).sum() / mask.sum()
    (ref_grad,) = torch.autograd.grad(ref, v)
    torch.testing.assert_close(grad, ref_grad, rtol=1e-12, atol=1e-12)


def test_policy_loss_registry_and_errors():
    assert get_policy_loss("ppo") is ppo_policy_loss
    with pytest.raises(ValueError, match="unknown policy loss 'ppo3'; known: ppo"):
        get_policy_loss("ppo3")
    with pytest.raises(ValueError, match="policy loss 'ppo' is already registered"):
        POLICY_LOSSES.register("ppo")(lambda: None)
    with pytest.raises(ValueError, match="clip_c must be > 1"):
        ppo_policy_loss(LOGP, OLD, ADV, MASK, clip_c=0.5)
    with pytest.raises(ValueError, match="cap C must be > 1"):
        rollout_correction(OLD, OLD, MASK, kind="mis", cap=1.0)
    with pytest.raises(ValueError, match="'is' is not one of none, tis, mis"):
        rollout_correction(OLD, OLD, MASK, kind="is", cap=2.0)
    with pytest.raises(ValueError, match="unknown loss aggregation mode 'mean'; known: token-mean"):
        aggregate_loss(ADV, MASK, "mean")


@pytest.mark.parametrize("mode", ["token-mean", "seq-mean-token-mean", "seq-mean-token-sum-norm"])
def test_micro_batches_with_global_denominator_match_the_full_batch(mode):
    """Split 4 sequences into micro-batches of 1 and 3: with the summed denominator, the summed losses and
    gradients equal those of the whole batch (what data-parallel / micro-batched training needs)."""
    from megatron_rlvr.algorithms import loss_denominator

    gen = torch.Generator().manual_seed(3)
    old = -torch.rand(4, 6, generator=gen, dtype=D)
    adv = torch.randn(4, 6, generator=gen, dtype=D)
    mask = (torch.arange(6) < torch.tensor([6, 2, 4, 1])[:, None]).to(D)
    logp = (old + 0.3 * torch.randn(4, 6, generator=gen, dtype=D)).requires_grad_(True)
    cfg = dict(clip_c=3.0, loss_agg_mode=mode, norm_constant=8.0)

    full, _ = ppo_policy_loss(logp, old, adv, mask, **cfg)
    (full_grad,) = torch.autograd.grad(full, logp)
    parts = [slice(0, 1), slice(1, 4)]
    total = sum(loss_denominator(mask[s], mode, 8.0) for s in parts)
    split = sum(ppo_policy_loss(logp[s], old[s], adv[s], mask[s], loss_denominator=total, **cfg)[0] for s in parts)
    (split_grad,) = torch.autograd.grad(split, logp)
    torch.testing.assert_close(split, full, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(split_grad, full_grad, rtol=1e-12, atol=1e-12)
