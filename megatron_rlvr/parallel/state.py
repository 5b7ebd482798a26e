"""Where tensor, pipeline and data parallelism are set up: one place, in a fixed order.

1. `init_distributed(timeout_s)` binds the process to its device and joins the torchrun world (NCCL on GPU, gloo on
   CPU). `timeout_s` (`parallel.timeout_s`) becomes the timeout of every process group of the run: the world,
   megatron-core's groups, ours (`parallel.layout`) and the ones vLLM creates inside its engine.
2. `init_model_parallel(tp, pp, ...)` builds megatron-core's TP x PP x DP groups over the training ranks and
   seeds the model-parallel RNG tracker; it returns the explicit `ProcessGroupCollection` that models, DDP, the
   optimizer and the pipeline schedule are given (nothing downstream reaches for global groups on its own).

Group order follows megatron-core: TP varies fastest, then DP, then PP, so a TP group is a block of adjacent
ranks (one node's NVLink island on a GPU cluster).
"""

from __future__ import annotations

import dataclasses
import math
import os
from datetime import timedelta

import torch
import torch.distributed as dist
from megatron.core import parallel_state
from megatron.core.process_groups_config import ProcessGroupCollection
from megatron.core.tensor_parallel.random import model_parallel_cuda_manual_seed

from megatron_rlvr.platform import current_platform


@dataclasses.dataclass(frozen=True)
class ParallelDims:
    """The training layout: world = tp * pp * dp."""

    tp: int = 1
    pp: int = 1
    dp: int = 1

    @classmethod
    def for_world(cls, world_size: int, tp: int = 1, pp: int = 1) -> "ParallelDims":
        if tp < 1 or pp < 1 or world_size % (tp * pp):
            fits = [(t, p) for t in range(1, world_size + 1) for p in range(1, world_size + 1) if world_size % (t * p) == 0]
            raise ValueError(
                f"{world_size} training ranks cannot be split as tensor_parallel={tp} x pipeline_parallel={pp} x "
                f"data_parallel; (tp, pp) pairs that fit: {fits}"
            )
        return cls(tp=tp, pp=pp, dp=world_size // (tp * pp))


DEFAULT_TIMEOUT_S = 1800.0


def set_collective_timeout(timeout_s: float) -> timedelta:
    """Make `timeout_s` the timeout of every process group created from now on without one of its own.

    torch gives a group made without a `timeout` argument the module default of `distributed_c10d` (30 minutes
    for gloo, 10 for NCCL), read when the group is made; vLLM's and megatron-core's internal groups are made
    that way, so setting the default here is the one place that reaches them all."""
    from torch.distributed import distributed_c10d

    timeout = timedelta(seconds=timeout_s)
    distributed_c10d.default_pg_timeout = timeout
    distributed_c10d.default_pg_nccl_timeout = timeout
    return timeout


def collective_timeout() -> timedelta:
    """The timeout groups get now (`set_collective_timeout`)."""
    from torch.distributed import distributed_c10d

    return distributed_c10d.default_pg_timeout


def init_distributed(timeout_s: float = DEFAULT_TIMEOUT_S) -> tuple[int, int]:
    """Join the torchrun world (idempotent) with `timeout_s` as every process group's timeout; returns
    (rank, world_size)."""
    platform = current_platform()
    platform.activate()
    set_collective_timeout(timeout_s)
    if not dist.is_initialized():
        missing = [k for k in ("RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT") if k not in os.environ]
        if missing:
            raise RuntimeError(
                f"torch.distributed environment variable(s) {', '.join(missing)} are not set: launch with torchrun "
                "(e.g. `torchrun --nproc-per-node 2 -m megatron_rlvr.cli train ...`)"
            )
        platform.set_device(int(os.environ.get("LOCAL_RANK", "0")))
        dist.init_process_group(platform.dist_backend, timeout=collective_timeout())
    return dist.get_rank(), dist.get_world_size()


def init_model_parallel(tp: int = 1, pp: int = 1, *, seed: int = 1234) -> ProcessGroupCollection:
    """Build the TP x PP x DP groups of megatron-core over the world and seed the model-parallel RNG."""
    current_platform().activate()
    dims = ParallelDims.for_world(dist.get_world_size(), tp, pp)
    if parallel_state.model_parallel_is_initialized():
        parallel_state.destroy_model_parallel()
    timeout = collective_timeout()
    parallel_state.initialize_model_parallel(
        tensor_model_parallel_size=dims.tp,
        pipeline_model_parallel_size=dims.pp,
        distributed_timeout_minutes=max(1, math.ceil(timeout.total_seconds() / 60)),
    )
    # megatron takes whole minutes; its own call sets every group it made to the exact timeout
    parallel_state.update_pg_timeout(timeout)
    model_parallel_cuda_manual_seed(seed)
    return ProcessGroupCollection.use_mpu_process_groups()


def destroy_model_parallel() -> None:
    if parallel_state.model_parallel_is_initialized():
        parallel_state.destroy_model_parallel()


def seed_everything(seed: int) -> None:
    """Same base seed on every rank; model-parallel regions get their offsets from megatron's RNG tracker."""
    import random

    import numpy as np

    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def init_model_parallel_block(
    tp: int = 1, pp: int = 1, *, rank_offset: int = 0, num_ranks: int | None = None, seed: int = 1234
) -> ProcessGroupCollection | None:
    """TP x PP x DP groups over the rank block `[rank_offset, rank_offset + num_ranks)` of the world.

    For layouts where the training ranks are only part of the world (the split layout: rollout ranks beside
    them). The groups are explicit (`explicit_groups`), megatron's global `parallel_state` is left untouched,
    so pass the returned collection to the model, DDP, the optimizer and the schedule. When the block is the
    whole world, megatron's global groups are built instead (`init_model_parallel`).

    Collective over the WHOLE world (torch's `new_group` is): every rank calls it with the same arguments, in
    the same order relative to its other group creations. Ranks outside the block get None.
    """
    current_platform().activate()
    world = dist.get_world_size()
    num_ranks = world - rank_offset if num_ranks is None else num_ranks
    if rank_offset == 0 and num_ranks == world:
        # the block is the world (colocated layouts): megatron's global groups, which the parts of megatron-core
        # that ignore explicit groups read
        return init_model_parallel(tp, pp, seed=seed)
    pg = explicit_groups(tp, pp, rank_offset=rank_offset, num_ranks=num_ranks)
    if pg is not None:
        model_parallel_cuda_manual_seed(seed, tp_rank=pg.tp.rank(), ep_rank=0, etp_rank=pg.tp.rank())
    return pg


def init_value_parallel(
    tp: int, pp: int, *, rank_offset: int = 0, num_ranks: int | None = None
) -> ProcessGroupCollection | None:
    """A second TP x PP x DP grid over the same training ranks, for a model trained beside the policy with its
    own tensor/pipeline sizes (the PPO value model: 32 layers next to a 126-layer policy).

    Always explicit groups (`explicit_groups`), never megatron's globals, which stay the policy's. The
    model-parallel RNG tracker is not re-seeded: it is global and belongs to the policy; the value model's
    weights come from a checkpoint and its head starts at zero, so no random initialisation depends on it.

    Collective over the whole world, like `init_model_parallel_block`: call it on every rank (rollout ranks
    too), after the policy's groups and before vLLM engines are built. Ranks outside the block get None.
    """
    current_platform().activate()
    world = dist.get_world_size()
    return explicit_groups(tp, pp, rank_offset=rank_offset, num_ranks=world - rank_offset if num_ranks is None
                           else num_ranks)


def explicit_groups(tp: int, pp: int, *, rank_offset: int, num_ranks: int) -> ProcessGroupCollection | None:
    """megatron-core's `HyperCommGrid` over a rank block, same rank order as `initialize_model_parallel` (TP
    fastest, then CP, DP, PP), as a `ProcessGroupCollection`; None on ranks outside the block. Collective over
    the world; the order of the group creations below is part of that contract."""
    from megatron.core.hyper_comm_grid import HyperCommGrid

    world = dist.get_world_size()
    if rank_offset < 0 or num_ranks < 1 or rank_offset + num_ranks > world:
        raise ValueError(
            f"rank block [{rank_offset}, {rank_offset + num_ranks}) does not lie inside the world of {world} ranks"
        )
    dims = ParallelDims.for_world(num_ranks, tp, pp)
    grid = HyperCommGrid([dims.tp, 1, dims.dp, dims.pp], ["tp", "cp", "dp", "pp"], rank_offset=rank_offset)
    groups = {
        "tp": grid.create_pg("tp"),
        "cp": grid.create_pg("cp"),
        "dp": grid.create_pg("dp"),
        "pp": grid.create_pg("pp"),
        "mp": grid.create_pg(["tp", "pp"]),
        "tp_cp": grid.create_pg(["tp", "cp"]),
        "dp_cp": grid.create_pg(["cp", "dp"]),
        "tp_dp_cp": grid.create_pg(["tp", "cp", "dp"]),
        "all": grid.create_pg(["tp", "cp", "dp", "pp"]),
    }
    # embedding groups join the first and last pipeline stage of each PP group (megatron's rule)
    embd_ranks = [sorted({r[0], r[-1]}) for r in grid.get_rank_enum("pp")]
    groups["embd"], _ = dist.new_subgroups_by_enumeration(embd_ranks)
    groups["pos_embd"], _ = dist.new_subgroups_by_enumeration([[r[0]] for r in grid.get_rank_enum("pp")])
    # a dense model: no expert parallelism (EP = 1), expert TP = TP, expert DP = DP
    groups["ep"], _ = dist.new_subgroups_by_enumeration([[r] for r in range(rank_offset, rank_offset + num_ranks)])
    if not rank_offset <= dist.get_rank() < rank_offset + num_ranks:
        return None
    return ProcessGroupCollection(
        tp=groups["tp"], cp=groups["cp"], dp=groups["dp"], pp=groups["pp"], mp=groups["mp"],
        tp_cp=groups["tp_cp"], dp_cp=groups["dp_cp"], tp_dp_cp=groups["tp_dp_cp"],
        embd=groups["embd"], pos_embd=groups["pos_embd"],
        ep=groups["ep"], expt_tp=groups["tp"], expt_dp=groups["dp"], tp_ep=groups["tp"], tp_ep_pp=groups["mp"],
        intra_dp_cp=groups["dp_cp"], intra_expt_dp=groups["dp"], intra_dist_opt=groups["all"], hcp=[groups["cp"]],
    )
