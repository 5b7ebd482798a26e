"""Rank roles and every process group of a run: which ranks train, which host vLLM, and the groups between them.

Two layouts, both one torchrun world:

- *split*: ranks `[0, E*R)` run E vLLM engines of tensor-parallel size R (engine e on ranks `[e*R, (e+1)*R)`);
  ranks `[E*R, world)` train with megatron TP x PP x DP. Weights travel trainer -> rollout by broadcast.
- *colocated*: every rank trains and hosts one vLLM TP shard (engines of R consecutive ranks); the rollout TP
  may differ from the training TP. vLLM sleeps while training runs; weights are resharded in place.

`init_layout(layout)` creates all groups, in one fixed order, on every rank (torch's `new_group` is collective
over the world): megatron's groups (`parallel.state`), the vLLM engine groups, and the weight-sync broadcast
groups (`init_sync_groups`: per sender, the rollout ranks whose vLLM TP slice overlaps its TP shard, and all
rollout ranks for what every engine rank needs whole). vLLM itself is built afterwards (`rollout.vllm_engine`),
inside `group_as_world(...)`: vLLM's `external_launcher` treats the default process group as its whole world,
so while it runs the default group is swapped for the engine's group. That swap uses a private torch function
and lives here only.
"""

from __future__ import annotations

import contextlib
import dataclasses
import os
from typing import Iterator, Literal

import torch
import torch.distributed as dist
from megatron.core.process_groups_config import ProcessGroupCollection

from megatron_rlvr.parallel.state import ParallelDims, init_model_parallel_block

LayoutKind = Literal["split", "colocated"]
_ENV_KEYS = ("RANK", "WORLD_SIZE")


@dataclasses.dataclass(frozen=True)
class Layout:
    """Which rank does what. Build with `make_layout`, which validates the sizes."""

    kind: LayoutKind
    world_size: int
    train: ParallelDims
    """the trainer block's TP x PP x DP"""
    rollout_tp: int
    """tensor-parallel size of each vLLM engine"""
    num_engines: int
    trainer_ranks: range
    rollout_ranks: range

    @property
    def trainers_host_engines(self) -> bool:
        """Every vLLM rank also trains (colocated): the training shards are already on the engines' ranks, and
        vLLM shares those devices with training. False (split): weights cross the network to rollout-only ranks."""
        return self.rollout_ranks == self.trainer_ranks

    def is_trainer(self, rank: int) -> bool:
        return rank in self.trainer_ranks

    def is_rollout(self, rank: int) -> bool:
        return rank in self.rollout_ranks

    def engine_index(self, rank: int) -> int | None:
        if rank not in self.rollout_ranks:
            return None
        return (rank - self.rollout_ranks.start) // self.rollout_tp

    def engine_ranks(self, engine: int) -> range:
        start = self.rollout_ranks.start + engine * self.rollout_tp
        return range(start, start + self.rollout_tp)

    def trainer_rank(self, tp_rank: int, pp_rank: int, dp_rank: int = 0) -> int:
        """World rank of a trainer position (megatron order: TP fastest, then DP, then PP)."""
        t = self.train
        return self.trainer_ranks.start + tp_rank + t.tp * (dp_rank + t.dp * pp_rank)

    def sync_sources(self) -> list[int]:
        """Trainer ranks that send weights in the split layout: data-parallel replica 0, every (pp, tp) slice."""
        return [self.trainer_rank(t, p) for p in range(self.train.pp) for t in range(self.train.tp)]

    def train_tp_rank(self, rank: int) -> int:
        """Tensor-parallel rank of trainer `rank` in megatron's order (TP fastest)."""
        return (rank - self.trainer_ranks.start) % self.train.tp

    def rollout_tp_rank(self, rank: int) -> int:
        """vLLM tensor-parallel rank of rollout `rank` inside its engine."""
        return (rank - self.rollout_ranks.start) % self.rollout_tp

    def slice_receivers(self, src: int) -> list[int]:
        """Rollout ranks, of every engine, whose vLLM TP slice overlaps the TP shard of sync sender `src`."""
        shard = self.train_tp_rank(src)
        return [rank for rank in self.rollout_ranks
                if slices_overlap(shard, self.train.tp, self.rollout_tp_rank(rank), self.rollout_tp)]


def slices_overlap(train_tp_rank: int, train_tp: int, rollout_tp_rank: int, rollout_tp: int) -> bool:
    """Whether training TP shard i of t and vLLM TP slice j of r share any part of a TP-sharded tensor.

    Both cut every TP-sharded HF tensor into equal parts along the same dim (`sync.slices`): shard i covers
    [i/t, (i+1)/t), slice j reads [j/r, (j+1)/r); they overlap iff i/t < (j+1)/r and j/r < (i+1)/t (integers only).
    With GQA and r > kv heads vLLM reads the whole KV head around its slice; megatron shards hold whole query
    groups (t divides the kv heads), so that head lies in a shard overlapping the slice too.
    """
    return (train_tp_rank * rollout_tp < (rollout_tp_rank + 1) * train_tp
            and rollout_tp_rank * train_tp < (train_tp_rank + 1) * rollout_tp)


def make_layout(
    kind: str,
    world_size: int,
    *,
    train_tp: int = 1,
    train_pp: int = 1,
    rollout_tp: int = 1,
    num_engines: int = 1,
) -> Layout:
    """Validate and build a layout; a size that does not fit is refused naming the world sizes that do.

    `num_engines` is used by the split layout only (colocated: every `rollout_tp` ranks form an engine).
    """
    for name, value in (("train_tp", train_tp), ("train_pp", train_pp), ("rollout_tp", rollout_tp),
                        ("num_engines", num_engines), ("world_size", world_size)):
        if value < 1:
            raise ValueError(f"layout: {name}={value} must be >= 1")
    model_parallel = train_tp * train_pp
    if kind == "split":
        rollout = num_engines * rollout_tp
        trainers = world_size - rollout
        if trainers < 1 or trainers % model_parallel:
            fits = [rollout + k * model_parallel for k in range(1, 5)]
            raise ValueError(
                f"split layout: world size {world_size} does not fit {num_engines} vLLM engine(s) x rollout_tp="
                f"{rollout_tp} ({rollout} rollout ranks) plus trainer ranks divisible by train_tp x train_pp = "
                f"{model_parallel}; world sizes that fit: {', '.join(map(str, fits))}, ..."
            )
        return Layout(
            kind="split", world_size=world_size, train=ParallelDims.for_world(trainers, train_tp, train_pp),
            rollout_tp=rollout_tp, num_engines=num_engines,
            trainer_ranks=range(rollout, world_size), rollout_ranks=range(0, rollout),
        )
    if kind == "colocated":
        if train_pp != 1:
            raise ValueError(
                f"colocated layout: train_pp={train_pp} is not supported (a rank holding one pipeline stage cannot "
                "reshard the whole model in place); use train_pp=1, or the split layout for pipeline parallelism"
            )
        unit = train_tp * rollout_tp // _gcd(train_tp, rollout_tp)
        if world_size % unit:
            fits = [unit * k for k in range(1, 5)]
            raise ValueError(
                f"colocated layout: world size {world_size} is not a multiple of train_tp={train_tp} and "
                f"rollout_tp={rollout_tp}; world sizes that fit: {', '.join(map(str, fits))}, ..."
            )
        return Layout(
            kind="colocated", world_size=world_size, train=ParallelDims.for_world(world_size, train_tp, train_pp),
            rollout_tp=rollout_tp, num_engines=world_size // rollout_tp,
            trainer_ranks=range(world_size), rollout_ranks=range(world_size),
        )
    raise ValueError(f"layout kind {kind!r} is unknown; known: split, colocated")


def _gcd(a: int, b: int) -> int:
    while b:
        a, b = b, a % b
    return a


@dataclasses.dataclass(frozen=True)
class SenderGroups:
    """The weight-sync broadcast groups of one sender (split layout), as seen from one rank."""

    slice: dist.ProcessGroup | None
    """{sender} + the rollout ranks whose vLLM TP slice overlaps the sender's TP shard; None on the rollout ranks
    outside it"""
    full: dist.ProcessGroup
    """{sender} + every rollout rank, for the tensors every rollout rank gets whole; the slice group itself when
    that already holds every rollout rank (training TP 1, or rollout TP 1)"""

    def group(self, route: str) -> dist.ProcessGroup | None:
        """The group of a route (`sync.slices.route`): "slice" or "full"."""
        if route not in ("slice", "full"):
            raise ValueError(f"weight-sync route {route!r} is unknown; known: slice, full")
        return self.slice if route == "slice" else self.full


@dataclasses.dataclass
class LayoutGroups:
    """The process groups of this rank (None where the rank takes no part)."""

    layout: Layout
    rank: int
    pg: ProcessGroupCollection | None
    """megatron's groups (trainer ranks)"""
    trainer_group: dist.ProcessGroup | None
    """all trainer ranks (trainer ranks)"""
    engine_group: dist.ProcessGroup | None
    """this rank's vLLM engine (rollout ranks); vLLM sees it as its world"""
    engine_leaders: dist.ProcessGroup | None
    """rank 0 of every engine (split layout, several engines): where prompts are spread"""
    sync_groups: dict[int, SenderGroups]
    """split layout: sync sender rank -> its broadcast groups, for the senders this rank sends or receives from"""


def init_layout(layout: Layout, *, seed: int = 1234) -> LayoutGroups:
    """Create every process group of the layout; collective over the world (call on all ranks, before vLLM)."""
    if dist.get_world_size() != layout.world_size:
        raise ValueError(
            f"the layout was made for {layout.world_size} ranks but the torch.distributed world has "
            f"{dist.get_world_size()}; launch with --nproc-per-node/--nnodes giving {layout.world_size} ranks"
        )
    rank = dist.get_rank()
    t = layout.train
    pg = init_model_parallel_block(
        t.tp, t.pp, rank_offset=layout.trainer_ranks.start, num_ranks=len(layout.trainer_ranks), seed=seed
    )
    engine_group, _ = dist.new_subgroups_by_enumeration(
        [list(layout.engine_ranks(e)) for e in range(layout.num_engines)]
    )
    leaders = dist.new_group([layout.engine_ranks(e).start for e in range(layout.num_engines)])
    sync_groups = init_sync_groups(layout) if layout.kind == "split" else {}
    return LayoutGroups(
        layout=layout, rank=rank, pg=pg, trainer_group=pg.intra_dist_opt if pg is not None else None,
        engine_group=engine_group if layout.is_rollout(rank) else None,
        engine_leaders=leaders if rank in [layout.engine_ranks(e).start for e in range(layout.num_engines)] else None,
        sync_groups=sync_groups,
    )


def init_sync_groups(layout: Layout) -> dict[int, SenderGroups]:
    """The split layout's weight-sync groups (`LayoutGroups.sync_groups`); collective over the world.

    Every rank creates the same groups in the same order: per sender (`Layout.sync_sources` order) its slice
    group, then its full group when that has other members.
    """
    rank = dist.get_rank()
    everyone = list(layout.rollout_ranks)
    out = {}
    for src in layout.sync_sources():
        receivers = layout.slice_receivers(src)
        slice_group = dist.new_group([src, *receivers])
        full_group = slice_group if receivers == everyone else dist.new_group([src, *everyone])
        if rank == src or layout.is_rollout(rank):
            out[src] = SenderGroups(slice=slice_group if rank == src or rank in receivers else None, full=full_group)
    return out


@contextlib.contextmanager
def group_as_world(group: dist.ProcessGroup) -> Iterator[None]:
    """Make `group` look like the whole torch.distributed world (default group and RANK/WORLD_SIZE env).

    vLLM's `external_launcher` builds its TP/PP/DP groups over the default group and reads the env; inside this
    context it sees only its engine's ranks, so an engine can span part of the world. Every vLLM build and
    generate call runs inside it. megatron-core also has world-wide collectives outside its explicit groups
    (`get_megatron_optimizer` all-gathers parameter-group keys over the world): in the split layout, build the
    optimizer inside `group_as_world(groups.trainer_group)`. Relies on torch's private `_update_default_pg`.
    """
    from torch.distributed import distributed_c10d as c10d

    world = c10d._get_default_group()
    saved_env = {key: os.environ.get(key) for key in _ENV_KEYS}
    rank, size = group.rank(), group.size()
    c10d._update_default_pg(group)
    os.environ.update(RANK=str(rank), WORLD_SIZE=str(size))
    # LOCAL_RANK stays: it names this process's device
    try:
        yield
    finally:
        c10d._update_default_pg(world)
        for key, value in saved_env.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value


def align_group_counters() -> None:
    """After groups were created inside `group_as_world` on some ranks only, give every rank the same counter.

    torch names a new group by a per-process counter; a later world-wide `new_group` would otherwise get
    different names (and rendezvous keys) on ranks that did and did not build vLLM. Collective over the world.
    """
    from torch.distributed import distributed_c10d as c10d

    count = torch.tensor([c10d._world.group_count], dtype=torch.int64)
    dist.all_reduce(count, op=dist.ReduceOp.MAX)
    c10d._world.group_count = int(count.item())
