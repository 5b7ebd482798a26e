"""Reward shaping: verified reward scale, truncation penalty and format bonus, on hand-computed cases."""

import pytest

from megatron_rlvr.rewards import RewardConfig, shape_rewards
from megatron_rlvr.rewards.shaping import THINK_ANSWER_FORMAT


def test_tulu3_recipe():
    cfg = RewardConfig(verified_reward=10.0, truncation_penalty=-10.0)
    rewards = shape_rewards([1.0, 0.0, 1.0, 0.5], [True, True, False, True], ["a", "b", "c", "d"], cfg)
    assert rewards == [10.0, 0.0, -10.0, 5.0]


def test_no_truncation_penalty_scores_truncated_like_finished():
    cfg = RewardConfig(verified_reward=2.0, truncation_penalty=None)
    assert shape_rewards([1.0, 0.0], [False, False], ["a", "b"], cfg) == [2.0, 0.0]


def test_format_reward_adds_on_match_and_penalty_overrides_it():
    cfg = RewardConfig(verified_reward=1.0, truncation_penalty=-1.0, format_pattern=THINK_ANSWER_FORMAT,
                       format_reward=0.5)
    good = "<think>\nwork\nmore work</think>\n<answer>42</answer>"
    responses = [good, good, "42", "<answer>42</answer><think>x</think>", good]
    scores = [1.0, 0.0, 1.0, 1.0, 1.0]
    finished = [True, True, True, True, False]
    assert shape_rewards(scores, finished, responses, cfg) == [1.5, 0.5, 1.0, 1.0, -1.0]


def test_format_pattern_is_a_search_not_a_full_match():
    cfg = RewardConfig(verified_reward=0.0, format_pattern=r"\\boxed\{", format_reward=1.0)
    assert shape_rewards([0.0, 0.0], [True, True], ["so \\boxed{3} done", "3"], cfg) == [1.0, 0.0]


@pytest.mark.parametrize("kwargs,message", [
    ({"format_reward": 1.0}, "needs a format_pattern"),
    ({"format_pattern": "(", "format_reward": 1.0}, "not a valid regular expression"),
    ({"verified_reward": float("nan")}, "verified_reward must be finite"),
    ({"truncation_penalty": float("-inf")}, "truncation_penalty must be finite"),
    ({"overlong_buffer": -1}, "overlong_buffer must be >= 0"),
])
def test_shape_rewards_refuses_a_bad_config(kwargs, message):
    with pytest.raises(ValueError, match=message):
        shape_rewards([1.0], [True], ["a"], RewardConfig(**kwargs))


def test_the_job_reward_section_is_the_reward_config():
    from megatron_rlvr.config import JobConfig

    assert type(JobConfig().reward) is RewardConfig
    assert (RewardConfig().verified_reward, RewardConfig().truncation_penalty) == (1.0, None)  # the job's defaults


def test_length_mismatch_and_out_of_range_scores():
    cfg = RewardConfig()
    with pytest.raises(ValueError, match="2 scores, 1 finished flags, 2 responses"):
        shape_rewards([1.0, 0.0], [True], ["a", "b"], cfg)
    with pytest.raises(ValueError, match="score 10.0 of sample 1"):
        shape_rewards([1.0, 10.0], [True, True], ["a", "b"], cfg)
