"""The DPO loop, top to bottom:

    run_dpo(cfg):
        validate, join the world, build TP x PP x DP groups      (parallel.state)
        the policy from model.path (the SFT model), trainable    (parallel.model)
        pairs, loader, checkpointer, metrics; resume from the latest complete checkpoint
        reference log-probs: cached once before training with the starting weights (kept in
                             <output_dir>/reference_logps.pt, so a resume reads them back), or a frozen reference
                             model that scores each batch
        held-out pairs scored at step 0
        for each step:
            this data-parallel rank's share of the batch, packed two sequences per pair into micro-batches
            forward-backward through the pipeline schedule; each micro-batch's loss is its pairs' share of the mean
            optimizer step (learning rate from the schedule), metrics, evaluation, checkpoint
        export the policy as a HuggingFace directory (checkpoint.export_hf / --export-hf)

Sequence log-probs are sums over response tokens of the fused kernel's token log-probs; the loss
(`megatron_rlvr.algorithms.dpo`) turns them into per-pair losses and implicit rewards.
"""

from __future__ import annotations

import logging
import os
import time

import torch
import torch.distributed as dist

from megatron_rlvr.algorithms.dpo import REFERENCE_FREE, PairLogps, get_dpo_loss
from megatron_rlvr.dpo.config import DPOConfig, validate_dpo
from megatron_rlvr.dpo.data import TokenPair, load_pairs, pair_micro_batches
from megatron_rlvr.platform import current_platform

logger = logging.getLogger(__name__)

REFERENCE_FILE = "reference_logps.pt"
STAT_KEYS = ("loss", "rewards/chosen", "rewards/rejected", "rewards/accuracy", "rewards/margin", "logps/chosen",
             "logps/rejected", "pairwise_accuracy")
"""Per-pair means logged each step (and with an `eval/` prefix on held-out pairs)."""


def _split_rows(values: torch.Tensor, tokens: torch.Tensor) -> PairLogps:
    """Rows interleaved chosen, rejected, chosen, ... -> PairLogps."""
    return PairLogps(values[0::2], values[1::2], tokens[0::2], tokens[1::2])


def pair_loss(cfg: DPOConfig, policy: PairLogps, reference: PairLogps | None):
    """(per-pair losses, sums of the STAT_KEYS over the pairs as a tensor) for the configured loss."""
    loss = cfg.loss
    losses, chosen, rejected = get_dpo_loss(loss.name)(policy, reference, beta=loss.beta,
                                                       label_smoothing=loss.label_smoothing,
                                                       gamma_beta_ratio=loss.gamma_beta_ratio)
    averaged = policy.averaged()
    sums = torch.stack([
        losses.detach().sum(), chosen.sum(), rejected.sum(), (chosen > rejected).float().sum(),
        (chosen - rejected).sum(), policy.chosen.detach().sum(), policy.rejected.detach().sum(),
        (averaged.chosen > averaged.rejected).float().sum()]).float()
    return losses, sums


def _reduce_stats(sums: torch.Tensor | None, pairs: int, pg) -> dict[str, float]:
    """Means over the global batch of the per-pair sums held by each replica's last stage, TP rank 0."""
    total = torch.zeros(len(STAT_KEYS), device=current_platform().device())
    if sums is not None and pg.tp.rank() == 0:
        total += sums.to(total.device)
    dist.all_reduce(total)
    return {key: float(v) / pairs for key, v in zip(STAT_KEYS, total.tolist())}


def local_sequence_logps(model, pairs: list[TokenPair], cfg: DPOConfig, pg, vocab: int) -> torch.Tensor | None:
    """Forward-only summed response log-probs `[len(pairs), 2]` (chosen, rejected) on the last pipeline stage (every
    TP rank of it); None on the other stages."""
    from megatron_rlvr.models.forward import forward_backward

    mbs = pair_micro_batches(pairs, cfg.train.micro_batch_size, device=current_platform().device())
    with torch.no_grad():
        results = forward_backward(model, mbs, pg, valid_vocab_size=vocab, fused_output=cfg.model.fused_output_logprobs)
    if not results:
        return None
    return torch.cat([(r["logprobs"] * mb.fields["mask"]).sum(-1) for r, mb in zip(results, mbs)]).view(-1, 2).float()


def sequence_logps(model, pairs: list[TokenPair], cfg: DPOConfig, pg, vocab: int) -> torch.Tensor:
    """`local_sequence_logps` of all `pairs`, scored by the data-parallel ranks in turn (pair i on rank i mod DP) and
    gathered: every rank gets `[len(pairs), 2]`."""
    device = current_platform().device()
    indices = list(range(pg.dp.rank(), len(pairs), pg.dp.size()))
    out = torch.zeros(len(pairs), 2, device=device)
    if indices:
        local = local_sequence_logps(model, [pairs[i] for i in indices], cfg, pg, vocab)
        if local is not None and pg.tp.rank() == 0:
            out[torch.tensor(indices, device=device)] = local
    dist.all_reduce(out)
    return out


def _token_counts(pairs: list[TokenPair]) -> torch.Tensor:
    return torch.tensor([[len(p.chosen), len(p.rejected)] for p in pairs], dtype=torch.float32)


def evaluate_pairs(policy_model, reference: torch.Tensor | None, pairs: list[TokenPair], cfg: DPOConfig, pg,
                   vocab: int) -> dict[str, float]:
    """The STAT_KEYS means on held-out `pairs` (no update), `eval/`-prefixed; `reference` `[M, 2]` as cached."""
    policy = sequence_logps(policy_model, pairs, cfg, pg, vocab).cpu()
    counts = _token_counts(pairs)
    as_pairs = lambda v: PairLogps(v[:, 0], v[:, 1], counts[:, 0], counts[:, 1])  # noqa: E731
    _, sums = pair_loss(cfg, as_pairs(policy), as_pairs(reference.cpu()) if reference is not None else None)
    return {f"eval/{k}": float(v) / len(pairs) for k, v in zip(STAT_KEYS, sums.tolist())}


def _reference_cache(cfg: DPOConfig, policy, train_pairs, eval_pairs, pg, vocab, rank) -> dict:
    """The cached reference log-probs {"train": [N, 2], "eval": [M, 2]}: read back from <output_dir> (a resumed
    run: the policy has moved since) or computed now with the starting weights and written there."""
    path = os.path.join(cfg.output_dir, REFERENCE_FILE)
    if os.path.isfile(path):
        cache = torch.load(path)
        if cache["train"].shape[0] != len(train_pairs) or cache["model"] != cfg.model.path:
            raise RuntimeError(f"{path} holds reference log-probs of {cache['train'].shape[0]} pairs of "
                               f"{cache['model']}, this run has {len(train_pairs)} of {cfg.model.path}: use a new "
                               "output_dir or delete the file")
        return cache
    started = time.perf_counter()
    cache = {"model": cfg.model.path, "train": sequence_logps(policy, train_pairs, cfg, pg, vocab).cpu()}
    if eval_pairs:
        cache["eval"] = sequence_logps(policy, eval_pairs, cfg, pg, vocab).cpu()
    if rank == 0:
        os.makedirs(cfg.output_dir, exist_ok=True)
        tmp = f"{path}.tmp"
        torch.save(cache, tmp)
        os.replace(tmp, path)
        logger.info("cached reference log-probs of %d pairs in %.1f s", len(train_pairs), time.perf_counter() - started)
    dist.barrier()
    return cache


def total_steps(cfg: DPOConfig, num_pairs: int) -> int:
    """train.steps, or train.epochs passes over `num_pairs` pairs."""
    return cfg.train.steps or max(cfg.train.epochs * num_pairs // cfg.train.batch_size, 1)


def run_dpo(cfg: DPOConfig) -> dict:
    """Train as configured; returns the last step's metrics (on every rank). Collective over the world."""
    from transformers import AutoTokenizer

    from megatron_rlvr.checkpoint import Checkpointer, export_hf, latest_checkpoint, remove_incomplete
    from megatron_rlvr.data import PromptLoader
    from megatron_rlvr.config import save_config
    from megatron_rlvr.metrics import MetricsWriter
    from megatron_rlvr.models.forward import forward_backward
    from megatron_rlvr.parallel.model import make_trainable
    from megatron_rlvr.parallel.state import init_distributed, init_model_parallel, seed_everything
    from megatron_rlvr.schedule import set_lr
    from megatron_rlvr.models.build import build_model
    from megatron_rlvr.watchdog import start_watchdog

    validate_dpo(cfg, int(os.environ.get("WORLD_SIZE", "1")))
    rank, world = init_distributed(cfg.parallel.timeout_s)
    watchdog = start_watchdog(cfg.parallel, rank, world)
    watchdog.enter("startup", 0)
    seed_everything(cfg.train.seed)
    par = cfg.parallel
    pg = init_model_parallel(par.tensor_parallel, par.pipeline_parallel, seed=cfg.train.seed)
    model, arch = build_model(cfg, cfg.model.path, pg)
    model, optimizer = make_trainable(model, pg, cfg.train.optimizer,
                                      use_distributed_optimizer=par.use_distributed_optimizer)
    vocab = arch.vocab_size
    tokenizer = AutoTokenizer.from_pretrained(cfg.model.path)
    template = None if cfg.data.chat_template == "tokenizer" else cfg.data.chat_template
    train_pairs = load_pairs(cfg.data.train_files, tokenizer, template, cfg.data.max_length)
    eval_pairs = load_pairs(cfg.data.eval_files, tokenizer, template, cfg.data.max_length) if cfg.data.eval_files \
        else []
    loader = PromptLoader(range(len(train_pairs)), cfg.train.batch_size, seed=cfg.train.seed)
    steps = total_steps(cfg, len(train_pairs))
    dp, dp_rank = pg.dp.size(), pg.dp.rank()
    per_rank = cfg.train.batch_size // dp
    device = current_platform().device()

    # -- resume
    ckpt_root = os.path.join(cfg.output_dir, "checkpoints")
    layout = {"world": world, "tp": par.tensor_parallel, "pp": par.pipeline_parallel, "dp": dp,
              "stage_layers": [par.pipeline_first_stage_layers, par.pipeline_last_stage_layers]}
    checkpointer = Checkpointer(ckpt_root, {"policy": model}, {"policy": optimizer}, layout, keep=cfg.checkpoint.keep)
    latest = [latest_checkpoint(ckpt_root) if rank == 0 else None]
    dist.broadcast_object_list(latest, src=0)

    # -- reference log-probs (before any update, or read back on resume)
    needs_reference = cfg.loss.name not in REFERENCE_FREE
    cache, reference_model = {}, None
    if needs_reference and cfg.loss.reference == "cached":
        if latest[0] is not None and not os.path.isfile(os.path.join(cfg.output_dir, REFERENCE_FILE)):
            raise RuntimeError(f"{cfg.output_dir} has a checkpoint but no {REFERENCE_FILE}: the starting weights' "
                               "log-probs cannot be recomputed from moved weights; start a new output_dir")
        cache = _reference_cache(cfg, model, train_pairs, eval_pairs, pg, vocab, rank)
    elif needs_reference:
        reference_model, _ = build_model(cfg, cfg.model.path, pg, frozen=True)

    start_step = 0
    watchdog.enter("resume", 0)
    state, resumed_from = checkpointer.load_latest() if latest[0] is not None else (None, None)
    if state is not None:
        start_step = state["step"]
        loader.load_state_dict(state["loader"])
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

        progress = tqdm(total=steps, initial=start_step, desc="dpo", dynamic_ncols=True)

    def held_out() -> dict[str, float]:
        reference = cache.get("eval")
        if reference_model is not None:
            reference = sequence_logps(reference_model, eval_pairs, cfg, pg, vocab)
        return evaluate_pairs(model, reference, eval_pairs, cfg, pg, vocab)

    if eval_pairs and start_step == 0:
        writer.log({"step": 0, **held_out()})

    record: dict = {}
    for step in range(start_step + 1, steps + 1):
        watchdog.enter("dpo step", step)
        started = time.perf_counter()
        batch = next(loader)
        loader_state = loader.state_dict()
        mine = batch[dp_rank * per_rank:(dp_rank + 1) * per_rank]
        pairs = [train_pairs[i] for i in mine]
        reference = None
        if reference_model is not None:  # needed where the loss is computed: the last stage
            reference = local_sequence_logps(reference_model, pairs, cfg, pg, vocab)
        elif needs_reference:
            reference = cache["train"][mine]
        mbs = pair_micro_batches(pairs, cfg.train.micro_batch_size, reference, device=device)
        step_sums = []

        def loss_fn(logprobs, entropy, mb):
            mask = mb.fields["mask"]
            counts = mask.sum(-1)
            policy = _split_rows((logprobs * mask).sum(-1), counts)
            ref = _split_rows(mb.fields["reference"], counts) if "reference" in mb.fields else None
            losses, sums = pair_loss(cfg, policy, ref)
            step_sums.append(sums)
            return losses.sum() / cfg.train.batch_size, {}

        lr = set_lr(optimizer, cfg.train.optimizer, step, steps)
        model.zero_grad_buffer()
        optimizer.zero_grad()
        forward_backward(model, mbs, pg, valid_vocab_size=vocab, loss_fn=loss_fn,
                         fused_output=cfg.model.fused_output_logprobs)
        ok, grad_norm, _ = optimizer.step()
        stats = _reduce_stats(torch.stack(step_sums).sum(0) if step_sums else None, cfg.train.batch_size, pg)
        tokens = torch.tensor(float(sum(p.tokens for p in pairs)))
        dist.all_reduce(tokens)
        step_s = time.perf_counter() - started
        record = {"step": step, **{k: v for k, v in stats.items() if k != "pairwise_accuracy"},
                  "lr": lr, "grad_norm": float(grad_norm) if grad_norm is not None else float("nan"),
                  "update_skipped": float(not ok),
                  "tokens_per_s": float(tokens) / (pg.tp.size() * pg.pp.size()) / step_s, "timing/step_s": step_s}
        if eval_pairs and ((cfg.train.eval_interval and step % cfg.train.eval_interval == 0) or step == steps):
            record.update(held_out())
        writer.log(record)
        if progress is not None:
            progress.update(1)
            progress.set_postfix(loss=f"{record['loss']:.4f}", acc=f"{record['rewards/accuracy']:.2f}",
                                 margin=f"{record['rewards/margin']:.3f}")
        interval = cfg.checkpoint.interval
        if (interval and step % interval == 0) or step == steps:
            watchdog.enter("checkpoint", step)
            checkpointer.save(step, {"loader": loader_state})

    if cfg.checkpoint.export_hf:
        watchdog.enter("export", steps)
        export_hf(model, arch, pg, cfg.model.path, os.path.join(cfg.output_dir, "hf"))
    watchdog.stop()
    if progress is not None:
        progress.close()
    writer.close()
    return record
