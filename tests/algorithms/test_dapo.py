"""DAPO dynamic sampling and overlong reward shaping."""

import pytest
import torch

from megatron_rlvr.algorithms import DynamicSamplingBuffer, informative_group_mask, overlong_reward_penalty


def test_informative_group_mask_drops_all_equal_groups():
    scores = torch.tensor([1.0, 0.5, 0.0, 1.0, 0.5, 1.0, 1.0])
    ids = [0, 2, 0, 1, 2, 1, 1]  # group 0: (1, 0) informative; 1: (1, 1, 1) not; 2: (.5, .5) not
    keep = informative_group_mask(scores, ids)
    assert keep.tolist() == [True, False, True, False, False, False, False]


def test_buffer_refills_until_full_and_trims_surplus():
    buffer = DynamicSamplingBuffer(num_groups=3, max_rounds=3)
    rounds = iter([
        ([[1, 1], [0, 1]], ["r1g0", "r1g1"]),
        ([[0, 0, 0], [1, 0, 0], [1, 0.5]], ["r2g0", "r2g1", "r2g2"]),
        ([[1, 0]], ["never generated"]),
    ])
    generated = 0
    while buffer.needs_more():
        scores, payloads = next(rounds)
        buffer.add(scores, payloads)
        generated += 1
    assert generated == 2
    assert buffer.take() == ["r1g1", "r2g1", "r2g2"]
    assert buffer.needs_more()  # take() resets for the next step


def test_buffer_exhaustion_error_and_warning():
    buffer = DynamicSamplingBuffer(num_groups=4, max_rounds=2)
    for _ in range(2):
        assert buffer.needs_more()
        buffer.add([[1, 0], [1, 1]], ["good", "flat"])
    with pytest.raises(RuntimeError, match="after 2 generation rounds only 2 of the 4 requested groups.*4 groups"):
        buffer.needs_more()

    buffer = DynamicSamplingBuffer(num_groups=4, max_rounds=1, on_exhausted="warn")
    buffer.add([[1, 0], [1, 1]], ["good", "flat"])
    with pytest.warns(RuntimeWarning, match="only 1 of the 4"):
        assert not buffer.needs_more()
    assert buffer.take() == ["good"]

    buffer = DynamicSamplingBuffer(num_groups=4, max_rounds=2, on_exhausted="fill")
    buffer.add([[1, 0], [1, 1]], ["good", "flat"])
    buffer.add([[0, 0], [1, 1], [0, 1]], ["flat2", "flat3", "good2"])
    assert not buffer.needs_more()
    assert buffer.take() == ["good", "good2", "flat", "flat2"]  # informative first, then fill in arrival order
    assert buffer.filled == 2


def test_overlong_penalty_by_hand():
    lengths = torch.tensor([10, 15, 16, 18, 20, 25])
    # L_max = 20, L_buf = 5: free up to 15, then -(l - 15) / 5, floored at -1 beyond 20
    penalty = overlong_reward_penalty(lengths, max_response_length=20, overlong_buffer=5)
    torch.testing.assert_close(penalty, torch.tensor([0.0, 0.0, -0.2, -0.6, -1.0, -1.0]))
    half = overlong_reward_penalty(lengths, max_response_length=20, overlong_buffer=5, penalty_factor=0.5)
    torch.testing.assert_close(half, 0.5 * penalty)
    with pytest.raises(ValueError, match="overlong_buffer must be in"):
        overlong_reward_penalty(lengths, max_response_length=20, overlong_buffer=0)
