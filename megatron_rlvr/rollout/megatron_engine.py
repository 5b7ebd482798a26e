"""Rollouts with the trainer's own megatron model and a KV cache, for machines without vLLM (the GPU machine has none).

Built on megatron-core's static inference stack: `StaticInferenceContext` holds the KV cache (megatron's attention
writes each step's keys and values into it and attends over the cached prefix), and `GPTInferenceWrapper` runs one
forward step over any TP x PP layout (activations sent stage to stage, logits gathered over TP on the last stage).
The decode loop, the sampling and the stop rules are ours, so the engine keeps the `RolloutEngine` interface and
records the sampled tokens' log-probs under the sampling distribution, which megatron's text-generation
controller does not (it reports temperature-1 log-probs, stops on a single end-of-document id and needs a
tokenizer object).

A batch is the prompts left-padded to the longest: one prefill over `[b, P]` with a causal mask that hides the
padding, then one token per row and step, each step attending over the cache through a key mask. RoPE depends only
on the distance between positions, so a row shifted right by its padding computes what it would alone. Finished
rows keep stepping (on the pad token) until every row is done: static batching.

Not used from megatron-core 0.16.1, and why: the dynamic engine (`DynamicInferenceContext`, paged KV blocks) runs
its attention through flash-attn's `flash_attn_varlen_func` / `flash_attn_with_kvcache`, and static-batch CUDA
graphs require `flash_decode` (flash-attn too); neither machine has flash-attn, so both would fail at the first
step. The static context and the wrapper run with our SDPA core attention on CPU and GPU alike.

Sampling follows vLLM's `processed_logprobs`: logits / temperature, top-p filter, renormalised; the recorded
log-prob is that of the drawn token under this distribution (temperature 0: greedy, log-prob at temperature 1).
"""

from __future__ import annotations

import contextlib
import json
import os
import time

import torch
import torch.distributed as dist
from megatron.core.inference.contexts import StaticInferenceContext
from megatron.core.inference.model_inference_wrappers.gpt.gpt_inference_wrapper import (
    GPTInferenceWrapper,
)
from megatron.core.inference.model_inference_wrappers.inference_wrapper_config import (
    InferenceWrapperConfig,
)
from megatron.core.process_groups_config import ProcessGroupCollection
from megatron.core.transformer.utils import set_model_to_sequence_parallel

from megatron_rlvr.models.forward import broadcast_from_last_stage
from megatron_rlvr.models.llama import LlamaArch
from megatron_rlvr.models.weights import unwrap
from megatron_rlvr.platform import current_platform
from megatron_rlvr.rollout.base import Sample, SamplingConfig


def eos_token_ids(model_dir: str) -> tuple[int, ...]:
    with open(os.path.join(model_dir, "config.json")) as f:
        eos = json.load(f).get("eos_token_id")
    if eos is None:
        return ()
    return tuple(eos) if isinstance(eos, list) else (int(eos),)


def sample_next(
    logits: torch.Tensor, temperature: float, top_p: float, generator: torch.Generator
) -> tuple[torch.Tensor, torch.Tensor]:
    """Draw one token per row of `logits [b, V]`; returns (tokens [b], their log-probs [b]).

    p = softmax(logits / T) restricted to the smallest top-p nucleus and renormalised; T = 0 is greedy.
    """
    logits = logits.float()
    if temperature == 0.0:
        logprobs = torch.log_softmax(logits, dim=-1)
        tokens = logits.argmax(dim=-1)
        return tokens, logprobs.gather(-1, tokens[:, None]).squeeze(-1)
    logits = logits / temperature
    if top_p < 1.0:
        sorted_logits, order = logits.sort(dim=-1, descending=True)
        probs = sorted_logits.softmax(dim=-1)
        # drop a token when the tokens ranked above it already reach top_p
        drop = probs.cumsum(dim=-1) - probs >= top_p
        sorted_logits = sorted_logits.masked_fill(drop, float("-inf"))
        logits = torch.full_like(logits, float("-inf")).scatter(-1, order, sorted_logits)
    logprobs = torch.log_softmax(logits, dim=-1)
    tokens = torch.multinomial(logprobs.exp(), 1, generator=generator).squeeze(-1)
    return tokens, logprobs.gather(-1, tokens[:, None]).squeeze(-1)


def prefill_mask(key_valid: torch.Tensor) -> torch.Tensor:
    """megatron's boolean attention mask (True = hidden) `[b, 1, P, P]` for left-padded prompts: causal, padding
    hidden; a padding query sees itself only, so no softmax row is empty."""
    width = key_valid.shape[1]
    causal = torch.ones(width, width, dtype=torch.bool, device=key_valid.device).tril()
    allowed = causal & key_valid[:, None, :]
    allowed |= torch.eye(width, dtype=torch.bool, device=key_valid.device)
    return ~allowed[:, None]


class MegatronEngine:
    """`RolloutEngine` over the trainer's megatron model; collective over all ranks of the model.

    The KV cache is megatron-core's `StaticInferenceContext`, kept between `generate` calls (reused while the
    batch and length fit) and dropped by `sleep`, so training never runs next to it.
    """

    shares_trainer_weights = True
    """it samples with the trainer's live parameters: its weight sync moves nothing (`sync.weight_sync.NoSync`)"""

    def __init__(self, model: torch.nn.Module, pg: ProcessGroupCollection, arch: LlamaArch,
                 eos_ids: tuple[int, ...] = (), *, pad_id: int = 0):
        self.model = model
        self.pg = pg
        self.arch = arch
        self.eos_ids = tuple(eos_ids)
        self.pad_id = pad_id
        self._context: StaticInferenceContext | None = None
        self.timings: dict[str, float] = {}
        """seconds of the last `_sample` call: `prefill_s` (prompt forward and first token), `decode_s`, and
        `decode_steps` (the steps after the first token)"""

    # -- the KV cache

    def kv_cache_bytes(self) -> int:
        """Bytes this rank's KV cache holds now (0 after `sleep`)."""
        if self._context is None:
            return 0
        return sum(t.numel() * t.element_size() for kv in self._context.key_value_memory_dict.values() for t in kv)

    def _context_for(self, batch: int, length: int) -> StaticInferenceContext:
        ctx = self._context
        if ctx is None or ctx.max_batch_size < batch or ctx.max_sequence_length < length:
            # drop the old buffers before the new ones are allocated at the first forward
            self._context = None
            current_platform().empty_cache()
            ctx = self._context = StaticInferenceContext(batch, length)
        return ctx

    # -- one forward step

    def _wrapper(self, gpt, ctx: StaticInferenceContext) -> GPTInferenceWrapper:
        config = InferenceWrapperConfig(
            hidden_size=self.arch.hidden_size,
            params_dtype=gpt.config.params_dtype,
            # no micro-batching of a step over the pipeline: the attention mask is per row of the whole batch
            inference_batch_times_seqlen_threshold=-1,
            padded_vocab_size=gpt.vocab_size,
            inference_max_requests=ctx.max_batch_size,
            inference_max_seq_length=ctx.max_sequence_length,
        )
        return GPTInferenceWrapper(gpt, config, ctx, pg_collection=self.pg)

    @contextlib.contextmanager
    def _inference_mode(self, gpt):
        """eval mode and no sequence parallelism (a one-token step cannot be split over TP ranks) while sampling;
        the model is handed back to the trainer as it came."""
        was_training, sequence_parallel = gpt.training, gpt.config.sequence_parallel
        if sequence_parallel:
            set_model_to_sequence_parallel(gpt, False)
        try:
            yield
        finally:
            if sequence_parallel:
                set_model_to_sequence_parallel(gpt, True)
            gpt.train(was_training)

    def _draw(self, wrapper, tokens, mask, sampling, generator) -> tuple[torch.Tensor, torch.Tensor]:
        """One forward step over `tokens [b, s]` (the cache holds what came before) and one token per row drawn
        on the last stage from its last position; every stage gets (tokens [b], log-probs [b])."""
        b, s = tokens.shape
        positions = torch.arange(s, device=tokens.device).expand(b, -1)
        logits = wrapper.run_one_forward_step({"tokens": tokens, "position_ids": positions, "attention_mask": mask})
        drawn = None
        if self.pg.pp.rank() == self.pg.pp.size() - 1:
            nxt, lp = sample_next(logits[:, -1, : self.arch.vocab_size], sampling.temperature, sampling.top_p,
                                  generator)
            drawn = torch.stack([nxt.double(), lp.double()])
        drawn = broadcast_from_last_stage(drawn, (2, b), torch.float64, self.pg)
        return drawn[0].long(), drawn[1].float()

    @torch.inference_mode()
    def _sample(self, prompts: list[list[int]], sampling: SamplingConfig, seed: int) -> list[tuple]:
        platform = current_platform()
        device = platform.device()
        rows = [p for p in prompts for _ in range(sampling.n)]
        b = len(rows)
        if b == 0:
            return []
        width = max(len(p) for p in rows)
        total = width + sampling.max_tokens
        if total > self.arch.max_position_embeddings:
            raise ValueError(f"megatron rollout: longest prompt ({width}) + max_tokens ({sampling.max_tokens}) = "
                             f"{total} exceeds the model's max_position_embeddings={self.arch.max_position_embeddings};"
                             " lower rollout.max_tokens or data.max_prompt_length")
        prompt = torch.full((b, width), self.pad_id, dtype=torch.long, device=device)
        key_valid = torch.ones(b, total, dtype=torch.bool, device=device)
        for i, p in enumerate(rows):
            prompt[i, width - len(p):] = torch.tensor(p, dtype=torch.long)
            key_valid[i, : width - len(p)] = False
        response = torch.full((b, sampling.max_tokens), self.pad_id, dtype=torch.long, device=device)
        logprobs = torch.zeros(b, sampling.max_tokens, device=device)
        lengths = torch.zeros(b, dtype=torch.long, device=device)
        done = torch.zeros(b, dtype=torch.bool, device=device)
        stops = torch.tensor(sorted(set(self.eos_ids) | set(sampling.stop_token_ids)) or [-1], device=device)
        generator = torch.Generator(device=device).manual_seed(seed)

        gpt = unwrap(self.model)
        ctx = self._context_for(b, total)
        wrapper = self._wrapper(gpt, ctx)
        with self._inference_mode(gpt):
            wrapper.prep_model_for_inference()  # eval mode, cache offsets reset
            platform.synchronize()
            start = time.perf_counter()
            step_tokens, mask = prompt, prefill_mask(key_valid[:, :width])
            steps = 0
            for step in range(sampling.max_tokens):
                nxt, lp = self._draw(wrapper, step_tokens, mask, sampling, generator)
                if step == 0:
                    platform.synchronize()
                    first = time.perf_counter()
                    ctx.enable_decode_mode()
                live = ~done
                response[live, step] = nxt[live]
                logprobs[live, step] = lp[live]
                lengths += live.long()
                done |= live & torch.isin(nxt, stops)
                if bool(done.all()):
                    break
                steps += 1
                step_tokens = torch.where(done, self.pad_id, nxt)[:, None]
                mask = ~key_valid[:, None, None, : width + step + 1]
            platform.synchronize()
            end = time.perf_counter()
        self.timings = {"prefill_s": first - start, "decode_s": end - first, "decode_steps": steps}
        out = []
        for i in range(b):
            n = int(lengths[i])
            ids = response[i, :n].tolist()
            out.append((ids, logprobs[i, :n].tolist(), bool(n) and ids[-1] in set(stops.tolist())))
        return out

    def generate(self, prompt_ids: list[list[int]], sampling: SamplingConfig) -> list[Sample]:
        """Data-parallel replica d samples prompts d, d+DP, ...; every rank of the world gets all samples."""
        dp, dp_rank = self.pg.dp.size(), self.pg.dp.rank()
        indices = list(range(dp_rank, len(prompt_ids), dp))
        drawn = self._sample([prompt_ids[i] for i in indices], sampling, seed=sampling.seed + dp_rank)
        mine = [
            Sample(prompt_index=i, prompt_ids=list(prompt_ids[i]), response_ids=ids, logprobs=lps, finished=fin)
            for k, i in enumerate(indices)
            for ids, lps, fin in drawn[k * sampling.n : (k + 1) * sampling.n]
        ]
        leader = self.pg.tp.rank() == 0 and self.pg.pp.rank() == 0
        gathered: list[list[Sample]] = [None] * dist.get_world_size()  # type: ignore[list-item]
        dist.all_gather_object(gathered, mine if leader else [])
        samples = [s for part in gathered for s in part]
        samples.sort(key=lambda s: s.prompt_index)
        return samples

    def sleep(self) -> None:
        """Release the KV cache (and, on a GPU, return its blocks from the caching allocator) for training."""
        self._context = None
        current_platform().empty_cache()

    def wake(self) -> None:
        """Nothing to take back: the KV cache is allocated again by the first forward step of `generate`."""

    def close(self) -> None:
        """The model belongs to the trainer: only the KV cache is the engine's."""
        self.sleep()
