"""Learning-rate schedules, one for `sft`, `dpo` and `train`: linear warm-up, then constant, linear decay or cosine.

With peak rate `lr`, floor `min_lr`, `W` warm-up updates and `T` updates in all, update n (1-based) runs at

    n <= W:   lr * n / W
    n >  W:   p = (n - W) / (T - W)
              constant  lr
              linear    min_lr + (lr - min_lr) * (1 - p)
              cosine    min_lr + (lr - min_lr) * (1 + cos(pi * p)) / 2

so the last update runs at `min_lr` under linear and cosine (open-instruct's linear schedule, which Tülu 3's SFT and
DPO use, decays to 0 the same way). `W` is `warmup_steps`, or `ceil(warmup_ratio * T)` when `warmup_steps` is 0.
The rate depends on n alone, so a resumed run continues the same schedule.
"""

from __future__ import annotations

import math

from megatron_rlvr.config import ConfigError

SCHEDULES = ("constant", "linear", "cosine")


def warmup_updates(optim, total_updates: int) -> int:
    """`W` above for an `OptimizerConfig` over `total_updates` optimizer updates."""
    return optim.warmup_steps or math.ceil(optim.warmup_ratio * total_updates)


def lr_at(update: int, optim, total_updates: int) -> float:
    """The learning rate of optimizer update `update` (1-based) of `total_updates`, for an `OptimizerConfig`."""
    if optim.schedule not in SCHEDULES:
        raise ValueError(f"learning-rate schedule {optim.schedule!r} is unknown; known: {', '.join(SCHEDULES)}")
    warmup = warmup_updates(optim, total_updates)
    if update <= warmup:
        return optim.lr * update / warmup
    if optim.schedule == "constant":
        return optim.lr
    progress = min(1.0, (update - warmup) / max(total_updates - warmup, 1))
    shape = 1.0 - progress if optim.schedule == "linear" else (1.0 + math.cos(math.pi * progress)) / 2
    return optim.min_lr + (optim.lr - optim.min_lr) * shape


def set_lr(optimizer, optim, update: int, total_updates: int) -> float:
    """Give every parameter group of `optimizer` (megatron-core's, chained or not) the rate of `update`; returns it."""
    from megatron_rlvr.checkpoint import _optimizers

    lr = lr_at(update, optim, total_updates)
    for opt in _optimizers(optimizer):
        for group in opt.param_groups:
            group["lr"] = lr
    return lr


def check_optimizer(optim, key: str) -> None:
    """ConfigError naming `key` (e.g. `train.optimizer`) when the schedule settings of `optim` cannot work."""
    if optim.schedule not in SCHEDULES:
        raise ConfigError(f"{key}.schedule={optim.schedule!r} is not one of {', '.join(SCHEDULES)}")
    if not 0.0 <= optim.warmup_ratio < 1.0:
        raise ConfigError(f"{key}.warmup_ratio={optim.warmup_ratio} must be in [0, 1)")
    if optim.warmup_steps < 0:
        raise ConfigError(f"{key}.warmup_steps={optim.warmup_steps} must be >= 0")
    if not 0.0 <= optim.min_lr <= optim.lr:
        raise ConfigError(f"{key}.min_lr={optim.min_lr} must be between 0 and {key}.lr={optim.lr}")
