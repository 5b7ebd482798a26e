"""Each step's rollouts, sampled and scored, on every rank: the rollout engine of the config, the sampling
settings, the reward pool on rank 0, DAPO's dynamic sampling, one-step-off-policy overlap, and greedy evaluation."""

from __future__ import annotations

import dataclasses
import time
from typing import Callable

import torch.distributed as dist

from megatron_rlvr.config import JobConfig

RolloutFactory = Callable[..., object]


def build_engine(cfg: JobConfig, groups, models, arch, tokenizer, factory: RolloutFactory | None = None):
    """The rollout engine of `cfg.rollout.backend` on `groups` (`parallel.Groups`), or what
    `factory(cfg, model, arch, pg, tokenizer)` builds (tests). megatron: `rollout.megatron_engine.MegatronEngine`
    over the policy itself (any TP x PP); vllm: `rollout.vllm_engine.VllmEngine` over the layout's groups (the
    in-process engine; collective over the world). Its weight sync is `sync.weight_sync.build_weight_sync`'s."""
    policy = models.policy if models is not None else None
    if factory is not None:
        return factory(cfg, policy, arch, groups.policy, tokenizer)
    if cfg.rollout.backend == "megatron":
        from megatron_rlvr.rollout.megatron_engine import MegatronEngine, eos_token_ids

        return MegatronEngine(policy, groups.policy, arch, eos_token_ids(cfg.model.path),
                              pad_id=tokenizer.pad_token_id)
    from megatron_rlvr.rollout.vllm_engine import VllmEngine

    return VllmEngine(groups.rollout, cfg.model.path, dtype=cfg.model.dtype,
                      gpu_memory_utilization=cfg.rollout.gpu_memory_utilization,
                      enforce_eager=cfg.rollout.enforce_eager, cpu_plain_weights=cfg.rollout.cpu_plain_weights,
                      kv_cache_gib=cfg.rollout.kv_cache_gib,
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

    def __init__(self, engine, cfg: JobConfig, groups, tokenizer, pool, rank: int):
        self.engine = engine
        self.cfg = cfg
        self.groups = groups
        self.tokenizer = tokenizer
        self.pool = pool
        self.rank = rank
        self.overlap = cfg.rollout.one_step_off_policy
        self.weights_step = 0
        """the step of the weights the engine holds (advanced by the trainer after each sync)"""
        self._pending: list | None = None

    def _score(self, prompts, samples) -> tuple[list[float], list[float]]:
        from megatron_rlvr.rewards import shape_rewards

        texts = [self.tokenizer.decode(s.response_ids, skip_special_tokens=True) for s in samples]
        scores = self.pool.score((prompts[s.prompt_index].record.dataset, text,
                                  prompts[s.prompt_index].record.ground_truth) for s, text in zip(samples, texts))
        return scores, shape_rewards(scores, [s.finished for s in samples], texts, self.cfg.reward,
                                     [len(s.response_ids) for s in samples], self.cfg.rollout.max_tokens)

    def start(self, prompts, step: int, loader_state: dict, round_: int = 0) -> None:
        sampling = sampling_config(self.cfg, seed=self.cfg.train.seed * 1_000_003 + step + round_ * 100_003)
        prompt_ids = [list(p.prompt_ids) for p in prompts]
        t = time.perf_counter()
        if not self.overlap:
            shares = self.groups.engine_shares_ranks
            if shares:
                self.engine.wake()
            samples = self.engine.generate(prompt_ids, sampling)
            if shares:
                self.engine.sleep()
        else:
            rollout = self.groups.rollout
            samples = None
            if rollout.layout.is_rollout(self.rank):
                mine = self.engine.generate_local(prompt_ids, sampling)
                if rollout.engine_leaders is not None:  # engine leaders: their samples to rank 0
                    gathered = [None] * rollout.layout.num_engines if self.rank == 0 else None
                    dist.gather_object(mine, gathered, dst=0, group=rollout.engine_leaders)
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

    def step_rollouts(self, loader, step: int, ahead: ScoredRollouts | None = None) -> ScoredRollouts:
        """This step's rollouts: those begun during the previous step (`ahead`, one step off-policy), or drawn
        until the groups are informative (dynamic sampling), or one batch of prompts."""
        if ahead is not None:
            return ahead
        if self.cfg.algorithm.dynamic_sampling:
            return self.produce_informative(loader, step)
        return self.produce(next(loader), step, loader.state_dict())

    def evaluate(self, prompts, seed: int) -> float:
        """Greedy accuracy on `prompts` (the verifier's mean score), identical on every rank."""
        return evaluate(self.engine, prompts, self.cfg, self.tokenizer, self.pool, self.rank, seed)


def evaluate(engine, prompts, cfg: JobConfig, tokenizer, pool, rank: int, seed: int) -> float:
    """Greedy accuracy of `engine` on `prompts` (the verifier's mean score), identical on every rank."""
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
