"""Learning-rate schedules: warm-up, then constant, linear decay or cosine, against values worked out by hand;
the ratio form of warm-up; the errors that name the key."""

import math

import pytest

from megatron_rlvr.config import ConfigError, OptimizerConfig
from megatron_rlvr.schedule import check_optimizer, lr_at, warmup_updates


def _opt(**kw):
    return OptimizerConfig(**{"lr": 1.0, **kw})


def test_constant_after_warmup():
    opt = _opt(warmup_steps=4)
    assert [lr_at(n, opt, 10) for n in range(1, 8)] == [0.25, 0.5, 0.75, 1.0, 1.0, 1.0, 1.0]


def test_linear_decays_to_min_lr_at_the_last_update():
    opt = _opt(warmup_steps=2, schedule="linear", min_lr=0.1)
    # after warm-up p = (n - 2) / 8; lr = 0.1 + 0.9 (1 - p)
    got = [lr_at(n, opt, 10) for n in range(1, 11)]
    want = [0.5, 1.0] + [0.1 + 0.9 * (1 - (n - 2) / 8) for n in range(3, 11)]
    assert got == pytest.approx(want, abs=1e-12)
    assert got[-1] == pytest.approx(0.1)


def test_cosine():
    opt = _opt(warmup_steps=0, schedule="cosine")
    # no warm-up: p = n / 4
    assert [lr_at(n, opt, 4) for n in range(1, 5)] == pytest.approx(
        [(1 + math.cos(math.pi * n / 4)) / 2 for n in range(1, 5)], abs=1e-12)
    assert lr_at(2, opt, 4) == pytest.approx(0.5)
    assert lr_at(4, opt, 4) == pytest.approx(0.0, abs=1e-12)


def test_warmup_ratio_and_precedence():
    assert warmup_updates(_opt(warmup_ratio=0.1), 95) == 10  # ceil(9.5)
    assert warmup_updates(_opt(warmup_ratio=0.1, warmup_steps=3), 95) == 3
    assert lr_at(5, _opt(warmup_ratio=0.1, schedule="linear"), 100) == pytest.approx(0.5)


@pytest.mark.parametrize("kw,match", [
    (dict(schedule="step"), "train.optimizer.schedule='step' is not one of constant, linear, cosine"),
    (dict(warmup_ratio=1.5), r"train.optimizer.warmup_ratio=1.5 must be in \[0, 1\)"),
    (dict(min_lr=2.0), "train.optimizer.min_lr=2.0 must be between 0 and train.optimizer.lr=1.0"),
])
def test_errors_name_the_key(kw, match):
    with pytest.raises(ConfigError, match=match):
        check_optimizer(_opt(**kw), "train.optimizer")
