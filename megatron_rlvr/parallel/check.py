"""The parallel section checked against itself and against the world size, and the layout arithmetic the rest of
the engine shares (which ranks train, the value model's TP / PP, the policy's pipeline stage sizes).

Pure Python on the config: `preflight.validate` and the `sft` / `dpo` checks call it before any process group
exists, and `parallel.groups` builds the groups from the same numbers.
"""

from __future__ import annotations

from megatron_rlvr.config import ConfigError, JobConfig, ParallelConfig


def value_parallel_sizes(par: ParallelConfig) -> tuple[int, int]:
    """(TP, PP) of the PPO value model: its own keys, else the policy's."""
    return par.value_tensor_parallel or par.tensor_parallel, par.value_pipeline_parallel or par.pipeline_parallel


def policy_stage_layers(par: ParallelConfig) -> tuple[int | None, int | None]:
    """(layers on the first, on the last pipeline stage) of the policy; None: the even share."""
    return par.pipeline_first_stage_layers or None, par.pipeline_last_stage_layers or None


def rollout_only_ranks(cfg: JobConfig) -> int:
    """Ranks that only generate: the split layout's rollout block (none in the colocated layout)."""
    return cfg.parallel.rollout_ranks if cfg.parallel.layout == "split" else 0


def training_world(cfg: JobConfig, world_size: int) -> int:
    """Ranks that train: all of them (colocated) or those past the rollout block (split)."""
    return world_size - rollout_only_ranks(cfg)


def check_timeouts(par: ParallelConfig) -> None:
    """parallel.timeout_s and parallel.watchdog_s: positive, the watchdog reporting before the timeout."""
    if not par.timeout_s > 0:
        raise ConfigError(f"parallel.timeout_s={par.timeout_s} must be > 0 seconds")
    if not 0 < par.watchdog_s < par.timeout_s:
        raise ConfigError(f"parallel.watchdog_s={par.watchdog_s} must be > 0 and below parallel.timeout_s="
                          f"{par.timeout_s}, so a stuck phase is reported before the job times out")


def check_parallel(par: ParallelConfig) -> None:
    """The parallel section before the world size is known: timeouts, and sequence parallelism's TP group."""
    check_timeouts(par)
    if par.sequence_parallel and par.tensor_parallel == 1:
        raise ConfigError("parallel.sequence_parallel=true needs parallel.tensor_parallel > 1; set it to false")


def check_declared_world(par: ParallelConfig, world_size: int) -> None:
    """`world_size` ranks against parallel.world_size (0 accepts any)."""
    if par.world_size and par.world_size != world_size:
        raise ConfigError(f"the job runs on {world_size} ranks but parallel.world_size={par.world_size}: launch "
                          f"{par.world_size} ranks, or set parallel.world_size={world_size} (0 accepts any)")


def check_world(cfg: JobConfig, world_size: int) -> int:
    """Raise ConfigError unless `world_size` ranks fit the layout; returns the data-parallel size."""
    par = cfg.parallel
    model_parallel = par.tensor_parallel * par.pipeline_parallel
    check_declared_world(par, world_size)
    if par.layout == "split":
        if par.rollout_ranks < 1:
            raise ConfigError("parallel.layout=split needs parallel.rollout_ranks >= 1 (ranks that only generate)")
        if par.rollout_ranks % par.rollout_tensor_parallel:
            raise ConfigError(f"parallel.rollout_ranks={par.rollout_ranks} is not a multiple of "
                              f"parallel.rollout_tensor_parallel={par.rollout_tensor_parallel}")
        if cfg.rollout.backend != "vllm":
            raise ConfigError("parallel.layout=split generates on ranks without the trainer's model: set "
                              "rollout.backend=vllm (or use parallel.layout=colocated)")
    elif cfg.rollout.one_step_off_policy:
        raise ConfigError("rollout.one_step_off_policy=true overlaps generation on the rollout ranks with training "
                          "on the others, so it needs parallel.layout=split (in the colocated layout every rank "
                          "does both, taking turns); set it to false or use the split layout")
    train_ranks = training_world(cfg, world_size)
    if train_ranks < 1 or train_ranks % model_parallel:
        need = f"{par.rollout_ranks} rollout + " if par.layout == "split" else ""
        raise ConfigError(
            f"world size {world_size} does not fit the layout: {need}training ranks {train_ranks} must be a "
            f"multiple of tensor_parallel x pipeline_parallel = {model_parallel}; launch "
            f"{(par.rollout_ranks if par.layout == 'split' else 0) + model_parallel} x k ranks "
            f"(torchrun --nproc-per-node) or change parallel.tensor_parallel / parallel.pipeline_parallel"
        )
    if par.layout == "colocated" and world_size % par.rollout_tensor_parallel:
        raise ConfigError(f"world size {world_size} is not a multiple of parallel.rollout_tensor_parallel="
                          f"{par.rollout_tensor_parallel}; every rank of the colocated layout generates")
    if cfg.algorithm.advantage_estimator == "gae":
        _check_value_world(cfg, train_ranks)
    dp = train_ranks // model_parallel
    groups = dp * cfg.algorithm.mini_batches
    if cfg.train.prompts_per_step % groups:
        raise ConfigError(
            f"train.prompts_per_step={cfg.train.prompts_per_step} must be a multiple of data-parallel size {dp} x "
            f"algorithm.mini_batches={cfg.algorithm.mini_batches} = {groups} (whole prompt groups per rank and "
            "mini-batch)"
        )
    return dp


def _check_value_world(cfg: JobConfig, train_ranks: int) -> None:
    """The PPO value model's own TP x PP grid over the `train_ranks` training ranks, and its share of prompts."""
    vtp, vpp = value_parallel_sizes(cfg.parallel)
    if train_ranks % (vtp * vpp):
        raise ConfigError(
            f"the value model's groups do not fit: training ranks {train_ranks} must be a multiple of "
            f"parallel.value_tensor_parallel x parallel.value_pipeline_parallel = {vtp} x {vpp}; choose sizes "
            f"whose product divides {train_ranks}"
        )
    value_dp = train_ranks // (vtp * vpp)
    if cfg.train.prompts_per_step % (value_dp * cfg.algorithm.mini_batches):
        raise ConfigError(
            f"train.prompts_per_step={cfg.train.prompts_per_step} must be a multiple of the value model's "
            f"data-parallel size {value_dp} x algorithm.mini_batches={cfg.algorithm.mini_batches} (whole prompt "
            "groups per value-model rank and mini-batch)"
        )
