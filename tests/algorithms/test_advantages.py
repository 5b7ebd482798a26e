"""Advantage estimators against values worked out by hand (derivations in the comments)."""

import math

import pytest
import torch

from megatron_rlvr.algorithms import ADVANTAGE_ESTIMATORS, compute_advantages, get_advantage_estimator

D = torch.float64


def t(rows):
    return torch.tensor(rows, dtype=D)


def whiten_reference(values):
    """(x - mean) / std over a flat list, std Bessel-corrected, computed independently of the package."""
    n = len(values)
    mean = sum(values) / n
    std = math.sqrt(sum((v - mean) ** 2 for v in values) / (n - 1))
    return [(v - mean) / std for v in values]


# Two responses of 3 and 2 tokens (row 1 right-padded); the padded slot holds junk that must be ignored.
REWARDS = t([[0.0, 0.0, 1.0], [0.0, 2.0, 7.0]])
MASK = t([[1, 1, 1], [1, 1, 0]])


def test_gae_by_hand_with_padding():
    values = t([[1.0, 2.0, 3.0], [0.5, 1.0, 9.0]])
    adv, ret = compute_advantages("gae", REWARDS, MASK, values=values, gamma=0.5, lam=0.5, whiten=False)
    # row 0: d2 = 1 - 3 = -2;  d1 = 0 + .5*3 - 2 = -.5, A1 = -.5 + .25*-2 = -1;  d0 = .5*2 - 1 = 0, A0 = -.25
    # row 1 (pad value 9 and pad reward 7 ignored): d1 = 2 - 1 = 1;  d0 = .5*1 - .5 = 0, A0 = .25*1 = .25
    torch.testing.assert_close(adv, t([[-0.25, -1.0, -2.0], [0.25, 1.0, 0.0]]))
    torch.testing.assert_close(ret, t([[0.75, 1.0, 1.0], [0.75, 2.0, 0.0]]))


def test_gae_skips_interior_masked_tokens():
    rewards = t([[0.0, 5.0, 1.0]])
    values = t([[1.0, 7.0, 3.0]])
    adv, _ = compute_advantages("gae", rewards, t([[1, 0, 1]]), values=values, gamma=0.5, lam=0.5, whiten=False)
    # token 1 is not the policy's: A2 = 1 - 3 = -2; d0 = .5*V2 - V0 = .5, A0 = .5 + .25*-2 = 0
    torch.testing.assert_close(adv, t([[0.0, 0.0, -2.0]]))


def reference_gae(rewards, values, mask, gamma, lam):
    """Textbook GAE per row over the row's unmasked tokens only, in plain Python."""
    adv = torch.zeros_like(rewards)
    for i in range(rewards.shape[0]):
        idx = mask[i].nonzero().flatten().tolist()
        running = 0.0
        for k in reversed(range(len(idx))):
            next_value = values[i, idx[k + 1]].item() if k + 1 < len(idx) else 0.0
            delta = rewards[i, idx[k]].item() + gamma * next_value - values[i, idx[k]].item()
            running = delta + gamma * lam * running
            adv[i, idx[k]] = running
    return adv


def test_gae_matches_reference_on_random_masks():
    gen = torch.Generator().manual_seed(0)
    rewards = torch.randn(5, 9, generator=gen, dtype=D)
    values = torch.randn(5, 9, generator=gen, dtype=D)
    mask = (torch.rand(5, 9, generator=gen) < 0.7).to(D)  # holes anywhere, like spliced tool output
    mask[3] = 0  # an empty response
    adv, ret = compute_advantages("gae", rewards, mask, values=values, gamma=0.9, lam=0.8, whiten=False)
    expected = reference_gae(rewards, values, mask, 0.9, 0.8)
    torch.testing.assert_close(adv, expected, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(ret, (expected + values) * mask, rtol=1e-12, atol=1e-12)
    # REINFORCE++ returns are GAE with V = 0 and lam = 1
    _, g = compute_advantages("reinforce_plus_plus", rewards, mask, gamma=0.9)
    torch.testing.assert_close(g, reference_gae(rewards, torch.zeros_like(values), mask, 0.9, 1.0),
                               rtol=1e-12, atol=1e-12)


def test_gae_whitening_over_response_tokens():
    values = t([[1.0, 2.0, 3.0], [0.5, 1.0, 9.0]])
    adv, _ = compute_advantages("gae", REWARDS, MASK, values=values, gamma=0.5, lam=0.5)
    expected = whiten_reference([-0.25, -1.0, -2.0, 0.25, 1.0])
    torch.testing.assert_close(adv[MASK.bool()], t(expected), rtol=1e-6, atol=1e-6)
    assert adv[1, 2] == 0


def test_gae_rejects_value_shape_mismatch():
    with pytest.raises(ValueError, match=r"values \(2, 2\) must match token_level_rewards \(2, 3\)"):
        compute_advantages("gae", REWARDS, MASK, values=torch.zeros(2, 2, dtype=D))


# Five responses of two prompts, interleaved: group "a" scores (1, 0, 0), group "b" scores (1, 1).
GROUP_IDS = ["a", "b", "a", "b", "a"]
GROUP_MASK = t([[1, 1, 0], [1, 1, 1], [1, 0, 0], [1, 1, 1], [1, 1, 1]])
GROUP_REWARDS = t([[0, 1, 0], [0, 0, 1], [0, 0, 0], [0, 0, 1], [0, 0, 0]])


def per_token(seq_values):
    return t(seq_values).unsqueeze(-1) * GROUP_MASK


def test_grpo_with_std():
    adv, ret = compute_advantages("grpo", GROUP_REWARDS, GROUP_MASK, group_ids=GROUP_IDS, eps=0.0)
    # group a: mean 1/3, var = (4/9 + 1/9 + 1/9) / 2 = 1/3, std = 1/sqrt(3); group b has equal rewards: 0
    s3 = math.sqrt(3.0)
    torch.testing.assert_close(adv, per_token([2 / 3 * s3, 0.0, -1 / 3 * s3, 0.0, -1 / 3 * s3]))
    torch.testing.assert_close(ret, adv)


def test_grpo_integer_tensor_ids_match_string_ids():
    ids = torch.tensor([7, 3, 7, 3, 7])
    a, _ = compute_advantages("grpo", GROUP_REWARDS, GROUP_MASK, group_ids=ids)
    b, _ = compute_advantages("grpo", GROUP_REWARDS, GROUP_MASK, group_ids=GROUP_IDS)
    torch.testing.assert_close(a, b)


@pytest.mark.parametrize("name,kwargs", [("grpo", {"norm_by_std": False}), ("dr_grpo", {})])
def test_grpo_without_std_is_dr_grpo(name, kwargs):
    adv, _ = compute_advantages(name, GROUP_REWARDS, GROUP_MASK, group_ids=GROUP_IDS, **kwargs)
    torch.testing.assert_close(adv, per_token([2 / 3, 0.0, -1 / 3, 0.0, -1 / 3]))


def test_rloo_leave_one_out():
    ids = GROUP_IDS + ["c", "c"]
    mask = torch.cat([GROUP_MASK, t([[1, 1, 1], [1, 1, 1]])])
    rewards = torch.cat([GROUP_REWARDS, t([[0, 0, 3], [0, 0, 1]])])
    adv, _ = compute_advantages("rloo", rewards, mask, group_ids=ids)
    # a: 1 - (0+0)/2 = 1, 0 - (1+0)/2 = -.5 (twice); b: 1 - 1 = 0; c: 3 - 1 = 2, 1 - 3 = -2
    expected = t([1.0, 0.0, -0.5, 0.0, -0.5, 2.0, -2.0]).unsqueeze(-1) * mask
    torch.testing.assert_close(adv, expected)


@pytest.mark.parametrize("name", ["grpo", "dr_grpo", "rloo", "reinforce_plus_plus_baseline"])
def test_group_estimators_reject_singleton_groups(name):
    with pytest.raises(ValueError, match="fewer than 2 samples.*id 'z'"):
        compute_advantages(name, GROUP_REWARDS, GROUP_MASK, group_ids=["a", "b", "a", "b", "z"])


def test_reinforce_plus_plus_discounted_and_whitened():
    adv, ret = compute_advantages("reinforce_plus_plus", REWARDS, MASK, gamma=0.5)
    # row 0: G2 = 1, G1 = .5, G0 = .25; row 1: G1 = 2, G0 = 1 (pad reward 7 ignored)
    torch.testing.assert_close(ret, t([[0.25, 0.5, 1.0], [1.0, 2.0, 0.0]]))
    expected = whiten_reference([0.25, 0.5, 1.0, 1.0, 2.0])
    torch.testing.assert_close(adv[MASK.bool()], t(expected), rtol=1e-6, atol=1e-6)
    assert adv[1, 2] == 0


def test_reinforce_plus_plus_baseline():
    adv, ret = compute_advantages("reinforce_plus_plus_baseline", GROUP_REWARDS, GROUP_MASK, group_ids=GROUP_IDS)
    torch.testing.assert_close(ret, per_token([2 / 3, 0.0, -1 / 3, 0.0, -1 / 3]))
    # whitening over the 12 response tokens: 2 tokens of 2/3, 3 + 3 of 0, 1 + 3 of -1/3
    tokens = [2 / 3] * 2 + [0.0] * 3 + [-1 / 3] * 1 + [0.0] * 3 + [-1 / 3] * 3
    torch.testing.assert_close(adv[GROUP_MASK.bool()], t(whiten_reference(tokens)), rtol=1e-6, atol=1e-6)


def test_registry_and_inputs_errors():
    assert get_advantage_estimator("gae") is ADVANTAGE_ESTIMATORS.get("gae")
    with pytest.raises(ValueError, match="unknown advantage estimator 'ppo2'; known: dr_grpo, gae, grpo"):
        get_advantage_estimator("ppo2")
    with pytest.raises(ValueError, match="'gae' needs values"):
        compute_advantages("gae", REWARDS, MASK, values=None, gamma=1.0)
    with pytest.raises(ValueError, match="5 entries but the batch has 2"):
        compute_advantages("grpo", REWARDS, MASK, group_ids=GROUP_IDS)
