"""The RLVR loop, top to bottom in one place.

    train(cfg):
        setup: check the config, model files and data; join the world and build every group (parallel.init_groups);
               policy (+ frozen reference, + value model for PPO) (models.build); prompts, rollout engine, weight
               sync, reward pool (rollout.producer); checkpointer, metrics; resume from the latest complete checkpoint
        for each step:
            1. rollout      every rank gets the same prompt batch; the engine samples rollout.n responses each
            2. verify       rank 0 scores the responses in the reward pool and broadcasts the shaped rewards
            3. log-probs    this DP rank's prompt groups: old policy (when more than one update), reference, value
            4. advantages   estimator by name (GRPO, RLOO, GAE, ...), KL as a reward penalty or a loss term
            5. update       algorithm.ppo_epochs x algorithm.mini_batches optimizer steps through the pipeline
                            schedule on packed micro-batches; the objectives are `algorithms.objectives`
            6. weight sync  the engine takes the new weights (a no-op when it samples with the trainer's model)
            7. log, evaluate, checkpoint (metrics.step_record)

Layouts: colocated, every rank does every phase, the engine sleeping while the model trains; split, the rollout
ranks hold no model and skip phases 3-5. With `rollout.one_step_off_policy` (split) the rollout ranks sample and
score step n+1 with the weights of step n-1 while the trainer ranks run phases 3-5 of step n:

    rollout ranks   | generate n+1 (w[n-1]), score |  hand over n+1  | sync w[n] | generate n+2 (w[n]) ...
    trainer ranks   | log-probs, update on n       |  hand over n+1  | sync w[n] | log-probs, update on n+1 ...

Per-token tensors live in the log-prob frame of the rows `[prompt | response | padding]` (`data.rollout_batch`).
"""

from __future__ import annotations

import dataclasses
import logging
import os
import time

import torch
import torch.distributed as dist

from megatron_rlvr.config import JobConfig, save_config, token_budget
from megatron_rlvr.data.rollout_batch import RolloutBatch, pack_rollouts
from megatron_rlvr.metrics import combine_micro_batches, gather_mean, mean_stats, step_record
from megatron_rlvr.models.build import Models
from megatron_rlvr.platform import current_platform
from megatron_rlvr.rollout.producer import RolloutFactory

logger = logging.getLogger(__name__)


def train(cfg: JobConfig, *, rollout_factory: RolloutFactory | None = None) -> dict:
    """Run RLVR as configured; returns the last step's metrics (on every rank).

    In the split layout the rollout ranks hold no model: they take part in generation, the weight sync, metrics,
    evaluation and checkpoints (all collective over the world) and skip the log-prob and update phases."""
    job = Job.setup(cfg, rollout_factory)
    start_step = job.resume()
    if job.eval_prompts is not None and start_step == 0:  # the starting policy: the eval curve's baseline
        job.log({"step": 0, "eval/accuracy": job.evaluate(0)})
    overlap = cfg.rollout.one_step_off_policy
    record: dict = {}
    ahead = None  # the next step's rollouts, begun while this one trains (one step off-policy)
    for step in range(start_step + 1, cfg.train.steps + 1):
        step_start = time.perf_counter()
        timing = {"rollout_wait_s": 0.0}
        # 1-2. this step's rollouts, sampled and scored (unless begun during the previous step)
        job.watchdog.enter("rollout", step)
        rollouts, ahead = job.producer.step_rollouts(job.loader, step, ahead), None
        if overlap and step < cfg.train.steps:  # the rollout ranks sample step + 1 with the weights they hold
            job.producer.start(next(job.loader), step + 1, job.loader.state_dict())

        # 3-5. log-probs, advantages, updates (trainer ranks)
        job.watchdog.enter("train", step)
        t = time.perf_counter()
        local_stats = None
        if job.groups.trains:
            local_stats = train_step(job.models, job.arch, job.groups.policy, cfg, rollouts, job.kl_ctl.value,
                                     step, job.tokenizer.pad_token_id)
        job.platform.synchronize()
        timing["train_s"] = time.perf_counter() - t
        if overlap and step < cfg.train.steps:
            job.watchdog.enter("rollout handover", step)
            t = time.perf_counter()
            ahead = job.producer.finish()
            timing["rollout_wait_s"] = time.perf_counter() - t  # the generation that training did not hide

        # 6. weight sync
        job.watchdog.enter("sync", step)
        timing["sync_s"], timing["sync_check_s"] = job.sync_weights(step)

        # 7. metrics, evaluation, checkpoint
        job.watchdog.enter("metrics", step)
        stats = gather_mean(local_stats)
        kl_coef = job.kl_ctl.value
        if cfg.algorithm.target_kl is not None and "kl_penalty/kl_seq" in stats:
            job.kl_ctl.update(stats["kl_penalty/kl_seq"], len(rollouts.samples))
        timing["step_s"] = time.perf_counter() - step_start
        record = step_record(step, rollouts, stats, timing, kl_coef=kl_coef,
                             peak_memory_gib=job.platform.max_memory_allocated() / 2**30)
        if job.eval_due(step):
            record["eval/accuracy"] = job.evaluate(step)
        job.log(record)
        if job.checkpoint_due(step):
            job.watchdog.enter("checkpoint", step)
            # the loader's position right after this step's prompts: a resume samples the next step anew
            job.checkpointer.save(step, {"loader": rollouts.loader_state, "kl_controller": job.kl_ctl.state_dict()})
    job.finish()
    return record


# ------------------------------------------------------------------------------------------------ the job


@dataclasses.dataclass
class Job:
    """What the loop works with on this rank, built by `setup`."""

    cfg: JobConfig
    rank: int
    groups: object
    """`parallel.Groups`"""
    models: Models | None
    """None on the split layout's rollout-only ranks"""
    arch: object
    tokenizer: object
    loader: object
    engine: object
    weight_sync: object
    """`sync.weight_sync.WeightSync` (or `NoSync` for an engine that samples with the trainer's model)"""
    producer: object
    pool: object | None
    kl_ctl: object
    checkpointer: object
    watchdog: object
    eval_prompts: list | None
    platform: object
    writer: object | None = None
    """`metrics.MetricsWriter`, opened by `resume` (it cuts the metrics back to the resumed step)"""
    progress: object | None = None

    @classmethod
    def setup(cls, cfg: JobConfig, rollout_factory: RolloutFactory | None = None) -> "Job":
        """Check the config, model files and every data record before any process group exists; then join the
        world and build the groups, models, rollout engine, reward pool, checkpointer and metrics writer."""
        from transformers import AutoTokenizer

        from megatron_rlvr.algorithms import make_kl_controller
        from megatron_rlvr.checkpoint import Checkpointer
        from megatron_rlvr.data import PromptLoader
        from megatron_rlvr.models.build import build_models
        from megatron_rlvr.parallel.check import check_world, value_parallel_sizes
        from megatron_rlvr.parallel.groups import init_groups
        from megatron_rlvr.parallel.state import init_distributed, seed_everything
        from megatron_rlvr.preflight import check_model_files, load_prompt_sets, validate
        from megatron_rlvr.rewards import RewardPool
        from megatron_rlvr.rollout.producer import RolloutProducer, build_engine
        from megatron_rlvr.sync.weight_sync import build_weight_sync
        from megatron_rlvr.watchdog import start_watchdog

        validate(cfg, int(os.environ.get("WORLD_SIZE", "1")))
        check_model_files(cfg.model.path)
        tokenizer = AutoTokenizer.from_pretrained(cfg.model.path)
        dataset, eval_prompts = load_prompt_sets(cfg, tokenizer)
        rank, world = init_distributed(cfg.parallel.timeout_s)
        watchdog = start_watchdog(cfg.parallel, rank, world)
        watchdog.enter("startup", 0)
        dp_size = check_world(cfg, world)
        seed_everything(cfg.train.seed)
        groups = init_groups(cfg, world, vllm=cfg.rollout.backend == "vllm" and rollout_factory is None)
        models, arch = build_models(cfg, groups)
        engine = build_engine(cfg, groups, models, arch, tokenizer, rollout_factory)
        weight_sync = build_weight_sync(engine, groups.rollout, probe_interval=cfg.rollout.sync_probe_interval,
                                        probe_atol=cfg.rollout.sync_probe_atol)
        pool = RewardPool(cfg.reward.workers, cfg.reward.timeout_s) if rank == 0 else None
        par = cfg.parallel
        layout = {"world": world, "layout": par.layout, "tp": par.tensor_parallel, "pp": par.pipeline_parallel,
                  "dp": dp_size, "stage_layers": [par.pipeline_first_stage_layers, par.pipeline_last_stage_layers]}
        # every rank names every model (dist_checkpointing is collective over the world); None where not held
        named_models = {"policy": models.policy if models else None}
        named_optimizers = {"policy": models.optimizer} if models else {}
        if cfg.algorithm.advantage_estimator == "gae":
            layout["value_tp_pp"] = list(value_parallel_sizes(par))
            named_models["value"] = models.value if models else None
            if models:
                named_optimizers["value"] = models.value_optimizer
        checkpointer = Checkpointer(os.path.join(cfg.output_dir, "checkpoints"), named_models, named_optimizers,
                                    layout, keep=cfg.checkpoint.keep)
        return cls(cfg, rank, groups, models, arch, tokenizer,
                   PromptLoader(dataset, cfg.train.prompts_per_step, seed=cfg.train.seed, shuffle=cfg.data.shuffle),
                   engine, weight_sync, RolloutProducer(engine, cfg, groups, tokenizer, pool, rank), pool,
                   make_kl_controller(cfg.algorithm.kl_coef, cfg.algorithm.target_kl), checkpointer, watchdog,
                   eval_prompts, current_platform())

    @property
    def policy(self):
        return self.models.policy if self.models is not None else None

    def resume(self) -> int:
        """Load the latest complete checkpoint, if any, into the models, the loader and the KL controller (the
        engine takes the loaded weights); open the metrics (cut back to that step) and the progress bar. Returns
        the step to continue after (0: a fresh start)."""
        from megatron_rlvr.checkpoint import remove_incomplete
        from megatron_rlvr.metrics import MetricsWriter

        cfg = self.cfg
        self.watchdog.enter("resume", 0)
        state, resumed_from = self.checkpointer.load_latest()
        start_step = 0
        if state is not None:
            start_step = state["step"]
            self.loader.load_state_dict(state["loader"])
            self.kl_ctl.load_state_dict(state["kl_controller"])
            self.weight_sync.push(self.policy)
            self.producer.weights_step = start_step
            if self.rank == 0:
                logger.info("resumed from step %d (%s)", start_step, resumed_from)
        if self.rank == 0:
            os.makedirs(cfg.output_dir, exist_ok=True)
            remove_incomplete(self.checkpointer.root)
            save_config(cfg, os.path.join(cfg.output_dir, "config.yaml"))
        self.writer = MetricsWriter(cfg.output_dir, enabled=self.rank == 0, tensorboard=cfg.metrics.tensorboard,
                                    resume_step=start_step)
        if self.rank == 0 and cfg.metrics.progress_bar:
            from tqdm import tqdm

            self.progress = tqdm(total=cfg.train.steps, initial=start_step, desc="rlvr", dynamic_ncols=True)
        return start_step

    def sync_weights(self, step: int) -> tuple[float, float]:
        """The engine takes the policy's weights after `step` (into an awake engine: the check after the sync runs
        the engine's model); returns (seconds of the sync, seconds of its check)."""
        t = time.perf_counter()
        if self.groups.engine_shares_ranks:
            self.engine.wake()
        check_s = self.weight_sync.push(self.policy).check_seconds
        self.producer.weights_step = step
        return time.perf_counter() - t - check_s, check_s

    def evaluate(self, step: int) -> float:
        self.watchdog.enter("eval", step)
        return self.producer.evaluate(self.eval_prompts, seed=step)

    def eval_due(self, step: int) -> bool:
        interval = self.cfg.train.eval_interval
        return self.eval_prompts is not None and ((interval and step % interval == 0) or step == self.cfg.train.steps)

    def checkpoint_due(self, step: int) -> bool:
        interval = self.cfg.checkpoint.interval
        return bool(interval and step % interval == 0) or step == self.cfg.train.steps

    def log(self, record: dict) -> None:
        self.writer.log(record)
        if self.progress is not None and "reward_mean" in record:
            self.progress.update(1)
            self.progress.set_postfix(reward=f"{record['reward_mean']:.3f}", kl=f"{record['kl']:.4f}",
                                      step_s=f"{record['timing/step_s']:.1f}")

    def finish(self) -> None:
        """Export the final policy (`checkpoint.export_hf`), stop the watchdog, close the metrics and the pool."""
        from megatron_rlvr.checkpoint import export_hf

        if self.cfg.checkpoint.export_hf:
            self.watchdog.enter("export", self.cfg.train.steps)
            export_hf(self.policy, self.arch, self.groups.policy, self.cfg.model.path,
                      os.path.join(self.cfg.output_dir, "hf"))
        self.watchdog.stop()
        if self.progress is not None:
            self.progress.close()
        self.writer.close()
        if self.pool is not None:
            self.pool.close()


# ------------------------------------------------------------------------------------------------ one step


def train_step(models: Models, arch, pg, cfg: JobConfig, rollouts, kl_coef: float, step: int,
               pad_id: int) -> dict | None:
    """Log-probs, advantages and the mini-batch updates of one step on a trainer rank; returns the step's update
    stats on the ranks that report them (last pipeline stage, TP rank 0, of the policy's or the value model's
    grid), None elsewhere.

    The value model may have a grid of its own (`models.value_pg`): its data-parallel ranks then hold other prompt
    groups than the policy's. Values are computed on the value grid's share and gathered for the advantages;
    returns go back the same way for the value update."""
    from megatron_rlvr.algorithms import compute_advantages, kl_reward_penalty
    from megatron_rlvr.models.value import gather_rows, prompt_share

    algo = cfg.algorithm
    samples, rewards = rollouts.samples, rollouts.rewards
    # off-policy samples: the ratio is taken against the trainer's own log-probs before the update
    needs_old = algo.ppo_epochs * algo.mini_batches > 1 or cfg.rollout.one_step_off_policy
    # 3. this DP rank's prompt groups; log-probs of old policy / reference, values
    t = time.perf_counter()
    mine = prompt_share(pg, samples, cfg.train.prompts_per_step)
    local = [i for i, s in enumerate(samples) if s.prompt_index in mine]
    batch = pack_rollouts([samples[i] for i in local], [rewards[i] for i in local], pad_id)
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
            vbatch = pack_rollouts([samples[i] for i in vlocal], [rewards[i] for i in vlocal], pad_id)
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


def per_token(model, batch: RolloutBatch, pg, cfg: JobConfig, vocab: int, *, value_model: bool = False):
    """Forward-only log-probs (or values) `[B, S-1]` of `batch` on every PP stage of this DP rank."""
    from megatron_rlvr.models.forward import broadcast_from_last_stage, forward_backward, scatter_rows

    mbs = micro_batches_of(batch, cfg)
    with torch.no_grad():
        out = forward_backward(model, mbs, pg, valid_vocab_size=vocab, temperature=cfg.rollout.temperature,
                               value_model=value_model, fused_output=cfg.model.fused_output_logprobs)
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


def _global_denominator(batch: RolloutBatch, cfg: JobConfig, group) -> torch.Tensor:
    """The mini-batch's loss normaliser summed over the data-parallel group (`algorithms.loss_denominator`)."""
    from megatron_rlvr.algorithms import loss_denominator

    value = loss_denominator(batch.mask, cfg.algorithm.loss_agg_mode, cfg.rollout.max_tokens).detach().clone().float()
    dist.all_reduce(value, group=group)
    return value


def update_policy(models: Models, batch: RolloutBatch, pg, cfg: JobConfig, vocab: int, kl_coef: float) -> list[dict]:
    """One optimizer step on `batch` (a mini-batch); returns its stats (`metrics.combine_micro_batches`) on the
    last pipeline stage, in a list of one, and an empty list elsewhere."""
    from megatron_rlvr.algorithms.objectives import policy_objective
    from megatron_rlvr.models.forward import forward_backward

    objective = policy_objective(cfg.algorithm, norm_constant=cfg.rollout.max_tokens,
                                 denominator=_global_denominator(batch, cfg, pg.dp), kl_coef=kl_coef)
    mbs = micro_batches_of(batch, cfg, {"mask": batch.mask, **batch.fields})
    models.policy.zero_grad_buffer()
    models.optimizer.zero_grad()
    stats = forward_backward(models.policy, mbs, pg, valid_vocab_size=vocab, loss_fn=objective,
                             temperature=cfg.rollout.temperature, want_entropy=True,
                             fused_output=cfg.model.fused_output_logprobs)
    ok, grad_norm, _ = models.optimizer.step()
    if not stats:  # not the last pipeline stage
        return []
    update = combine_micro_batches(stats, [mb.fields["mask"].sum() for mb in mbs])
    update["actor/grad_norm"] = float(grad_norm) if grad_norm is not None else float("nan")
    update["actor/update_skipped"] = float(not ok)
    return [update]


def update_value(models: Models, batch: RolloutBatch, pg, cfg: JobConfig) -> list[dict]:
    """One optimizer step of the value model on `batch`; its stats as `update_policy`'s."""
    from megatron_rlvr.algorithms.objectives import value_objective
    from megatron_rlvr.models.forward import forward_backward

    objective = value_objective(cfg.algorithm, norm_constant=cfg.rollout.max_tokens,
                                denominator=_global_denominator(batch, cfg, pg.dp))
    fields = {"mask": batch.mask, "values": batch.fields["values"], "returns": batch.fields["returns"]}
    mbs = micro_batches_of(batch, cfg, fields)
    models.value.zero_grad_buffer()
    models.value_optimizer.zero_grad()
    stats = forward_backward(models.value, mbs, pg, valid_vocab_size=1, loss_fn=objective, value_model=True)
    models.value_optimizer.step()
    return [combine_micro_batches(stats, [mb.fields["mask"].sum() for mb in mbs])] if stats else []
