"""Trainer -> rollout weight streams: megatron TP/PP shards in, HF-named full tensors out, one bucket at a time.

No rank ever holds the whole model in one piece: senders pack one bucket of their own shards, receivers
assemble the full tensors of one bucket (from the TP shards they receive from the senders of that pipeline
stage) and hand them to the consumer (vLLM's layer-wise reload) before the next-but-one bucket arrives.

- split layout: each sender, the data-parallel replica 0 of every (pp, tp) position, broadcasts its buckets with
  per-slice routing (`sync.slices`): the TP-sharded tensors (and the norms) over its slice group, {sender} + the
  rollout ranks whose vLLM TP slice overlaps its shard, then the vocab tables over its full group, {sender} +
  every rollout rank. A rollout rank receives only the shards its slice needs and gets full-shape HF tensors in
  which only its slice's regions are valid. Bucket k+1 is packed (sender) or already in flight (receiver) while
  bucket k is on the wire or being loaded: `depth` buffers (sender) or unit slots (receiver) at most.
- colocated layout: every rank holds a replica of the training shards. With training
  TP = 1 the rank already has every full tensor and they are handed over as views (no copy, no collective);
  with TP > 1 the shards of one bucket are all-gathered over the training TP group, again one bucket ahead.

Every rank's role follows from the layout, so `WeightStream.run(model)` is called on all ranks alike.

Buffers are persistent and reused (`depth` send buffers or receive slots, one assembly buffer): a tensor
handed to the consumer stays valid until the consumer has taken the next bucket, then its memory is
overwritten. A consumer that keeps a tensor longer must copy it (`rollout.vllm_engine.VllmEngine.load_hf` does
for the vocab tables, whose padded shards vLLM processes last).
"""

from __future__ import annotations

from typing import Iterator

import torch
import torch.distributed as dist

from megatron_rlvr.models import hf_mapping
from megatron_rlvr.models.llama import LlamaArch
from megatron_rlvr.models.weights import TIED_OUTPUT, pipeline_split, unwrap
from megatron_rlvr.parallel.layout import LayoutGroups
from megatron_rlvr.platform import current_platform
from megatron_rlvr.sync.buckets import Bucket, TensorMeta, pack, plan_buckets, unpack
from megatron_rlvr.sync.slices import ROUTES, assemble, assembled_numel, route

HFTensors = Iterator[tuple[str, torch.Tensor]]
Broadcasts = list[tuple[str, Bucket]]
"""a sender's broadcasts in order: (route, bucket)"""


def local_shards(model: torch.nn.Module, arch: LlamaArch, pg) -> dict[str, torch.Tensor]:
    """This rank's parameter shards keyed by megatron global name, in model order (a tied output copy skipped)."""
    pp, pp_rank = pg.pp.size(), pg.pp.rank()
    split = pipeline_split(model)  # an uneven split names its layers from its own stage offsets
    out = {}
    for local, param in unwrap(model).named_parameters():
        if local == TIED_OUTPUT and arch.tie_word_embeddings:
            continue  # the last stage's copy of the embedding: the first stage's is sent
        out[hf_mapping.global_name(local, arch, pp, pp_rank, split)] = param.detach()
    return out


def to_hf(name: str, shards: list[torch.Tensor], arch: LlamaArch) -> dict[str, torch.Tensor]:
    """HF tensors of megatron parameter `name` from its TP shards in rank order."""
    full = shards[0] if len(shards) == 1 else hf_mapping.unshard(name, shards)
    return hf_mapping.mcore_full_to_hf(name, full, arch)


class WeightStream:
    """The weight transfer of one layout; `run(model)` is collective over the world.

    On ranks that host vLLM it returns an iterator of (HF name, tensor) to feed the engine's loader (consume it
    fully: the collectives happen as it is consumed); on the other ranks it sends and returns an empty iterator.
    """

    def __init__(self, groups: LayoutGroups, arch: LlamaArch, *, bucket_mb: float = 256.0, depth: int = 3):
        self.groups = groups
        self.layout = groups.layout
        self.arch = arch
        self.bucket_bytes = max(1, int(bucket_mb * 2**20))
        self.device = current_platform().device()
        self.depth = max(2, depth)
        """send buffers per sender, receive slots per receiver: up to depth - 1 buckets ahead in flight"""
        self._metas: dict[int, list[TensorMeta]] | None = None  # split layout: sender rank -> its tensors
        self._pool: dict = {}
        self.last_bytes = 0
        """bytes this rank sent or received in the last run"""

    def run(self, model: torch.nn.Module | None) -> HFTensors:
        if self.layout.trainers_host_engines:
            return self._colocated(model)
        return self._split(model)

    def run_shards(self, model: torch.nn.Module | None) -> Iterator[tuple[str, dict[int, torch.Tensor]]]:
        """Split layout, like `run` but without the HF conversion: on the rollout ranks (megatron name, {training
        TP rank: received shard}) for the shards routed to this rank, each valid until the next unit is taken
        (for a direct copy into the engine's parameters, `sync.vllm_layout`)."""
        if self.layout.trainers_host_engines:
            raise ValueError("run_shards: in the colocated layout every rank holds its shards locally; read them "
                             "with local_shards(model, arch, pg) instead")
        return self._split(model, convert=False)

    # --- split layout -------------------------------------------------------------------------------------

    def sender_metas(self, model) -> dict[int, list[TensorMeta]]:
        """Every sender's tensor list, broadcast once over its full group (shapes never change)."""
        if self._metas is None:
            mine = None
            if model is not None:
                shards = local_shards(model, self.arch, self.groups.pg)
                mine = [TensorMeta(n, tuple(t.shape), str(t.dtype)) for n, t in shards.items()]
            metas = {}
            for src, groups in sorted(self.groups.sync_groups.items()):
                box = [mine if src == self.groups.rank else None]
                dist.broadcast_object_list(box, src=src, group=groups.full)
                metas[src] = box[0]
            self._metas = metas
        return self._metas

    def sender_plans(self, model: torch.nn.Module | None) -> dict[int, Broadcasts]:
        """The broadcasts of every sender this rank exchanges weights with: per route (`sync.slices.ROUTES`
        order) its tensors of that route in model order, cut into buckets. Collective the first time (the
        senders' tensor lists are exchanged once)."""
        plans = {}
        for src, metas in self.sender_metas(model).items():
            plans[src] = [
                (r, bucket) for r in ROUTES
                for bucket in plan_buckets([m for m in metas if route(m.name) == r], self.bucket_bytes)
            ]
        return plans

    def _split(self, model, convert: bool = True):
        rank = self.groups.rank
        if not self.groups.sync_groups:
            self.last_bytes = 0
            return iter(())  # a trainer rank of a data-parallel replica other than 0: nothing to send
        plans = self.sender_plans(model)
        if rank in plans:
            self._send(model, plans[rank])
            return iter(())
        return self._receive(plans, convert)

    def _buffers(self, key, count: int, numel: int, dtype: torch.dtype) -> list[torch.Tensor]:
        """`count` persistent flat buffers of at least `numel` elements, reused from sync to sync.

        Fresh multi-MB allocations each bucket cost more than the transfer on CPU (page faults on first touch,
        measured 3-5 s per 0.5 GB against 0.5 s on the wire); on GPU they would churn the caching allocator.
        """
        have = self._pool.get(key)
        if have is None or have[0].numel() < numel or have[0].dtype != dtype:
            have = [torch.empty(numel, dtype=dtype, device=self.device) for _ in range(count)]
            self._pool[key] = have
        return have

    def _send(self, model, plan: Broadcasts) -> None:
        shards = local_shards(model, self.arch, self.groups.pg)
        src = self.groups.rank
        groups = self.groups.sync_groups[src]
        self.last_bytes = sum(b.nbytes for _, b in plan)
        # `depth` buffers: bucket k+1 is packed while the buckets before it are on the wire
        depth = self.depth
        buffers = self._buffers(("send", src), depth, max(b.numel for _, b in plan), plan[0][1].dtype)
        works = []
        for k, (r, bucket) in enumerate(plan):
            if len(works) == depth:
                works.pop(0).wait()  # frees buffers[k % depth]
            flat = pack(bucket, shards, buffers[k % depth])
            works.append(dist.broadcast(flat, src=src, group=groups.group(r), async_op=True))
        for work in works:
            work.wait()

    def _receive(self, plans: dict[int, Broadcasts], convert: bool = True):
        t = self.layout.train
        # transfer units in order: (pp stage, broadcast index), each made of the same bucket from every TP
        # sender of the stage whose group for that route holds this rank
        units = []
        for p in range(t.pp):
            senders = [self.layout.trainer_rank(i, p) for i in range(t.tp)]
            for s in senders[1:]:
                if self._metas[s] != self._metas[senders[0]]:
                    raise RuntimeError(
                        f"weight sync: trainer rank {s} holds different parameters than rank {senders[0]} of the "
                        "same pipeline stage; all tensor-parallel ranks must build the same model"
                    )
            for r, bucket in plans[senders[0]]:
                mine = {i: s for i, s in enumerate(senders) if self.groups.sync_groups[s].group(r) is not None}
                units.append((r, bucket, mine))
        self.last_bytes = sum(bucket.nbytes * len(mine) for _, bucket, mine in units)

        # `depth` receive slots, each holding one unit (its bucket from every sender of the unit): units
        # k+1 .. k+depth-1 land while unit k's tensors are consumed. Slots rather than buffers per sender: the
        # units of different pipeline stages come from different senders but are never in flight together
        # beyond `depth`, so memory is depth x the largest unit whatever the number of senders.
        depth = self.depth
        dtype = units[0][1].dtype
        slots = self._buffers("recv", depth, max(b.numel * len(mine) for _, b, mine in units), dtype)
        # one assembly buffer: a unit's full-shape tensors live until the consumer takes the next unit
        assembly = self._buffers("assemble", 1, max(
            sum(assembled_numel(e.name, e.numel, t.tp) for e in b.entries) for _, b, _ in units), dtype)[0] \
            if convert else None

        def post(k):
            r, bucket, mine = units[k]
            posted = {}
            for n, (i, src) in enumerate(mine.items()):
                flat = slots[k % depth][n * bucket.numel : (n + 1) * bucket.numel]
                work = dist.broadcast(flat, src=src, group=self.groups.sync_groups[src].group(r), async_op=True)
                posted[i] = (flat, work)
            return bucket, posted

        def stream() -> HFTensors:
            in_flight = [post(k) for k in range(min(depth - 1, len(units)))]
            for k in range(len(units)):
                if k + depth - 1 < len(units):
                    in_flight.append(post(k + depth - 1))  # into the buffer unit k-1 was consumed from
                bucket, posted = in_flight.pop(0)
                for _, work in posted.values():
                    work.wait()
                views = {i: unpack(bucket, flat) for i, (flat, _) in posted.items()}
                offset = 0
                for entry in bucket.entries:
                    shards = {i: v[entry.name] for i, v in views.items()}
                    if not convert:
                        yield entry.name, shards
                        continue
                    used = assembled_numel(entry.name, entry.numel, t.tp)
                    yield from assemble(entry.name, shards, self.arch, t.tp, assembly[offset : offset + used]).items()
                    offset += used

        return stream()

    # --- colocated layout ---------------------------------------------------------------------------------

    def _colocated(self, model) -> HFTensors:
        pg = self.groups.pg
        shards = local_shards(model, self.arch, pg)
        tp = pg.tp.size()
        if tp == 1:
            self.last_bytes = 0

            def local() -> HFTensors:
                for name, tensor in shards.items():
                    yield from to_hf(name, [tensor], self.arch).items()

            return local()
        buckets = plan_buckets([TensorMeta(n, tuple(s.shape), str(s.dtype)) for n, s in shards.items()],
                               self.bucket_bytes)
        self.last_bytes = sum(b.nbytes for b in buckets) * (tp - 1)

        largest = max(b.numel for b in buckets)
        send = self._buffers("gather-send", 2, largest, buckets[0].dtype)
        recv = self._buffers("gather-recv", 2, tp * largest, buckets[0].dtype)

        def post(k):
            bucket = buckets[k]
            flat = pack(bucket, shards, send[k % 2])
            gathered = recv[k % 2][: tp * bucket.numel]
            return bucket, gathered, dist.all_gather_into_tensor(gathered, flat, group=pg.tp, async_op=True)

        def stream() -> HFTensors:
            pending = post(0)
            for k in range(len(buckets)):
                following = post(k + 1) if k + 1 < len(buckets) else None
                bucket, gathered, work = pending
                work.wait()
                views = [unpack(bucket, part) for part in gathered.chunk(tp)]
                for entry in bucket.entries:
                    yield from to_hf(entry.name, [v[entry.name] for v in views], self.arch).items()
                pending = following

        return stream()
