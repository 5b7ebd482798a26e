"""Supervised warm start: next-token loss on the assistant's response tokens only, through the same TP x PP x DP
machinery as RLVR; the result is written as a HuggingFace directory that an RLVR config's `model.path` names.

Data: open-instruct SFT records, `{"messages": [..., {"role": "assistant", "content": ...}]}`. The prompt is
every message before the last (rendered with the chat template, ending with the generation prompt); the target
is the last, assistant, message followed by the EOS token. The loss of a batch is

    L = - sum_{i,t} m_it log p(x_{i,t+1} | x_{i,<=t}) / sum_{i,t} m_it

with m = 1 on response positions, over the global batch (all micro-batches and data-parallel ranks).
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
import time

import torch
import torch.distributed as dist

from megatron_rlvr.config import (ConfigError, ModelConfig, OptimizerConfig, ParallelConfig, _build, _set_dotted,
                                  parse_overrides)
from megatron_rlvr.models.check import check_model_parallel, model_arch
from megatron_rlvr.parallel.check import check_parallel
from megatron_rlvr.schedule import check_optimizer

logger = logging.getLogger(__name__)


@dataclasses.dataclass
class SFTDataConfig:
    train_files: list[str] = dataclasses.field(default_factory=list)
    """JSONL files of SFT records (messages ending with an assistant turn)."""
    chat_template: str = "tokenizer"
    """tokenizer (the model's own chat template) or a built-in one: tulu, plain."""
    max_length: int = 512
    """Examples longer than this many tokens (prompt + response) are dropped."""


@dataclasses.dataclass
class SFTTrainConfig:
    steps: int = 200
    """Optimizer steps."""
    batch_size: int = 32
    """Sequences per optimizer step (global, over data-parallel ranks)."""
    micro_batch_size: int = 16
    seed: int = 1
    optimizer: OptimizerConfig = dataclasses.field(default_factory=lambda: OptimizerConfig(lr=1e-4))


@dataclasses.dataclass
class SFTConfig:
    output_dir: str = "outputs/sft"
    """metrics.jsonl and the HF export (`<output_dir>/hf`) go here."""
    model: ModelConfig = dataclasses.field(default_factory=ModelConfig)
    parallel: ParallelConfig = dataclasses.field(default_factory=ParallelConfig)
    data: SFTDataConfig = dataclasses.field(default_factory=SFTDataConfig)
    train: SFTTrainConfig = dataclasses.field(default_factory=SFTTrainConfig)


def load_sft_config(path: str | None, overrides=()) -> SFTConfig:
    import yaml

    data: dict = {}
    if path is not None:
        if not os.path.isfile(path):
            raise ConfigError(f"config file {path!r} does not exist")
        with open(path) as f:
            data = yaml.safe_load(f) or {}
    for key, value in parse_overrides(list(overrides)):
        _set_dotted(data, key, value)
    return _build(SFTConfig, data)


def validate_sft(cfg: SFTConfig, world_size: int) -> int:
    """ConfigError on the first problem; returns the data-parallel size."""
    arch, source = model_arch(cfg.model.path, "", "model.path")
    if arch is None:
        raise ConfigError(f"model.path={cfg.model.path!r} has no config.json: point it at a HuggingFace Llama directory")
    tp, pp = cfg.parallel.tensor_parallel, cfg.parallel.pipeline_parallel
    check_model_parallel(arch, source, tp, pp)
    check_parallel(cfg.parallel)
    check_optimizer(cfg.train.optimizer, "train.optimizer")
    if not cfg.data.train_files:
        raise ConfigError("data.train_files is empty: list at least one JSONL file of SFT records")
    for path in cfg.data.train_files:
        if not os.path.isfile(path):
            raise ConfigError(f"data.train_files: file {path!r} does not exist")
    if world_size % (tp * pp):
        raise ConfigError(f"world size {world_size} is not a multiple of tensor_parallel x pipeline_parallel = {tp * pp}")
    dp = world_size // (tp * pp)
    if cfg.train.batch_size % dp:
        raise ConfigError(f"train.batch_size={cfg.train.batch_size} must be a multiple of data-parallel size {dp}")
    return dp


def load_sft_examples(files: list[str], tokenizer, template: str | None, max_length: int) -> list[tuple]:
    """(prompt ids, response ids) per record; records not ending with an assistant turn are errors."""
    from megatron_rlvr.data import render_prompt

    examples = []
    for path in files:
        with open(path) as f:
            for lineno, line in enumerate(f, 1):
                if not line.strip():
                    continue
                messages = json.loads(line).get("messages") or []
                if not messages or messages[-1].get("role") != "assistant":
                    raise ValueError(f"{path}:line {lineno}: an SFT record's last message must be the assistant's")
                prompt = render_prompt(messages[:-1], tokenizer, template)
                ids = tokenizer(prompt, add_special_tokens=False)["input_ids"]
                target = tokenizer(messages[-1]["content"], add_special_tokens=False)["input_ids"]
                target = target + [tokenizer.eos_token_id]
                if len(ids) + len(target) <= max_length:
                    examples.append((tuple(ids), tuple(target)))
    if not examples:
        raise ValueError(f"no SFT example of at most {max_length} tokens in {files}")
    return examples


def run_sft(cfg: SFTConfig) -> dict:
    """Train, then export `<output_dir>/hf`; returns the last step's metrics."""
    from transformers import AutoTokenizer

    from megatron_rlvr.checkpoint import export_hf
    from megatron_rlvr.data import PromptLoader
    from megatron_rlvr.metrics import MetricsWriter
    from megatron_rlvr.models.forward import forward_backward, split_micro_batches
    from megatron_rlvr.parallel.model import make_trainable
    from megatron_rlvr.parallel.state import init_distributed, init_model_parallel, seed_everything
    from megatron_rlvr.schedule import set_lr
    from megatron_rlvr.models.build import build_model
    from megatron_rlvr.watchdog import start_watchdog

    validate_sft(cfg, int(os.environ.get("WORLD_SIZE", "1")))
    rank, world = init_distributed(cfg.parallel.timeout_s)
    watchdog = start_watchdog(cfg.parallel, rank, world)
    watchdog.enter("startup", 0)
    seed_everything(cfg.train.seed)
    pg = init_model_parallel(cfg.parallel.tensor_parallel, cfg.parallel.pipeline_parallel, seed=cfg.train.seed)
    model, arch = build_model(cfg, cfg.model.path, pg)
    model, optimizer = make_trainable(model, pg, cfg.train.optimizer,
                                      use_distributed_optimizer=cfg.parallel.use_distributed_optimizer)
    tokenizer = AutoTokenizer.from_pretrained(cfg.model.path)
    template = None if cfg.data.chat_template == "tokenizer" else cfg.data.chat_template
    examples = load_sft_examples(cfg.data.train_files, tokenizer, template, cfg.data.max_length)
    loader = PromptLoader(examples, cfg.train.batch_size, seed=cfg.train.seed)
    dp, dp_rank = pg.dp.size(), pg.dp.rank()
    per_rank = cfg.train.batch_size // dp
    writer = MetricsWriter(cfg.output_dir, enabled=rank == 0, tensorboard=False)
    progress = None
    if rank == 0:
        from tqdm import tqdm

        progress = tqdm(total=cfg.train.steps, desc="sft", dynamic_ncols=True)
    record = {}
    for step in range(1, cfg.train.steps + 1):
        watchdog.enter("sft step", step)
        start = time.perf_counter()
        batch = next(loader)[dp_rank * per_rank:(dp_rank + 1) * per_rank]
        lengths = torch.tensor([len(p) + len(r) for p, r in batch])
        tokens = torch.full((len(batch), int(lengths.max())), tokenizer.pad_token_id, dtype=torch.long)
        mask = torch.zeros(len(batch), tokens.shape[1] - 1)
        for row, (prompt, response) in enumerate(batch):
            tokens[row, : lengths[row]] = torch.tensor(prompt + response)
            mask[row, len(prompt) - 1: lengths[row] - 1] = 1.0
        total = mask.sum()
        dist.all_reduce(total, group=pg.dp)

        def loss_fn(logprobs, entropy, mb, total=total):
            m = mb.fields["mask"]
            loss = -(logprobs * m).sum() / total
            return loss, {"loss": loss.detach(), "tokens": m.sum()}

        lr = set_lr(optimizer, cfg.train.optimizer, step, cfg.train.steps)
        model.zero_grad_buffer()
        optimizer.zero_grad()
        stats = forward_backward(model, split_micro_batches(tokens, cfg.train.micro_batch_size, {"mask": mask}, lengths),
                                 pg, valid_vocab_size=arch.vocab_size, loss_fn=loss_fn,
                                 fused_output=cfg.model.fused_output_logprobs)
        _, grad_norm, _ = optimizer.step()
        loss = torch.tensor(float(sum(s["loss"] for s in stats)))
        dist.all_reduce(loss)  # the per-rank shares of the global loss add up; non-last stages add 0
        loss = float(loss) / pg.tp.size()
        record = {"step": step, "loss": loss, "lr": lr, "grad_norm": float(grad_norm or 0.0),
                  "timing/step_s": time.perf_counter() - start}
        writer.log(record)
        if progress is not None:
            progress.update(1)
            progress.set_postfix(loss=f"{loss:.4f}")
    watchdog.enter("export", cfg.train.steps)
    export_hf(model, arch, pg, cfg.model.path, os.path.join(cfg.output_dir, "hf"))
    watchdog.stop()
    if progress is not None:
        progress.close()
    writer.close()
    return record
