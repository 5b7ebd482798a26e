"""Trainer -> rollout weight streams: megatron TP/PP shards in, HF-named full tensors out, one bucket at a time.

No rank ever holds the whole model in one piece: senders pack one bucket of their own shards, receivers
assemble the full tensors of one bucket (from the TP shards of all senders of that pipeline stage) and hand
them to the consumer (vLLM's layer-wise reload) before the next-but-one bucket arrives.

- split layout: each sender, the data-parallel replica 0 of every (pp, tp) position,
  broadcasts its buckets over the group {sender} + rollout ranks. Bucket k+1 is packed (sender) or already
  in flight (receiver) while bucket k is on the wire or being loaded: `depth` buffers per sender at most.
- colocated layout: every rank holds a replica of the training shards. With training
  TP = 1 the rank already has every full tensor and they are handed over as views (no copy, no collective);
  with TP > 1 the shards of one bucket are all-gathered over the training TP group, again one bucket ahead.

Every rank's role follows from the layout, so `WeightStream.run(model)` is called on all ranks alike.

Buffers are persistent and reused (`depth` per sender): a tensor handed to the consumer stays valid until the
consumer has taken the next bucket, then its memory is overwritten. A consumer that keeps a tensor longer
must copy it (`rollout.vllm_engine` does for the vocab tables, whose padded shards vLLM processes last).
"""

from __future__ import annotations

from typing import Iterator

import torch
import torch.distributed as dist

from megatron_rlvr.models import hf_mapping
from megatron_rlvr.models.llama import LlamaArch
from megatron_rlvr.models.weights import TIED_OUTPUT, unwrap
from megatron_rlvr.parallel.layout import LayoutGroups
from megatron_rlvr.platform import current_platform
from megatron_rlvr.sync.buckets import DTYPES, Bucket, TensorMeta, pack, plan_buckets, unpack

HFTensors = Iterator[tuple[str, torch.Tensor]]


def local_shards(model: torch.nn.Module, arch: LlamaArch, pg) -> dict[str, torch.Tensor]:
    """This rank's parameter shards keyed by megatron global name, in model order (a tied output copy skipped)."""
    pp, pp_rank = pg.pp.size(), pg.pp.rank()
    out = {}
    for local, param in unwrap(model).named_parameters():
        if local == TIED_OUTPUT and arch.tie_word_embeddings:
            continue  # the last stage's copy of the embedding: the first stage's is sent
        out[hf_mapping.global_name(local, arch, pp, pp_rank)] = param.detach()
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
        """buffers per sender (and per sender on each receiver): up to depth - 1 buckets ahead in flight"""
        self._metas: dict[int, list[TensorMeta]] | None = None  # split layout: sender rank -> its tensors
        self._pool: dict = {}
        self.last_bytes = 0
        """bytes this rank sent or received in the last run"""

    def run(self, model: torch.nn.Module | None) -> HFTensors:
        if self.layout.kind == "colocated":
            return self._colocated(model)
        return self._split(model)

    # --- split layout -------------------------------------------------------------------------------------

    def _sender_metas(self, model) -> dict[int, list[TensorMeta]]:
        """Every sender's tensor list, broadcast once over its sync group (shapes never change)."""
        if self._metas is None:
            mine = None
            if model is not None:
                shards = local_shards(model, self.arch, self.groups.pg)
                mine = [TensorMeta(n, tuple(t.shape), str(t.dtype)) for n, t in shards.items()]
            metas = {}
            for src, group in sorted(self.groups.sync_groups.items()):
                box = [mine if src == self.groups.rank else None]
                dist.broadcast_object_list(box, src=src, group=group)
                metas[src] = box[0]
            self._metas = metas
        return self._metas

    def _split(self, model) -> HFTensors:
        rank = self.groups.rank
        if not self.groups.sync_groups:
            self.last_bytes = 0
            return iter(())  # a trainer rank of a data-parallel replica other than 0: nothing to send
        metas = self._sender_metas(model)
        if rank in metas:
            self._send(model, plan_buckets(metas[rank], self.bucket_bytes), self.groups.sync_groups[rank])
            return iter(())
        return self._receive(metas)

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

    def _send(self, model, buckets: list[Bucket], group) -> None:
        shards = local_shards(model, self.arch, self.groups.pg)
        src = self.groups.rank
        self.last_bytes = sum(b.nbytes for b in buckets)
        # `depth` buffers: bucket k+1 is packed while the buckets before it are on the wire
        depth = self.depth
        buffers = self._buffers(("send", src), depth, max(b.numel for b in buckets), buckets[0].dtype)
        works = []
        for k, bucket in enumerate(buckets):
            if len(works) == depth:
                works.pop(0).wait()  # frees buffers[k % depth]
            flat = pack(bucket, shards, buffers[k % depth])
            works.append(dist.broadcast(flat, src=src, group=group, async_op=True))
        for work in works:
            work.wait()

    def _receive(self, metas: dict[int, list[TensorMeta]]) -> HFTensors:
        t = self.layout.train
        # transfer units in order: (pp stage, bucket index), each made of one bucket per TP sender of the stage
        units = []
        for p in range(t.pp):
            senders = [self.layout.trainer_rank(r, p) for r in range(t.tp)]
            per_sender = [plan_buckets(metas[s], self.bucket_bytes) for s in senders]
            names = [[e.name for e in b.entries] for b in per_sender[0]]
            for s, buckets in zip(senders, per_sender):
                if [[e.name for e in b.entries] for b in buckets] != names:
                    raise RuntimeError(
                        f"weight sync: trainer rank {s} holds different parameters than rank {senders[0]} of the "
                        "same pipeline stage; all tensor-parallel ranks must build the same model"
                    )
            units += [[(s, per_sender[i][k]) for i, s in enumerate(senders)] for k in range(len(names))]
        self.last_bytes = sum(b.nbytes for unit in units for _, b in unit)

        # `depth` receive buffers per sender: units k+1 .. k+depth-1 land while unit k's tensors are consumed
        depth = self.depth
        buffers = {
            src: self._buffers(("recv", src), depth, max(b.numel for unit in units for s, b in unit if s == src),
                               DTYPES[metas[src][0].dtype])
            for src in metas
        }

        def post(k):
            posted = []
            for src, bucket in units[k]:
                flat = buffers[src][k % depth][: bucket.numel]
                posted.append((bucket, flat, dist.broadcast(flat, src=src, group=self.groups.sync_groups[src],
                                                            async_op=True)))
            return posted

        def stream() -> HFTensors:
            in_flight = [post(k) for k in range(min(depth - 1, len(units)))]
            for k in range(len(units)):
                if k + depth - 1 < len(units):
                    in_flight.append(post(k + depth - 1))  # into the buffer unit k-1 was consumed from
                pending = in_flight.pop(0)
                for _, _, work in pending:
                    work.wait()
                views = [unpack(bucket, flat) for bucket, flat, _ in pending]
                for entry in pending[0][0].entries:
                    yield from to_hf(entry.name, [v[entry.name] for v in views], self.arch).items()

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
