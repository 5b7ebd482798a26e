"""Every process group of an RLVR job, built in one place from the config and the world (`init_groups`).

The order is fixed, the same on every rank, because torch's `new_group` is collective over the whole world:

1. the policy's TP x PP x DP groups over the training ranks (megatron-core's global groups when the training
   ranks are the whole world, explicit ones otherwise: `parallel.state`);
2. with vLLM: each engine's group, the engine leaders and the split layout's weight-sync groups
   (`parallel.layout.init_layout`, which makes step 1's groups too so that its rank roles and megatron's agree);
3. the PPO value model's grid when its TP / PP differ from the policy's (`parallel.state.init_value_parallel`).

Nothing else in a job creates groups, and only this package reads the layout kind: the rest asks `Groups`
what it needs to know (does this rank train, does the engine share the ranks with the trainer).
"""

from __future__ import annotations

import dataclasses

import torch.distributed as dist
from megatron.core.process_groups_config import ProcessGroupCollection

from megatron_rlvr.config import JobConfig
from megatron_rlvr.parallel.check import training_world, value_parallel_sizes
from megatron_rlvr.parallel.layout import Layout, LayoutGroups, init_layout, make_layout
from megatron_rlvr.parallel.state import init_model_parallel, init_value_parallel


@dataclasses.dataclass
class Groups:
    """This rank's process groups (None where the rank takes no part)."""

    policy: ProcessGroupCollection | None
    """the policy's (and the frozen reference's) TP x PP x DP groups; None on the split layout's rollout ranks"""
    value: ProcessGroupCollection | None
    """the PPO value model's grid: the policy's groups, or its own when its sizes differ; None without one"""
    rollout: LayoutGroups | None
    """the vLLM engines' groups, the engine leaders and the weight-sync groups; None when the engine samples
    with the trainer's own model (megatron backend, test engines)"""

    @property
    def trains(self) -> bool:
        """Whether this rank holds a model (False on the split layout's rollout-only ranks)."""
        return self.policy is not None

    @property
    def engine_shares_ranks(self) -> bool:
        """Whether the rollout engine lives on the training ranks (it then sleeps while the model trains)."""
        return self.rollout is None or self.rollout.layout.trainers_host_engines


def init_groups(cfg: JobConfig, world: int, *, vllm: bool) -> Groups:
    """Build every group of the job as configured; collective over the world (call on every rank, before any
    model or engine). `vllm`: the job's engine is in-process vLLM (it needs groups of its own)."""
    par = cfg.parallel
    rollout = None
    if vllm:
        rollout = init_layout(job_layout(cfg, world), seed=cfg.train.seed)
        policy = rollout.pg
    else:
        policy = init_model_parallel(par.tensor_parallel, par.pipeline_parallel, seed=cfg.train.seed)
    value = None
    if cfg.algorithm.advantage_estimator == "gae":
        value = value_groups(cfg, policy)
    return Groups(policy, value, rollout)


def job_layout(cfg: JobConfig, world: int) -> Layout:
    """The rank roles of a vLLM job on `world` ranks: `parallel.layout`, the training TP x PP, and vLLM engines of
    `parallel.rollout_tensor_parallel` ranks (split: `parallel.rollout_ranks` of them in all)."""
    par = cfg.parallel
    return make_layout(par.layout, world, train_tp=par.tensor_parallel, train_pp=par.pipeline_parallel,
                       rollout_tp=par.rollout_tensor_parallel,
                       num_engines=max(1, par.rollout_ranks // par.rollout_tensor_parallel))


def value_groups(cfg: JobConfig, policy: ProcessGroupCollection | None) -> ProcessGroupCollection | None:
    """The value model's groups: the policy's when the sizes match, else a new grid over the training ranks
    (collective over the world)."""
    par = cfg.parallel
    tp, pp = value_parallel_sizes(par)
    if (tp, pp) == (par.tensor_parallel, par.pipeline_parallel):
        return policy
    world = dist.get_world_size()
    trainers = training_world(cfg, world)
    return init_value_parallel(tp, pp, rank_offset=world - trainers, num_ranks=trainers)
