"""The RLVR loop, top to bottom in one place.

    train(cfg):
        validate the config against the world size            (before any process group exists)
        join the world, build TP x PP x DP groups             (parallel.state)
        policy (+ frozen reference, + value model for PPO)     (models.llama, parallel.model)
        prompts, rollout engine, reward pool, checkpointer, metrics; resume from the latest complete checkpoint
        for each step:
            1. rollout      every rank gets the same prompt batch; the engine samples rollout.n responses each
            2. verify       rank 0 scores the responses in the reward pool and broadcasts the shaped rewards
            3. log-probs    this DP rank's prompt groups: old policy (when more than one update), reference, value
            4. advantages   estimator by name (GRPO, RLOO, GAE, ...), KL as a reward penalty or a loss term
            5. update       algorithm.ppo_epochs x algorithm.mini_batches optimizer steps through the pipeline
                            schedule; each loss is the micro-batch's share of the mini-batch's global loss
            6. weight sync  the engine takes the new weights (a no-op when it samples with the trainer's model)
            7. log, evaluate, checkpoint

Layouts: colocated, every rank does every phase, the engine sleeping while the model trains; split, the rollout
ranks hold no model and skip phases 3-5. With `rollout.one_step_off_policy` (split) the rollout ranks sample and
score step n+1 with the weights of step n-1 while the trainer ranks run phases 3-5 of step n:

    rollout ranks   | generate n+1 (w[n-1]), score |  hand over n+1  | sync w[n] | generate n+2 (w[n]) ...
    trainer ranks   | log-probs, update on n       |  hand over n+1  | sync w[n] | log-probs, update on n+1 ...

Per-token tensors live in the log-prob frame of the packed rows `[prompt | response | padding]`: position t
scores token t+1, so response token j of a row whose prompt has P tokens sits at position P - 1 + j.
"""

from __future__ import annotations

import dataclasses
import logging
import os
import time
from typing import Callable

import torch
import torch.distributed as dist

from megatron_rlvr.config import JobConfig, check_world, save_config, token_budget, validate, value_parallel_sizes
from megatron_rlvr.platform import current_platform

logger = logging.getLogger(__name__)

RolloutFactory = Callable[..., object]


# ------------------------------------------------------------------------------------------------ models


@dataclasses.dataclass
class Models:
    policy: torch.nn.Module  # DDP-wrapped GPTModel stage
    optimizer: object
    reference: torch.nn.Module | None = None
    value: torch.nn.Module | None = None
    value_optimizer: object | None = None
    value_pg: object | None = None
    """the value model's ProcessGroupCollection (its own TP x PP x DP grid, or the policy's)"""


def _dtype(name: str) -> torch.dtype:
    return {"float32": torch.float32, "bfloat16": torch.bfloat16}[name]


def build_model(cfg: JobConfig, path: str, pg, *, frozen: bool = False):
    """This rank's stage of the causal Llama at `path` with its HF weights, on the policy's pipeline split; (model,
    arch). The PPO value model is built by `models.value.build_value_model`, on its own grid."""
    from megatron_rlvr.config import policy_stage_layers
    from megatron_rlvr.models.llama import LlamaArch, build_llama, transformer_config
    from megatron_rlvr.models.weights import load_hf_into_model, read_hf_state

    arch = LlamaArch.from_pretrained(path)
    if arch.score_head:
        raise ValueError(f"{path} is a reward model (LlamaForSequenceClassification, no LM head): it can start the "
                         "value model (model.value_path), not the policy; point model.path at a LlamaForCausalLM")
    par = cfg.parallel
    first, last = policy_stage_layers(par)
    config = transformer_config(arch, tp=par.tensor_parallel, pp=par.pipeline_parallel,
                                sequence_parallel=par.sequence_parallel, params_dtype=_dtype(cfg.model.dtype),
                                recompute=cfg.model.recompute and not frozen, first_stage_layers=first,
                                last_stage_layers=last)
    model = build_llama(arch, config, pg, pad_vocab_multiple=cfg.model.pad_vocab_multiple)
    load_hf_into_model(model, read_hf_state(path), arch, pg)
    if frozen:
        model.eval()
        model.requires_grad_(False)
    return model, arch


def build_models(cfg: JobConfig, pg, value_pg=None):
    """Policy (+ reference, + value) on this trainer rank. `value_pg`: the value model's groups
    (`models.value.value_groups`, made on every rank beforehand)."""
    from megatron_rlvr.models.value import build_value_model
    from megatron_rlvr.parallel.model import make_trainable

    policy, arch = build_model(cfg, cfg.model.path, pg)
    policy, optimizer = make_trainable(policy, pg, cfg.train.optimizer,
                                       use_distributed_optimizer=cfg.parallel.use_distributed_optimizer)
    models = Models(policy, optimizer)
    if cfg.algorithm.kl_coef > 0:
        models.reference, _ = build_model(cfg, cfg.model.path, pg, frozen=True)
    if cfg.algorithm.advantage_estimator == "gae":
        models.value, models.value_optimizer, models.value_pg = build_value_model(cfg, pg, value_pg)
    return models, arch


# ------------------------------------------------------------------------------------------------ rollout


def build_rollout(cfg: JobConfig, models: Models, arch, pg, tokenizer, groups=None,
                  factory: RolloutFactory | None = None):
    """The rollout engine of `cfg.rollout.backend`, or what `factory(cfg, model, arch, pg, tokenizer)` builds
    (tests). megatron: `rollout.megatron_engine.MegatronEngine` over the policy itself (any TP x PP); vllm:
    `rollout.build_rollout_engine` over the layout's groups (`groups`, from `parallel.layout.init_layout`)."""
    policy = models.policy if models is not None else None
    if factory is not None:
        return factory(cfg, policy, arch, pg, tokenizer)
    if cfg.rollout.backend == "megatron":
        from megatron_rlvr.rollout.megatron_engine import MegatronEngine, eos_token_ids

        return MegatronEngine(models.policy, pg, arch, eos_token_ids(cfg.model.path), pad_id=tokenizer.pad_token_id)
    from megatron_rlvr.rollout import build_rollout_engine

    return build_rollout_engine(cfg.rollout.backend, groups, cfg.model.path, model=policy,
                                dtype=cfg.model.dtype, gpu_memory_utilization=cfg.rollout.gpu_memory_utilization,
                                enforce_eager=cfg.rollout.enforce_eager,
                                cpu_plain_weights=cfg.rollout.cpu_plain_weights, kv_cache_gib=cfg.rollout.kv_cache_gib,
                                probe_interval=cfg.rollout.sync_probe_interval,
                                probe_atol=cfg.rollout.sync_probe_atol,
                                max_model_len=cfg.data.max_prompt_length + cfg.rollout.max_tokens)


def sampling_config(cfg: JobConfig, seed: int, *, greedy: bool = False):
    from megatron_rlvr.rollout.base import SamplingConfig

    return SamplingConfig(
        n=1 if greedy else cfg.rollout.n,
        temperature=0.0 if greedy else cfg.rollout.temperature,
        top_p=1.0 if greedy else cfg.rollout.top_p,
        max_tokens=cfg.rollout.max_tokens,
        seed=seed,
    )


@dataclasses.dataclass
class ScoredRollouts:
    """One step's samples with verifier scores and shaped rewards, identical on every rank."""

    samples: list
    scores: list[float]
    rewards: list[float]
    generate_s: float
    """seconds the engine spent sampling them"""
    verify_s: float
    weights_step: int
    """the step whose weights sampled them (0: the initial weights)"""
    loader_state: dict
    """the prompt loader's position right after these prompts were drawn (what a checkpoint of this step saves)"""
    rounds: int = 1
    """generation rounds these samples took (dynamic sampling draws more prompts while groups are uninformative)"""
    filled_groups: int = 0
    """uninformative prompt groups in the batch because dynamic sampling ran out of rounds"""


class RolloutProducer:
    """Samples and scores each step's prompts; rank 0 verifies (one reward pool) and every rank gets the result.

    `start(prompts, step)` begins a step's rollouts and `finish()` hands them to every rank. Without overlap the two
    run back to back: `generate` is collective over the world and rank 0 scores what it returns. With
    `rollout.one_step_off_policy` (split layout) `start` runs on the rollout ranks only: each engine samples its
    share (`generate_local`, collective over the engine alone), the engine leaders send theirs to rank 0, which
    scores them; meanwhile the trainer ranks go on training, and `finish` (collective over the world) broadcasts
    the result from rank 0.
    """

    def __init__(self, engine, cfg: JobConfig, groups, tokenizer, pool, reward_cfg, rank: int):
        self.engine = engine
        self.cfg = cfg
        self.groups = groups
        self.tokenizer = tokenizer
        self.pool = pool
        self.reward_cfg = reward_cfg
        self.rank = rank
        self.overlap = cfg.rollout.one_step_off_policy
        self.colocated = groups is None or groups.layout.kind == "colocated"
        self.weights_step = 0
        """the step of the weights the engine holds (advanced by the trainer after each sync)"""
        self._pending: list | None = None

    def _score(self, prompts, samples) -> tuple[list[float], list[float]]:
        from megatron_rlvr.rewards import shape_rewards

        texts = [self.tokenizer.decode(s.response_ids, skip_special_tokens=True) for s in samples]
        scores = self.pool.score((prompts[s.prompt_index].record.dataset, text,
                                  prompts[s.prompt_index].record.ground_truth) for s, text in zip(samples, texts))
        return scores, shape_rewards(scores, [s.finished for s in samples], texts, self.reward_cfg,
                                     [len(s.response_ids) for s in samples], self.cfg.rollout.max_tokens)

    def start(self, prompts, step: int, loader_state: dict, round_: int = 0) -> None:
        sampling = sampling_config(self.cfg, seed=self.cfg.train.seed * 1_000_003 + step + round_ * 100_003)
        prompt_ids = [list(p.prompt_ids) for p in prompts]
        t = time.perf_counter()
        if not self.overlap:
            if self.colocated:
                self.engine.wake()
            samples = self.engine.generate(prompt_ids, sampling)
            if self.colocated:
                self.engine.sleep()
        else:
            layout = self.groups.layout
            samples = None
            if layout.is_rollout(self.rank):
                mine = self.engine.generate_local(prompt_ids, sampling)
                if self.groups.engine_leaders is not None:  # engine leaders: their samples to rank 0
                    gathered = [None] * layout.num_engines if self.rank == 0 else None
                    dist.gather_object(mine, gathered, dst=0, group=self.groups.engine_leaders)
                    if self.rank == 0:
                        samples = sorted((x for part in gathered for x in part), key=lambda x: x.prompt_index)
        generate_s = time.perf_counter() - t
        t = time.perf_counter()
        payload = None
        if self.rank == 0:
            scores, rewards = self._score(prompts, samples)
            payload = ScoredRollouts(samples if self.overlap else [], scores, rewards, generate_s, 0.0,
                                     self.weights_step, loader_state)
            payload.verify_s = time.perf_counter() - t
        self._pending = [payload, samples]

    def finish(self) -> ScoredRollouts:
        """Every rank's copy of the rollouts begun by the last `start` (collective over the world)."""
        payload, samples = self._pending
        self._pending = None
        box = [payload]
        dist.broadcast_object_list(box, src=0)
        result = box[0]
        if not self.overlap:  # every rank already holds the samples: only the scores travelled
            result.samples = samples
        return result

    def produce(self, prompts, step: int, loader_state: dict, round_: int = 0) -> ScoredRollouts:
        self.start(prompts, step, loader_state, round_)
        return self.finish()

    def produce_informative(self, loader, step: int) -> ScoredRollouts:
        """DAPO dynamic sampling (collective over the world, like `produce`): a prompt group whose rewards are all
        equal has zero advantage and gives no gradient, so it is dropped and more prompts are drawn and sampled,
        for at most `algorithm.dynamic_sampling_max_rounds` rounds, until `train.prompts_per_step` informative
        groups are in hand; past that bound the batch is filled up with the uninformative ones. Groups are
        renumbered 0..prompts_per_step-1 in the order they were kept."""
        from megatron_rlvr.algorithms import DynamicSamplingBuffer

        want = self.cfg.train.prompts_per_step
        buffer = DynamicSamplingBuffer(want, self.cfg.algorithm.dynamic_sampling_max_rounds, on_exhausted="fill")
        generate_s = verify_s = 0.0
        while buffer.needs_more():
            rollouts = self.produce(next(loader), step, loader.state_dict(), buffer.rounds)
            generate_s += rollouts.generate_s
            verify_s += rollouts.verify_s
            groups: dict[int, list] = {}
            for sample, score, reward in zip(rollouts.samples, rollouts.scores, rollouts.rewards):
                groups.setdefault(sample.prompt_index, []).append((sample, score, reward))
            buffer.add([[reward for _, _, reward in group] for group in groups.values()], list(groups.values()))
        rounds = buffer.rounds
        kept = buffer.take()
        rows = [(dataclasses.replace(sample, prompt_index=index), score, reward)
                for index, group in enumerate(kept) for sample, score, reward in group]
        samples, scores, rewards = (list(column) for column in zip(*rows))
        return ScoredRollouts(samples, scores, rewards, generate_s, verify_s, rollouts.weights_step,
                              rollouts.loader_state, rounds=rounds, filled_groups=buffer.filled)


# ------------------------------------------------------------------------------------------------ batches


@dataclasses.dataclass
class RolloutBatch:
    """This DP rank's rows `[prompt | response | pad]` and per-token tensors in the log-prob frame `[B, S-1]`."""

    tokens: torch.Tensor  # [B, S] int64
    lengths: torch.Tensor  # [B] prompt + response tokens
    mask: torch.Tensor  # [B, S-1] float, 1 on response tokens
    rewards: torch.Tensor  # [B] shaped reward per sequence
    group_ids: list[int]  # prompt index of each row (GRPO groups)
    fields: dict[str, torch.Tensor] = dataclasses.field(default_factory=dict)

    @property
    def token_rewards(self) -> torch.Tensor:
        """The sequence reward on its last response token."""
        out = torch.zeros_like(self.mask)
        last = (self.mask * torch.arange(1, self.mask.shape[1] + 1, device=self.mask.device)).argmax(-1)
        out[torch.arange(out.shape[0], device=out.device), last] = self.rewards.to(out.dtype)
        return out * self.mask

    def rows(self, index: torch.Tensor) -> "RolloutBatch":
        return RolloutBatch(self.tokens[index], self.lengths[index], self.mask[index], self.rewards[index],
                            [self.group_ids[i] for i in index.tolist()],
                            {k: v[index] for k, v in self.fields.items()})


def pack_rollouts(samples, rewards: list[float], pad_id: int) -> RolloutBatch:
    lengths = [len(s.prompt_ids) + len(s.response_ids) for s in samples]
    width = max(lengths)
    tokens = torch.full((len(samples), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(samples), width - 1))
    rollout_logprobs = torch.zeros((len(samples), width - 1))
    for row, sample in enumerate(samples):
        prompt = len(sample.prompt_ids)
        tokens[row, : lengths[row]] = torch.tensor(list(sample.prompt_ids) + list(sample.response_ids))
        mask[row, prompt - 1: lengths[row] - 1] = 1.0
        rollout_logprobs[row, prompt - 1: lengths[row] - 1] = torch.tensor(sample.logprobs, dtype=torch.float32)
    device = current_platform().device()
    return RolloutBatch(tokens.to(device), torch.tensor(lengths), mask.to(device),
                        torch.tensor(rewards, dtype=torch.float32, device=device), [s.prompt_index for s in samples],
                        {"rollout_logprobs": rollout_logprobs.to(device)})


def per_token(model, batch: RolloutBatch, pg, cfg: JobConfig, vocab: int, *, value_model: bool = False):
    """Forward-only log-probs (or values) `[B, S-1]` of `batch` on every PP stage of this DP rank."""
    from megatron_rlvr.models.forward import broadcast_from_last_stage, forward_backward, scatter_rows

    mbs = micro_batches_of(batch, cfg)
    with torch.no_grad():
        out = forward_backward(model, mbs, pg, valid_vocab_size=vocab, temperature=cfg.rollout.temperature,
                               value_model=value_model)
    shape = batch.mask.shape
    full = None
    if out:
        key = "values" if value_model else "logprobs"
        full = scatter_rows([o[key] for o in out], mbs, shape)
    return broadcast_from_last_stage(full, shape, torch.float32, pg) * batch.mask


def micro_batches_of(batch: RolloutBatch, cfg: JobConfig, fields: dict | None = None):
    """The micro-batches of every model pass over `batch` (old, reference, value, update): packed and balanced
    under `token_budget`, or padded."""
    from megatron_rlvr.models.forward import micro_batches

    return micro_batches(batch.tokens, batch.lengths, micro_batch_size=cfg.train.micro_batch_size,
                         max_tokens=token_budget(cfg), fields=fields)


def _global_sum(value: torch.Tensor, group) -> torch.Tensor:
    value = value.detach().clone().float()
    dist.all_reduce(value, group=group)
    return value


def update_policy(models: Models, batch: RolloutBatch, pg, cfg: JobConfig, vocab: int, kl_coef: float) -> list[dict]:
    """One optimizer step on `batch` (a mini-batch); returns its stats (`combine_micro_batches`) on the last
    pipeline stage, in a list of one, and an empty list elsewhere."""
    from megatron_rlvr.algorithms import aggregate_loss, get_policy_loss, kl_loss, loss_denominator, rollout_correction
    from megatron_rlvr.models.forward import forward_backward

    algo = cfg.algorithm
    norm = cfg.rollout.max_tokens
    denominator = _global_sum(loss_denominator(batch.mask, algo.loss_agg_mode, norm), pg.dp)
    policy_loss = get_policy_loss(algo.policy_loss)
    kl_in_loss = kl_coef > 0 and algo.kl_mode == "loss"

    def loss_fn(logprobs, entropy, mb):
        f = mb.fields
        old = f["old_logprobs"] if "old_logprobs" in f else logprobs.detach()
        # the engine sampled from pi_rollout, not pi_old: weight (tis) or mask (mis) each token by their ratio
        weight, correction = rollout_correction(old, f["rollout_logprobs"], f["mask"], kind=algo.rollout_correction,
                                                cap=algo.rollout_is_cap, level=algo.rollout_mis_level)
        loss, stats = policy_loss(logprobs, old, f["advantages"], f["mask"], clip_low=algo.clip_low,
                                  clip_high=algo.clip_high, clip_c=algo.clip_ratio_c,
                                  token_weight=None if algo.rollout_correction == "none" else weight,
                                  loss_agg_mode=algo.loss_agg_mode, norm_constant=norm, loss_denominator=denominator)
        stats = {f"actor/{k}": v for k, v in stats.items()}
        stats.update({f"rollout/{k}": v for k, v in correction.items()})
        stats["loss/policy"] = loss.detach()
        if kl_in_loss:
            kl, kl_stats = kl_loss(logprobs, f["ref_logprobs"], f["mask"], kind=algo.kl_estimator,
                                   loss_agg_mode=algo.loss_agg_mode, loss_denominator=denominator)
            loss = loss + kl_coef * kl
            stats["loss/kl"] = kl.detach()
        if algo.entropy_coef:
            ent = aggregate_loss(entropy, f["mask"], algo.loss_agg_mode, norm, denominator)
            loss = loss - algo.entropy_coef * ent
        if "ref_logprobs" in f:
            # k1 token mean of KL(policy || reference) at update time: the curve Tülu 3 reports
            stats["kl"] = ((logprobs.detach() - f["ref_logprobs"]) * f["mask"]).sum() / f["mask"].sum().clamp(min=1)
        if entropy is not None:
            stats["actor/entropy"] = ((entropy.detach() * f["mask"]).sum() / f["mask"].sum().clamp(min=1))
        return loss, stats

    fields = {"mask": batch.mask, **batch.fields}
    mbs = micro_batches_of(batch, cfg, fields)
    models.policy.zero_grad_buffer()
    models.optimizer.zero_grad()
    stats = forward_backward(models.policy, mbs, pg, valid_vocab_size=vocab, loss_fn=loss_fn,
                             temperature=cfg.rollout.temperature, want_entropy=True)
    ok, grad_norm, _ = models.optimizer.step()
    if not stats:  # not the last pipeline stage
        return []
    update = combine_micro_batches(stats, [mb.fields["mask"].sum() for mb in mbs])
    update["actor/grad_norm"] = float(grad_norm) if grad_norm is not None else float("nan")
    update["actor/update_skipped"] = float(not ok)
    return [update]


def update_value(models: Models, batch: RolloutBatch, pg, cfg: JobConfig) -> list[dict]:
    from megatron_rlvr.algorithms import clipped_value_loss, loss_denominator
    from megatron_rlvr.models.forward import forward_backward

    algo = cfg.algorithm
    denominator = _global_sum(loss_denominator(batch.mask, algo.loss_agg_mode, cfg.rollout.max_tokens), pg.dp)

    def loss_fn(values, _, mb):
        f = mb.fields
        loss, stats = clipped_value_loss(values, f["values"], f["returns"], f["mask"], clip_range=algo.value_clip,
                                         loss_agg_mode=algo.loss_agg_mode, norm_constant=cfg.rollout.max_tokens,
                                         loss_denominator=denominator)
        return algo.value_loss_coef * loss, {"critic/vf_clipfrac": stats["vf_clipfrac"], "loss/value": loss.detach()}

    fields = {"mask": batch.mask, "values": batch.fields["values"], "returns": batch.fields["returns"]}
    mbs = micro_batches_of(batch, cfg, fields)
    models.value.zero_grad_buffer()
    models.value_optimizer.zero_grad()
    stats = forward_backward(models.value, mbs, pg, valid_vocab_size=1, loss_fn=loss_fn, value_model=True)
    models.value_optimizer.step()
    return [combine_micro_batches(stats, [mb.fields["mask"].sum() for mb in mbs])] if stats else []


# ------------------------------------------------------------------------------------------------ stats


def combine_micro_batches(stats: list[dict], tokens: list) -> dict[str, float]:
    """One update's stats from its micro-batches': the `loss/*` terms are each micro-batch's share of the global
    loss and add up; the rest are means over a micro-batch's response tokens, weighted by them."""
    total = float(sum(float(t) for t in tokens)) or 1.0
    out = {}
    for key in {k for s in stats for k in s}:
        if key.startswith("loss/"):
            out[key] = float(sum(float(s[key]) for s in stats if key in s))
        else:
            out[key] = float(sum(float(s[key]) * float(t) for s, t in zip(stats, tokens) if key in s)) / total
    return out


def mean_stats(per_micro_batch: list[dict]) -> dict[str, float]:
    keys = {k for s in per_micro_batch for k in s}
    return {k: float(sum(float(s[k]) for s in per_micro_batch if k in s) / sum(k in s for s in per_micro_batch))
            for k in sorted(keys)}


def gather_mean(stats: dict[str, float] | None) -> dict[str, float]:
    """Average `stats` over the ranks that pass one (last PP stage, TP rank 0: one per data-parallel replica);
    the `loss/*` terms, each replica's share of the global loss, are added up. Every rank gets the result."""
    gathered = [None] * dist.get_world_size()
    dist.all_gather_object(gathered, stats)
    passed = [s for s in gathered if s]
    out = mean_stats(passed)
    for key in out:
        if key.startswith("loss/"):
            out[key] = float(sum(s[key] for s in passed if key in s))
    return out


# ------------------------------------------------------------------------------------------------ evaluation


def evaluate(engine, prompts, cfg: JobConfig, tokenizer, pool, rank: int, seed: int) -> float:
    """Greedy accuracy on `prompts` (the verifier's mean score), identical on every rank."""
    samples = engine.generate([list(p.prompt_ids) for p in prompts], sampling_config(cfg, seed, greedy=True))
    score = [0.0]
    if rank == 0:
        texts = [tokenizer.decode(s.response_ids, skip_special_tokens=True) for s in samples]
        records = [(prompts[s.prompt_index].record.dataset, text, prompts[s.prompt_index].record.ground_truth)
                   for s, text in zip(samples, texts)]
        scores = pool.score(records)
        score = [sum(scores) / len(scores)]
    dist.broadcast_object_list(score, src=0)
    return score[0]


def evaluate_policy(cfg: JobConfig) -> float:
    """Greedy held-out accuracy of the policy at `cfg.model.path` on `cfg.data.eval_files` (`megatron-rlvr eval`):
    the same engine, prompts and verifiers as the evaluations inside `train`. Collective; every rank gets it."""
    from transformers import AutoTokenizer

    from megatron_rlvr.parallel.state import init_distributed, seed_everything
    from megatron_rlvr.preflight import check_model_files, load_prompt_sets
    from megatron_rlvr.rewards import RewardPool

    validate(cfg, int(os.environ.get("WORLD_SIZE", "1")))
    check_model_files(cfg.model.path)
    tokenizer = AutoTokenizer.from_pretrained(cfg.model.path)
    _, prompts = load_prompt_sets(cfg, tokenizer)
    rank, world = init_distributed(cfg.parallel.timeout_s)
    check_world(cfg, world)
    seed_everything(cfg.train.seed)
    groups, pg = init_groups(cfg, world, vllm=cfg.rollout.backend == "vllm")
    if pg is not None:
        policy, arch = build_model(cfg, cfg.model.path, pg, frozen=True)
    else:  # a rollout-only rank of the split layout: vLLM loads the weights itself
        from megatron_rlvr.models.llama import LlamaArch

        policy, arch = None, LlamaArch.from_pretrained(cfg.model.path)
    engine = build_rollout(cfg, Models(policy, None) if policy is not None else None, arch, pg, tokenizer, groups)
    pool = RewardPool(cfg.reward.workers, cfg.reward.timeout_s) if rank == 0 else None
    try:
        return evaluate(engine, prompts, cfg, tokenizer, pool, rank, seed=cfg.train.seed)
    finally:
        engine.close()
        if pool is not None:
            pool.close()


# ------------------------------------------------------------------------------------------------ the loop


def init_groups(cfg: JobConfig, world: int, *, vllm: bool):
    """(vLLM layout groups or None, megatron's ProcessGroupCollection), created in one order on every rank."""
    from megatron_rlvr.parallel.state import init_model_parallel

    if vllm:  # vLLM engines need their own groups next to megatron's
        from megatron_rlvr.parallel.layout import init_layout, make_layout

        layout = make_layout(cfg.parallel.layout, world, train_tp=cfg.parallel.tensor_parallel,
                             train_pp=cfg.parallel.pipeline_parallel, rollout_tp=cfg.parallel.rollout_tensor_parallel)
        groups = init_layout(layout, seed=cfg.train.seed)
        return groups, groups.pg
    return None, init_model_parallel(cfg.parallel.tensor_parallel, cfg.parallel.pipeline_parallel, seed=cfg.train.seed)


def train(cfg: JobConfig, *, rollout_factory: RolloutFactory | None = None) -> dict:
    """Run RLVR as configured; returns the last step's metrics (on every rank).

    In the split layout the rollout ranks hold no model: they take part in generation, the weight sync, metrics,
    evaluation and checkpoints (all collective over the world) and skip the log-prob and update phases."""
    from transformers import AutoTokenizer

    from megatron_rlvr.algorithms import make_kl_controller
    from megatron_rlvr.checkpoint import Checkpointer, export_hf, remove_incomplete
    from megatron_rlvr.data import PromptLoader
    from megatron_rlvr.metrics import MetricsWriter
    from megatron_rlvr.models.llama import LlamaArch
    from megatron_rlvr.parallel.state import init_distributed, seed_everything
    from megatron_rlvr.preflight import check_model_files, load_prompt_sets
    from megatron_rlvr.rewards import RewardConfig, RewardPool
    from megatron_rlvr.watchdog import start_watchdog

    # -- validate the config, the model files and every data record; then join the world and build the groups
    validate(cfg, int(os.environ.get("WORLD_SIZE", "1")))
    check_model_files(cfg.model.path)
    tokenizer = AutoTokenizer.from_pretrained(cfg.model.path)
    dataset, eval_prompts = load_prompt_sets(cfg, tokenizer)
    rank, world = init_distributed(cfg.parallel.timeout_s)
    watchdog = start_watchdog(cfg.parallel, rank, world)
    watchdog.enter("startup", 0)
    dp_size = check_world(cfg, world)
    seed_everything(cfg.train.seed)
    groups, pg = init_groups(cfg, world, vllm=cfg.rollout.backend == "vllm" and rollout_factory is None)
    value_pg = None
    if cfg.algorithm.advantage_estimator == "gae":  # collective over the world, before any vLLM engine
        from megatron_rlvr.models.value import value_groups

        value_pg = value_groups(cfg, pg)
    platform = current_platform()
    trains = pg is not None  # False on the rollout-only ranks of the split layout

    # -- models, data, rollout engine, rewards
    if trains:
        models, arch = build_models(cfg, pg, value_pg)
    else:
        models, arch = None, LlamaArch.from_pretrained(cfg.model.path)
    loader = PromptLoader(dataset, cfg.train.prompts_per_step, seed=cfg.train.seed, shuffle=cfg.data.shuffle)
    engine = build_rollout(cfg, models, arch, pg, tokenizer, groups, rollout_factory)
    policy = models.policy if trains else None
    reward_cfg = RewardConfig.from_settings(cfg.reward)
    pool = RewardPool(cfg.reward.workers, cfg.reward.timeout_s) if rank == 0 else None
    producer = RolloutProducer(engine, cfg, groups, tokenizer, pool, reward_cfg, rank)
    kl_ctl = make_kl_controller(cfg.algorithm.kl_coef, cfg.algorithm.target_kl)

    # -- resume
    ckpt_root = os.path.join(cfg.output_dir, "checkpoints")
    par = cfg.parallel
    layout = {"world": world, "layout": par.layout, "tp": par.tensor_parallel, "pp": par.pipeline_parallel,
              "dp": dp_size, "stage_layers": [par.pipeline_first_stage_layers, par.pipeline_last_stage_layers]}
    if cfg.algorithm.advantage_estimator == "gae":
        layout["value_tp_pp"] = list(value_parallel_sizes(par))
    # every rank names every model (dist_checkpointing is collective over the world); None where it is not held
    named_models = {"policy": policy}
    named_optimizers = {"policy": models.optimizer} if trains else {}
    if cfg.algorithm.advantage_estimator == "gae":
        named_models["value"] = models.value if trains else None
        if trains:
            named_optimizers["value"] = models.value_optimizer
    checkpointer = Checkpointer(ckpt_root, named_models, named_optimizers, layout, keep=cfg.checkpoint.keep)
    watchdog.enter("resume", 0)
    state, resumed_from = checkpointer.load_latest()
    start_step = 0
    if state is not None:
        start_step = state["step"]
        loader.load_state_dict(state["loader"])
        kl_ctl.load_state_dict(state["kl_controller"])
        engine.sync_weights(policy)
        producer.weights_step = start_step
        if rank == 0:
            logger.info("resumed from step %d (%s)", start_step, resumed_from)
    if rank == 0:
        os.makedirs(cfg.output_dir, exist_ok=True)
        remove_incomplete(ckpt_root)
        save_config(cfg, os.path.join(cfg.output_dir, "config.yaml"))
    writer = MetricsWriter(cfg.output_dir, enabled=rank == 0, tensorboard=cfg.metrics.tensorboard,
                           resume_step=start_step)
    progress = None
    if rank == 0 and cfg.metrics.progress_bar:
        from tqdm import tqdm

        progress = tqdm(total=cfg.train.steps, initial=start_step, desc="rlvr", dynamic_ncols=True)

    if eval_prompts is not None and start_step == 0:
        # the starting policy's accuracy, the baseline of the eval curve
        watchdog.enter("eval", 0)
        writer.log({"step": 0, "eval/accuracy": evaluate(engine, eval_prompts, cfg, tokenizer, pool, rank, seed=0)})

    algo = cfg.algorithm
    overlap = cfg.rollout.one_step_off_policy
    # off-policy samples: the ratio is taken against the trainer's own log-probs before the update
    needs_old = algo.ppo_epochs * algo.mini_batches > 1 or overlap
    record: dict = {}
    ahead: tuple | None = None  # (prompts, rollouts) of the next step, begun while this one trains
    for step in range(start_step + 1, cfg.train.steps + 1):
        step_start = time.perf_counter()
        wait_s = 0.0
        # 1-2. rollouts of this step (sampled and scored), unless begun during the previous step
        watchdog.enter("rollout", step)
        if algo.dynamic_sampling:
            rollouts = producer.produce_informative(loader, step)
        elif ahead is None:
            prompts = next(loader)
            rollouts = producer.produce(prompts, step, loader.state_dict())
        else:
            prompts, rollouts = ahead
            ahead = None
        samples, scores, rewards = rollouts.samples, rollouts.scores, rollouts.rewards
        if overlap and step < cfg.train.steps:
            # one step off-policy: the rollout ranks sample step + 1 with the weights they hold while we train
            next_prompts = next(loader)
            producer.start(next_prompts, step + 1, loader.state_dict())

        watchdog.enter("train", step)
        t = time.perf_counter()
        local_stats = None
        if trains:
            local_stats = train_step(models, arch, pg, cfg, samples, rewards, kl_ctl.value, step, tokenizer,
                                     needs_old)
        platform.synchronize()
        train_s = time.perf_counter() - t

        if overlap and step < cfg.train.steps:
            watchdog.enter("rollout handover", step)
            t = time.perf_counter()
            ahead = (next_prompts, producer.finish())
            wait_s = time.perf_counter() - t  # the part of the next step's generation training did not hide

        # 6. weight sync (into an awake engine: its check after the sync runs the engine's model)
        watchdog.enter("sync", step)
        t = time.perf_counter()
        if producer.colocated:
            engine.wake()
        sync_check_s = engine.sync_weights(policy).check_seconds
        producer.weights_step = step
        sync_s = time.perf_counter() - t - sync_check_s

        # 7. metrics
        watchdog.enter("metrics", step)
        stats = gather_mean(local_stats)
        kl_coef = kl_ctl.value
        if algo.target_kl is not None and "kl_penalty/kl_seq" in stats:
            kl_ctl.update(stats["kl_penalty/kl_seq"], len(samples))
        response_lengths = [len(s.response_ids) for s in samples]
        tokens = sum(len(s.prompt_ids) + len(s.response_ids) for s in samples)
        step_s = time.perf_counter() - step_start
        record = {
            "step": step,
            "reward_mean": sum(rewards) / len(rewards),
            "score_mean": sum(scores) / len(scores),
            "kl": stats.pop("kl", 0.0),
            "kl_coef": kl_coef,
            "lr": stats.pop("lr", 0.0),
            "response_length/mean": sum(response_lengths) / len(response_lengths),
            "response_length/max": max(response_lengths),
            "response_length/clip_ratio": sum(not s.finished for s in samples) / len(samples),
            "rollout/weights_step": rollouts.weights_step,
            "rollout/generation_rounds": rollouts.rounds,
            "rollout/dynamic_sampling_filled": rollouts.filled_groups,
            "timing/generate_s": rollouts.generate_s,
            "timing/verify_s": rollouts.verify_s,
            "timing/logprob_s": stats.pop("timing/logprob_s", 0.0),
            "timing/train_s": train_s,
            "timing/rollout_wait_s": wait_s,
            "timing/sync_s": sync_s,
            "timing/sync_check_s": sync_check_s,
            "timing/step_s": step_s,
            "tokens_per_s": tokens / step_s,
            "memory/peak_gib": platform.max_memory_allocated() / 2**30,
            **stats,
        }
        if eval_prompts is not None and (
            (cfg.train.eval_interval and step % cfg.train.eval_interval == 0) or step == cfg.train.steps
        ):
            watchdog.enter("eval", step)
            record["eval/accuracy"] = evaluate(engine, eval_prompts, cfg, tokenizer, pool, rank, seed=step)
        writer.log(record)
        if progress is not None:
            progress.update(1)
            progress.set_postfix(reward=f"{record['reward_mean']:.3f}", kl=f"{record['kl']:.4f}",
                                 step_s=f"{step_s:.1f}")

        # checkpoint: the loader position right after this step's prompts (a resume samples the next step anew)
        interval = cfg.checkpoint.interval
        if (interval and step % interval == 0) or step == cfg.train.steps:
            watchdog.enter("checkpoint", step)
            checkpointer.save(step, {"loader": rollouts.loader_state, "kl_controller": kl_ctl.state_dict()})

    if cfg.checkpoint.export_hf:
        watchdog.enter("export", cfg.train.steps)
        export_hf(policy, arch, pg, cfg.model.path, os.path.join(cfg.output_dir, "hf"))
    watchdog.stop()
    if progress is not None:
        progress.close()
    writer.close()
    if pool is not None:
        pool.close()
    return record


def train_step(models: Models, arch, pg, cfg: JobConfig, samples, rewards: list[float], kl_coef: float, step: int,
               tokenizer, needs_old: bool) -> dict | None:
    """Log-probs, advantages and the mini-batch updates of one step on a trainer rank; returns the step's update
    stats on the ranks that report them (last pipeline stage, TP rank 0, of the policy's or the value model's
    grid), None elsewhere.

    The value model may have a grid of its own (`models.value_pg`): its data-parallel ranks then hold other prompt
    groups than the policy's. Values are computed on the value grid's share and gathered for the advantages;
    returns go back the same way for the value update."""
    from megatron_rlvr.algorithms import compute_advantages, kl_reward_penalty
    from megatron_rlvr.models.value import gather_rows, prompt_share

    algo = cfg.algorithm
    # 3. this DP rank's prompt groups; log-probs of old policy / reference, values
    t = time.perf_counter()
    mine = prompt_share(pg, samples, cfg.train.prompts_per_step)
    local = [i for i, s in enumerate(samples) if s.prompt_index in mine]
    batch = pack_rollouts([samples[i] for i in local], [rewards[i] for i in local], tokenizer.pad_token_id)
    if needs_old:
        batch.fields["old_logprobs"] = per_token(models.policy, batch, pg, cfg, arch.vocab_size)
    if models.reference is not None:
        batch.fields["ref_logprobs"] = per_token(models.reference, batch, pg, cfg, arch.vocab_size)
    values = vbatch = None
    if models.value is not None:
        vpg = models.value_pg
        if vpg is pg:  # the policy's grid: the same rows
            vmine, vbatch = mine, batch
            values = per_token(models.value, batch, pg, cfg, 1, value_model=True)
        else:
            vmine = prompt_share(vpg, samples, cfg.train.prompts_per_step)
            vlocal = [i for i, s in enumerate(samples) if s.prompt_index in vmine]
            vbatch = pack_rollouts([samples[i] for i in vlocal], [rewards[i] for i in vlocal], tokenizer.pad_token_id)
            # rows are left-aligned `[prompt | response | pad]`: column t is the same position in every packing
            all_values = gather_rows(per_token(models.value, vbatch, vpg, cfg, 1, value_model=True), vlocal,
                                     len(samples), vpg.dp)
            values = all_values[local, : batch.mask.shape[1]] * batch.mask

    # 4. advantages (KL as a reward penalty for kl_mode=reward)
    token_rewards = batch.token_rewards
    kl_stats = {}
    if models.reference is not None and algo.kl_mode == "reward":
        current = batch.fields.get("old_logprobs")
        if current is None:
            current = per_token(models.policy, batch, pg, cfg, arch.vocab_size)
        token_rewards, kl_stats = kl_reward_penalty(token_rewards, current, batch.fields["ref_logprobs"],
                                                    batch.mask, beta=kl_coef, kind=algo.kl_estimator)
    advantages, returns = compute_advantages(algo.advantage_estimator, token_rewards, batch.mask,
                                             group_ids=batch.group_ids, values=values, gamma=algo.gamma, lam=algo.lam)
    batch.fields["advantages"] = advantages
    if vbatch is batch:
        batch.fields["values"] = values
        batch.fields["returns"] = returns
    elif vbatch is not None:
        width = vbatch.mask.shape[1]
        vbatch.fields["values"] = all_values[vlocal, :width]
        vbatch.fields["returns"] = gather_rows(returns, local, len(samples), pg.dp)[vlocal, :width] * vbatch.mask
    logprob_s = time.perf_counter() - t

    # 5. mini-batch updates over whole prompt groups
    from megatron_rlvr.schedule import set_lr

    first_update = (step - 1) * algo.ppo_epochs * algo.mini_batches + 1
    total_updates = cfg.train.steps * algo.ppo_epochs * algo.mini_batches
    lr = set_lr(models.optimizer, cfg.train.optimizer, first_update, total_updates)
    if models.value is not None:
        set_lr(models.value_optimizer, cfg.train.value_optimizer, first_update, total_updates)
    def mini_batches(rows: RolloutBatch, share: list[int], epoch: int):
        """The rows of each mini-batch: whole prompt groups, in an order drawn per step and epoch."""
        of_row, prompts = torch.tensor(rows.group_ids), torch.tensor(share)
        order = torch.randperm(len(share), generator=torch.Generator().manual_seed(step * 7919 + epoch))
        return [rows.rows(torch.isin(of_row, prompts[chunk]).nonzero().flatten())
                for chunk in order.chunk(algo.mini_batches)]

    policy_stats, value_stats = [], []
    for epoch in range(algo.ppo_epochs):
        value_minis = mini_batches(vbatch, vmine, epoch) if vbatch is not None else []
        for k, mini in enumerate(mini_batches(batch, mine, epoch)):
            policy_stats += update_policy(models, mini, pg, cfg, arch.vocab_size, kl_coef)
            if value_minis:
                value_stats += update_value(models, value_minis[k], vpg, cfg)
    stats = {}
    if pg.pp.rank() == pg.pp.size() - 1 and pg.tp.rank() == 0:
        stats.update(mean_stats(policy_stats))
        stats.update({f"kl_penalty/{k}": float(v) for k, v in kl_stats.items()})
        stats.update({"lr": lr, "timing/logprob_s": logprob_s})
    if value_stats and vpg.tp.rank() == 0:  # the value grid's last stage, one rank per value replica
        stats.update(mean_stats(value_stats))
    return stats or None
