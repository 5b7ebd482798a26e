"""Rollouts with the trainer's own megatron model, for machines without vLLM (the GPU machine has none).

A plain sampling loop over megatron-core's forward schedule: at each step the whole batch (prompt + tokens so
far, right-padded) goes through the model, the logits at each row's last position are gathered over TP on the
last pipeline stage, and the next token is drawn there and broadcast back to the other stages. No KV cache, so
a step costs a full forward (O(T^2) over a response); that is the price of running on any TP x PP layout with
the model exactly as trained, and fine for tests and small demos. megatron-core 0.16's own inference engine
(`megatron.core.inference`) was not used: its static/dynamic engines and text-generation controllers assume CUDA
(cuda graphs, CUDA memory pools for the KV cache) and a global `parallel_state`, which the split layout and the
CPU tests do not have.

Sampling follows vLLM's `processed_logprobs`: logits / temperature, top-p filter, renormalised; the recorded
log-prob is that of the drawn token under this distribution (temperature 0: greedy, log-prob at temperature 1).
"""

from __future__ import annotations

import json
import os
import time

import torch
import torch.distributed as dist
from megatron.core.pipeline_parallel import get_forward_backward_func
from megatron.core.pipeline_parallel.p2p_communication import P2PCommunicator
from megatron.core.process_groups_config import ProcessGroupCollection

from megatron_rlvr.models.forward import broadcast_from_last_stage
from megatron_rlvr.models.llama import LlamaArch
from megatron_rlvr.models.weights import unwrap
from megatron_rlvr.platform import current_platform
from megatron_rlvr.rollout.base import Sample, SamplingConfig, SyncStats


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


class MegatronEngine:
    """`RolloutEngine` over the trainer's megatron model; collective over all ranks of the model."""

    def __init__(self, model: torch.nn.Module, pg: ProcessGroupCollection, arch: LlamaArch,
                 eos_ids: tuple[int, ...] = (), *, pad_id: int = 0):
        self.model = model
        self.pg = pg
        self.arch = arch
        self.eos_ids = tuple(eos_ids)
        self.pad_id = pad_id

    @torch.no_grad()
    def _last_logits(self, tokens: torch.Tensor, lengths: torch.Tensor) -> torch.Tensor | None:
        """Full-vocab logits `[b, V]` at position lengths-1 of each row, on the last stage (None elsewhere)."""
        pg = self.pg
        tp = pg.tp.size()

        def loss_func(output):
            local = output[torch.arange(output.shape[0]), lengths - 1].float()  # [b, V/TP]
            if tp > 1:
                parts = [torch.empty_like(local) for _ in range(tp)]
                dist.all_gather(parts, local.contiguous(), group=pg.tp)
                local = torch.cat(parts, dim=-1)
            return local.sum() * 0, torch.tensor(1), {"logits": local[:, : self.arch.vocab_size]}

        def forward_step(data_iterator, model):
            batch = next(data_iterator)
            positions = torch.arange(batch.shape[1], device=batch.device).unsqueeze(0).expand(batch.shape[0], -1)
            return model(batch, positions, None), loss_func

        out = get_forward_backward_func(pp_size=pg.pp.size())(
            forward_step_func=forward_step, data_iterator=iter([tokens]), model=self.model, num_microbatches=1,
            seq_length=tokens.shape[1], micro_batch_size=tokens.shape[0], forward_only=True, pg_collection=pg,
            p2p_communicator=P2PCommunicator(pp_group=pg.pp, config=unwrap(self.model).config),
        )
        return out[0]["logits"] if pg.pp.rank() == pg.pp.size() - 1 else None

    @torch.no_grad()
    def _sample(self, prompts: list[list[int]], sampling: SamplingConfig, seed: int) -> list[tuple]:
        device = current_platform().device()
        rows = [p for p in prompts for _ in range(sampling.n)]
        b = len(rows)
        if b == 0:
            return []
        width = max(len(p) for p in rows) + sampling.max_tokens
        tokens = torch.full((b, width), self.pad_id, dtype=torch.long, device=device)
        for i, p in enumerate(rows):
            tokens[i, : len(p)] = torch.tensor(p, dtype=torch.long)
        lengths = torch.tensor([len(p) for p in rows], device=device)
        start = lengths.clone()
        logprobs = torch.zeros(b, sampling.max_tokens, device=device)
        done = torch.zeros(b, dtype=torch.bool, device=device)
        finished = torch.zeros(b, dtype=torch.bool, device=device)
        stops = torch.tensor(sorted(set(self.eos_ids) | set(sampling.stop_token_ids)) or [-1], device=device)
        generator = torch.Generator(device=device).manual_seed(seed)
        for step in range(sampling.max_tokens):
            logits = self._last_logits(tokens[:, : int(lengths.max())], lengths)
            drawn = torch.empty(2, b, device=device)
            if logits is not None:
                nxt, lp = sample_next(logits, sampling.temperature, sampling.top_p, generator)
                drawn = torch.stack([nxt.float(), lp])
            drawn = broadcast_from_last_stage(drawn, drawn.shape, drawn.dtype, self.pg)
            nxt, lp = drawn[0].long(), drawn[1]
            live = ~done
            rows_live = live.nonzero().squeeze(-1)
            tokens[rows_live, lengths[rows_live]] = nxt[rows_live]
            logprobs[rows_live, step] = lp[rows_live]
            lengths = lengths + live.long()
            hit = live & torch.isin(nxt, stops)
            finished |= hit
            done |= hit
            if bool(done.all()):
                break
        out = []
        for i in range(b):
            n_new = int(lengths[i] - start[i])
            out.append((tokens[i, int(start[i]) : int(lengths[i])].tolist(), logprobs[i, :n_new].tolist(),
                        bool(finished[i])))
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

    def sync_weights(self, model: torch.nn.Module) -> SyncStats:
        """The engine samples from the trainer's live parameters: nothing moves, nothing can diverge."""
        start = time.perf_counter()
        self.model = model
        return SyncStats(bytes=0, seconds=time.perf_counter() - start, verified=True)

    def sleep(self) -> None:
        """Nothing to release: no KV cache is kept between calls."""

    def wake(self) -> None:
        """Nothing to take back."""

    def close(self) -> None:
        """The model belongs to the trainer: nothing to release."""
