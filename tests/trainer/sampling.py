"""A minimal rollout engine for the trainer tests: token-by-token sampling with the trainer's own megatron model
(TP = PP = 1), each rank sampling its share of the prompts and all ranks gathering every sample.

No KV cache: each new token re-runs the whole prefix, which is fine for the tiny test shapes. Rows are
right-padded; a row's next token is read at its own last position, and right padding cannot change earlier
positions under causal attention.
"""

import torch
import torch.distributed as dist

from megatron_rlvr.models.weights import unwrap
from megatron_rlvr.rollout.base import Sample


class LoopSampler:
    shares_trainer_weights = True
    """samples with the trainer's own model: `build_weight_sync` gives it the no-op sync"""

    def __init__(self, cfg, model, arch, pg, tokenizer):
        if pg.tp.size() != 1 or pg.pp.size() != 1:
            raise ValueError("the test sampler supports tensor_parallel = pipeline_parallel = 1 only")
        self.model = model
        self.vocab = arch.vocab_size
        self.eos = tokenizer.eos_token_id
        self.pad = tokenizer.pad_token_id

    @torch.no_grad()
    def _sample(self, rows: list[list[int]], sampling, generator) -> list[tuple[list[int], list[float], bool]]:
        model = unwrap(self.model)
        was_training = model.training
        model.eval()
        lengths = torch.tensor([len(r) for r in rows])
        tokens = torch.full((len(rows), int(lengths.max()) + sampling.max_tokens), self.pad, dtype=torch.long)
        for i, row in enumerate(rows):
            tokens[i, : len(row)] = torch.tensor(row)
        done = torch.zeros(len(rows), dtype=torch.bool)
        out = [([], [], False) for _ in rows]
        for _ in range(sampling.max_tokens):
            width = int(lengths.max())
            position_ids = torch.arange(width).unsqueeze(0).expand(len(rows), -1)
            logits = model(tokens[:, :width], position_ids, None)[torch.arange(len(rows)), lengths - 1].float()
            logits[:, self.vocab:] = -float("inf")
            if sampling.temperature == 0:
                next_tok = logits.argmax(-1)
                logp = torch.log_softmax(logits, -1)
            else:
                logp = torch.log_softmax(logits / sampling.temperature, -1)
                next_tok = torch.multinomial(logp.exp(), 1, generator=generator).squeeze(-1)
            for i in (~done).nonzero().flatten().tolist():
                tok = int(next_tok[i])
                out[i][0].append(tok)
                out[i][1].append(float(logp[i, tok]))
                tokens[i, lengths[i]] = tok
                if tok == self.eos:
                    done[i] = True
                    out[i] = (out[i][0], out[i][1], True)
            lengths = torch.where(done, lengths, lengths + 1)
            if done.all():
                break
        model.train(was_training)
        return out

    def generate(self, prompt_ids, sampling):
        rank, world = dist.get_rank(), dist.get_world_size()
        generator = torch.Generator().manual_seed(sampling.seed * 7919 + rank)
        mine = [i for i in range(len(prompt_ids)) if i % world == rank]
        rows = [prompt_ids[i] for i in mine for _ in range(sampling.n)]
        results = self._sample(rows, sampling, generator) if rows else []
        local = [Sample(i, list(prompt_ids[i]), *results[k * sampling.n + j])
                 for k, i in enumerate(mine) for j in range(sampling.n)]
        gathered = [None] * world
        dist.all_gather_object(gathered, local)
        return sorted((s for part in gathered for s in part), key=lambda s: s.prompt_index)

    def sleep(self):
        pass

    def wake(self):
        pass


def loop_sampler(cfg, model, arch, pg, tokenizer):
    return LoopSampler(cfg, model, arch, pg, tokenizer)


class StaleLoopSampler(LoopSampler):
    """Samples with the initial weights for the whole run (a sync that never lands): from the second step on its
    log-probs differ from the trainer's, as an off-policy or mismatched rollout engine's do. The initial weights
    are swapped into the trainer's model for each `generate` and the current ones put back after it."""

    def __init__(self, cfg, model, arch, pg, tokenizer):
        super().__init__(cfg, model, arch, pg, tokenizer)
        self.initial = [p.detach().clone() for p in unwrap(model).parameters()]

    def generate(self, prompt_ids, sampling):
        params = list(unwrap(self.model).parameters())
        current = [p.detach().clone() for p in params]
        with torch.no_grad():
            for p, old in zip(params, self.initial):
                p.copy_(old)
        try:
            return super().generate(prompt_ids, sampling)
        finally:
            with torch.no_grad():
                for p, now in zip(params, current):
                    p.copy_(now)


def stale_loop_sampler(cfg, model, arch, pg, tokenizer):
    return StaleLoopSampler(cfg, model, arch, pg, tokenizer)
