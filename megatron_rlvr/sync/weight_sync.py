"""The weight sync after every update: make the rollout engine hold exactly the trainer's weights, then prove it.

`build_weight_sync(engine, groups, ...)` picks the sync from what the engine is, not from the backend's name:

- `NoSync`: the engine samples with the trainer's own model (`engine.shares_trainer_weights`: the megatron
  backend, the trainer tests' samplers), so there is nothing to move and nothing can diverge.
- `WeightSync`: the engine holds its own copy (vLLM). The first `push` chooses the path, collectively, the same on
  every rank, from what the layout and the engine allow (the way vLLM's platform interface exposes capabilities
  and its owner picks the kernels):
  - "inplace" (`Layout.trainers_host_engines`, colocated): this rank's training shards copied straight into
    vLLM's parameters (`sync.vllm_layout.InplaceCopy`), one strided copy per region: no HF tensors, no reload, no
    collective. Needs this rank's shards to hold everything its vLLM shard reads (training TP 1, or equal to the
    rollout TP) and vLLM's parameters writable (`VllmEngine.why_not_writable`).
  - "direct" (split): the shards received over the network (`sync.transfer.WeightStream.run_shards`) copied into
    vLLM's parameters by the same plan as each unit lands. Needs writable vLLM parameters.
  - otherwise HF tensors streamed (`WeightStream.run`) into the engine's loader, `VllmEngine.load_hf`: "load"
    (vLLM's weight loaders, plain CPU weights) or "reload" (vLLM's layer-wise reload, which re-packs them); rank 0
    logs why the copy was not taken.
  Every push is followed by the exact check (`sync.checksums`) and, after the first push and every
  `probe_interval`-th, by the log-prob probe (`sync.verify`); both raise `SyncMismatchError`.
"""

from __future__ import annotations

import dataclasses
import logging
import time

import torch
import torch.distributed as dist

from megatron_rlvr.models.weights import unwrap
from megatron_rlvr.parallel.layout import LayoutGroups
from megatron_rlvr.platform import current_platform
from megatron_rlvr.sync.checksums import SyncChecksums, held_checksums
from megatron_rlvr.sync.transfer import WeightStream, local_shards
from megatron_rlvr.sync.verify import check_logprobs, probe_atol, probe_tokens
from megatron_rlvr.sync.vllm_layout import (
    InplaceCopy, Region, bind, copy_pairs, plan_inplace, source_ranks, vllm_parameter_shapes,
)

logger = logging.getLogger(__name__)


@dataclasses.dataclass
class SyncStats:
    bytes: int
    """sent or received by this rank"""
    seconds: float
    """the weights into the engine (transfer, copy or load)"""
    verified: bool
    check_seconds: float = 0.0
    """the checks after it (`timing/sync_check_s`)"""


class NoSync:
    """The sync of an engine that samples with the trainer's own model: its parameters are the trainer's."""

    def push(self, model: torch.nn.Module | None) -> SyncStats:
        return SyncStats(bytes=0, seconds=0.0, verified=True)


class WeightSync:
    """Trainer -> vLLM weight sync of one layout; `push` is collective over the whole world."""

    def __init__(self, engine, groups: LayoutGroups, *, bucket_mb: float = 256.0, probe_interval: int = 0,
                 probe_atol: float | None = None):
        """`engine`: a `rollout.vllm_engine.VllmEngine` over the same `groups`. `bucket_mb`: the streamed paths'
        bucket size. The probe runs after the first push and then every `probe_interval`-th (0: never again),
        within `probe_atol` (None: `sync.verify.PROBE_ATOL` for the dtype vLLM computes in)."""
        self.engine = engine
        self.groups = groups
        self.layout = groups.layout
        self.arch = engine.arch
        self.stream = WeightStream(groups, self.arch, bucket_mb=bucket_mb)
        self.probe_interval = probe_interval
        self.probe_atol = probe_atol
        self.pushes = 0
        """pushes done so far"""
        self.path: str | None = None
        """"inplace", "direct", "load" or "reload", chosen by the first push"""
        self._hosts_vllm = self.layout.is_rollout(groups.rank)
        self._inplace: InplaceCopy | None = None
        self._direct: dict[str | None, list[Region]] = {}
        """"direct" path: this rank's copy regions by megatron source name (None: zero fills)"""
        self._checksums: SyncChecksums | None = None
        self._dtype_name = ""
        """the dtype vLLM holds its weights in (torch name), known on every rank from the first push"""

    def push(self, model: torch.nn.Module | None) -> SyncStats:
        """Make the engine hold exactly the trainer's current weights; raise `SyncMismatchError` if the check after
        it fails. Collective over the world; `model` is None on rollout-only ranks."""
        platform = current_platform()
        if self.path is None:
            self._choose_path(model)
        platform.synchronize()
        start = time.perf_counter()
        if self._inplace is not None:
            tp_rank = self.groups.pg.tp.rank()
            self._inplace(self.engine.vllm_parameters, lambda: {
                name: {tp_rank: tensor} for name, tensor in local_shards(model, self.arch, self.groups.pg).items()})
            nbytes = 0  # nothing crosses between ranks
        elif self.path == "direct":
            shards = self.stream.run_shards(model)
            if self._hosts_vllm:
                params = self.engine.vllm_parameters()
                copy_pairs(bind(self._direct.get(None, []), params, {}))
                for name, held in shards:  # each unit straight into vLLM's parameters while the next ones land
                    copy_pairs(bind(self._direct.get(name, []), params, {name: held}))
            nbytes = self.stream.last_bytes
        else:
            weights = self.stream.run(model)
            if self._hosts_vllm:
                self.engine.load_hf(weights)
            nbytes = self.stream.last_bytes
        if self._hosts_vllm:
            self.engine.weights_updated()
        platform.synchronize()
        seconds = time.perf_counter() - start
        self.pushes += 1
        start = time.perf_counter()
        self.check(model)
        if self.pushes == 1 or (self.probe_interval and self.pushes % self.probe_interval == 0):
            self.verify(model)
        return SyncStats(bytes=nbytes, seconds=seconds, verified=True, check_seconds=time.perf_counter() - start)

    def check(self, model: torch.nn.Module | None) -> None:
        """The exact check: every vLLM rank holds the trainer's bytes for its slice (`sync.checksums`); raises
        `SyncMismatchError` naming each differing tensor and rank. Collective; after the first push."""
        shards = padded_vocab = held = None
        if model is not None:
            shards = local_shards(model, self.arch, self.groups.pg)
            padded_vocab = unwrap(model).vocab_size
        if self._hosts_vllm:
            held = held_checksums(self.engine.vllm_model(), self._checksums.names)
        self._checksums.check(shards, padded_vocab, held)

    def verify(self, model: torch.nn.Module | None) -> float:
        """The probe: every engine computes what the trainer's `model` does; raises `SyncMismatchError`.

        Collective; after the first push. Returns the largest mean log-prob difference of an engine."""
        return check_logprobs(self.groups, model, self.engine.prompt_logprobs, probe_tokens(self.arch.vocab_size),
                              self.arch.vocab_size, probe_atol(self._dtype_name, self.probe_atol))

    # --- the path, chosen on the first push -----------------------------------------------------------------

    def _choose_path(self, model: torch.nn.Module | None) -> None:
        """Every rank says why it cannot take the copy (None when it can); any reason sends every rank through the
        engine's loader. The exact check is set up here too: every rank learns the dtype vLLM holds its weights
        in."""
        if self.layout.trainers_host_engines:
            reason, best = self._inplace_unavailable(model), "inplace"
        else:
            reason, best = self._direct_unavailable(model), "direct"
        gathered: list[tuple[str | None, torch.dtype | None]] = [(None, None)] * dist.get_world_size()
        dist.all_gather_object(gathered, (reason, self.engine.weights_dtype))
        reasons = [why for why, _ in gathered]
        self._dtype_name = str(next(d for _, d in gathered if d is not None)).removeprefix("torch.")
        self._checksums = SyncChecksums(self.groups, self.arch, getattr(torch, self._dtype_name))
        if not any(reasons):
            self.path = best
            if self.groups.rank == 0:
                logger.info("weight sync: the %s copy into vLLM's parameters", best)
            return
        self._inplace = None
        self._direct = {}
        self.path = self.engine.hf_loader
        if self.groups.rank == 0:
            by_reason: dict[str, list[int]] = {}
            for rank, why in enumerate(reasons):
                if why:
                    by_reason.setdefault(why, []).append(rank)
            logger.warning("weight sync: HF tensors through %s instead of the %s copy: %s", self.path, best,
                           "; ".join(f"rank(s) {ranks}: {why}" for why, ranks in by_reason.items()))

    def _rollout_rank(self) -> int:
        """This rank's vLLM TP rank inside its engine."""
        return self.groups.rank - self.layout.engine_ranks(self.layout.engine_index(self.groups.rank)).start

    def _why_not_writable(self) -> str | None:
        return self.engine.why_not_writable(vllm_parameter_shapes(self.arch, self.layout.rollout_tp))

    def _direct_unavailable(self, model: torch.nn.Module | None) -> str | None:
        """Why this rank's engine cannot take the received shards straight into its parameters (None when it can,
        or when it hosts no engine; then `self._direct` holds the regions). Collective: the senders' tensor lists
        are exchanged here the first time."""
        metas = self.stream.sender_metas(model)
        if not self._hosts_vllm:
            return None
        embedding = [m for held in metas.values() for m in held if m.name == "embedding.word_embeddings.weight"]
        try:
            regions = plan_inplace(self.arch, train_tp=self.layout.train.tp,
                                   train_vocab=embedding[0].shape[0] * self.layout.train.tp,
                                   rollout_tp=self.layout.rollout_tp, rollout_rank=self._rollout_rank())
        except ValueError as err:
            return str(err)
        problem = self._why_not_writable()
        if problem:
            return problem
        self._direct = {}
        for region in regions:
            self._direct.setdefault(region.src, []).append(region)
        return None

    def _inplace_unavailable(self, model: torch.nn.Module | None) -> str | None:
        """Why this rank cannot sync in place (None when it can; then `self._inplace` holds the plan)."""
        pg = self.groups.pg
        train_tp, tp_rank = pg.tp.size(), pg.tp.rank()
        rollout_rank = self._rollout_rank()
        shards = local_shards(model, self.arch, pg)
        try:
            regions = plan_inplace(self.arch, train_tp=train_tp,
                                   train_vocab=shards["embedding.word_embeddings.weight"].shape[0] * train_tp,
                                   rollout_tp=self.layout.rollout_tp, rollout_rank=rollout_rank)
        except ValueError as err:
            return str(err)
        others = sorted(source_ranks(regions) - {tp_rank})
        if others:
            return (f"vLLM TP rank {rollout_rank} needs the shards of training TP rank(s) {others} (training TP "
                    f"{train_tp}, rollout TP {self.layout.rollout_tp}; in place needs equal sizes or training TP 1)")
        problem = self._why_not_writable()
        if problem:
            return problem
        self._inplace = InplaceCopy(regions)
        return None


def build_weight_sync(engine, groups: LayoutGroups | None, *, bucket_mb: float = 256.0, probe_interval: int = 0,
                      probe_atol: float | None = None) -> WeightSync | NoSync:
    """The sync `engine` needs, built once after the engine (collective-free). An engine that samples with the
    trainer's own model (`engine.shares_trainer_weights`) gets `NoSync` and `groups` may be None; any other gets a
    `WeightSync` over `groups` (options as in `WeightSync.__init__`)."""
    if engine.shares_trainer_weights:
        return NoSync()
    if groups is None:
        raise ValueError(f"{type(engine).__name__} holds its own copy of the weights: build its weight sync with the "
                         "layout's groups (parallel.layout.init_layout)")
    return WeightSync(engine, groups, bucket_mb=bucket_mb, probe_interval=probe_interval, probe_atol=probe_atol)
