"""fused_policy_loss against an unfused float64 reference built from plain torch ops and autograd."""

from __future__ import annotations

import pytest
import torch

from megatron_rlvr.kernels import fused_policy_loss

from .reference import assert_close, random_logits


def unfused_policy_loss(logits, labels, old_logp, ref_logp, advantages, mask, *, clip_low, clip_high, kl_kind,
                        kl_coef, entropy_coef, temperature):
    """The textbook computation in float64: full log-softmax, gather, ratio, clip, KL, entropy, mask."""
    logp_all = torch.log_softmax(logits.double() / temperature, dim=-1)
    logp = logp_all.gather(-1, labels.unsqueeze(-1)).squeeze(-1)
    p = logp_all.exp()
    entropy = -(p * torch.where(p > 0, logp_all, 0)).sum(-1)
    ratio = torch.exp(logp - old_logp.double())
    pg = torch.maximum(-advantages * ratio, -advantages * torch.clamp(ratio, 1 - clip_low, 1 + clip_high))
    log_r = ref_logp.double() - logp
    kl = {"k1": -log_r, "k2": log_r**2 / 2, "k3": torch.exp(log_r) - 1 - log_r}[kl_kind]
    loss = (pg + kl_coef * kl - entropy_coef * entropy) * mask
    clipped = (-advantages * torch.clamp(ratio, 1 - clip_low, 1 + clip_high) > -advantages * ratio) & mask.bool()
    return loss, {"logp": logp, "entropy": entropy, "ratio": ratio, "kl": kl, "clipped": clipped.double()}


@pytest.mark.parametrize(
    "dtype,kl_kind,kl_coef,entropy_coef,temperature",
    [
        (torch.float32, "k3", 0.1, 0.01, 1.0),
        (torch.float32, "k1", 0.05, 0.0, 0.8),
        (torch.bfloat16, "k2", 0.2, 0.02, 1.2),
    ],
)
def test_matches_unfused_reference(dtype, kl_kind, kl_coef, entropy_coef, temperature, device, rng):
    shape, vocab = (3, 5), 150
    logits = random_logits((*shape, vocab), dtype, device, rng)
    labels = torch.randint(0, vocab, shape, generator=rng).to(device)
    with torch.no_grad():
        true_logp = torch.log_softmax(logits.double() / temperature, -1).gather(-1, labels[..., None])[..., 0]
    # old/ref log-probs near the current ones, so some ratios land outside the clip range and some inside.
    old_logp = (true_logp + 0.3 * torch.randn(shape, generator=rng, dtype=torch.float64).to(device)).float()
    ref_logp = (true_logp + 0.5 * torch.randn(shape, generator=rng, dtype=torch.float64).to(device)).float()
    advantages = torch.randn(shape, generator=rng, dtype=torch.float64).to(device)
    mask = (torch.rand(shape, generator=rng) > 0.3).to(device)
    mask[0, 0], mask[0, 1], mask[-1, -1] = True, True, False
    # Pin one token outside the clip range (ratio 2, A > 0) and one inside (ratio 1).
    old_logp[0, 0], advantages[0, 0] = true_logp[0, 0] - 0.693, 1.0
    old_logp[0, 1] = true_logp[0, 1]
    old_logp[-1, -1] = -1e4  # a masked token whose ratio would overflow
    kwargs = dict(clip_low=0.2, clip_high=0.28, kl_kind=kl_kind, kl_coef=kl_coef, entropy_coef=entropy_coef,
                  temperature=temperature)

    leaf = logits.clone().requires_grad_()
    loss, stats = fused_policy_loss(leaf, labels, old_logp, ref_logp, advantages.float(), mask, **kwargs)
    ref_leaf = logits.double().requires_grad_()
    # The plain formula overflows on the masked extreme token (inf * 0): give the reference a finite value.
    ref_loss, ref_stats = unfused_policy_loss(ref_leaf, labels, torch.where(mask, old_logp, 0), ref_logp,
                                              advantages, mask.double(), **kwargs)
    upstream = torch.rand(shape, generator=rng, dtype=torch.float64).to(device)
    (loss.double() * upstream).sum().backward()
    (torch.where(mask, ref_loss, 0) * upstream).sum().backward()

    keep = mask.cpu()
    assert loss.dtype == torch.float32 and (loss.detach().cpu()[~keep] == 0).all()
    assert_close(loss, torch.where(mask, ref_loss, 0), dtype, "per-token loss")
    assert_close(leaf.grad, ref_leaf.grad, dtype, "dlogits")
    assert (leaf.grad[~mask] == 0).all(), "masked tokens must pass no gradient"
    for name in ("logp", "entropy"):
        assert_close(stats[name], ref_stats[name], dtype, name)
    for name in ("ratio", "kl"):
        assert_close(stats[name][mask], ref_stats[name][mask], dtype, name)
    assert torch.equal(stats["clipped"].cpu(), ref_stats["clipped"].float().cpu())
    assert 0 < stats["clipped"].sum() < mask.sum(), "the case should exercise both branches of the clip"


def test_kl_coef_needs_ref_logp(device):
    x = torch.zeros(2, 8, device=device)
    y = torch.zeros(2, dtype=torch.long, device=device)
    z = torch.zeros(2, device=device)
    with pytest.raises(ValueError, match="ref_logp"):
        fused_policy_loss(x, y, z, None, z, z.bool(), kl_coef=0.1)
