"""The `megatron-rlvr dpo` job config: typed sections with a docstring per field, YAML plus dotted overrides, checked
before any process group exists (the same machinery as `train`'s config.py).

    cfg = load_dpo_config("examples/configs/demo-dpo.yaml", ["train.steps=40"])
    validate_dpo(cfg, world_size=2)
"""

from __future__ import annotations

import copy
import dataclasses
import os

import yaml

from megatron_rlvr.config import (CheckpointConfig, ConfigError, MetricsConfig, ModelConfig, OptimizerConfig,
                                  ParallelConfig, _build, _resolve_relative, _set_dotted, check_files, parse_overrides)
from megatron_rlvr.models.check import check_model_parallel, model_arch
from megatron_rlvr.parallel.check import check_declared_world, check_parallel, policy_stage_layers


@dataclasses.dataclass
class DPODataConfig:
    train_files: list[str] = dataclasses.field(default_factory=list)
    """Preference records (JSONL): open-instruct's `chosen` and `rejected` message lists, the same prompt messages
    followed by one assistant turn each."""
    eval_files: list[str] = dataclasses.field(default_factory=list)
    """Held-out preference records, scored (no update) at step 0, every train.eval_interval steps and at the end."""
    chat_template: str = "tokenizer"
    """tokenizer (the model's own chat template) or a built-in one: tulu, plain."""
    max_length: int = 1024
    """Pairs whose longer sequence (prompt + response) has more tokens than this are dropped (and counted)."""


@dataclasses.dataclass
class DPOLossConfig:
    name: str = "dpo_norm"
    """Registered loss (megatron_rlvr.algorithms.dpo): sigmoid (DPO), dpo_norm (Tülu 3's length-normalised DPO),
    ipo, simpo (reference-free)."""
    beta: float = 5.0
    """Inverse temperature of the implicit reward (Tülu 3 with dpo_norm: 5; plain DPO usually 0.1)."""
    label_smoothing: float = 0.0
    """Probability that a pair's label is flipped (conservative DPO); sigmoid, dpo_norm and simpo."""
    gamma_beta_ratio: float = 0.3
    """simpo: the target margin gamma as a multiple of beta."""
    reference: str = "cached"
    """cached: the reference log-probs of every pair are computed once before training with the starting weights
    and kept in <output_dir>/reference_logps.pt (open-instruct's dpo_tune_cache; no reference model in memory
    while training); on_the_fly: a frozen reference model computes them for each batch."""


@dataclasses.dataclass
class DPOTrainConfig:
    steps: int = 0
    """Optimizer steps in total (a resumed run continues up to this); 0: train.epochs passes over the pairs."""
    epochs: int = 1
    """Passes over the training pairs when train.steps is 0."""
    batch_size: int = 32
    """Pairs per optimizer step (global, over data-parallel ranks)."""
    micro_batch_size: int = 8
    """Pairs per micro-batch; both sequences of a pair go into the same packed micro-batch."""
    seed: int = 1
    """Seeds the pair order."""
    eval_interval: int = 0
    """Score data.eval_files every this many steps (0: at step 0 and at the end only)."""
    optimizer: OptimizerConfig = dataclasses.field(
        default_factory=lambda: OptimizerConfig(lr=5e-7, warmup_ratio=0.1, schedule="linear", adam_beta2=0.999))


@dataclasses.dataclass
class PairsConfig:
    """`megatron-rlvr dpo --make-pairs`: preference pairs from the verifiers."""

    prompt_files: list[str] = dataclasses.field(default_factory=list)
    """RLVR records (messages, ground_truth, dataset) whose prompts are sampled."""
    output_file: str = ""
    """Where the pairs go (JSONL, the preference format of data.train_files); empty: <output_dir>/pairs.jsonl."""
    samples_per_prompt: int = 8
    """Responses sampled per prompt (K)."""
    pairs_per_prompt: int = 1
    """Pairs written per prompt at most, each a different verified and a different failed response."""
    backend: str = "vllm"
    """vllm: in-process vLLM engines (one per rank, TP parallel.rollout_tensor_parallel); megatron: the
    megatron model itself, for machines without vLLM."""
    temperature: float = 1.0
    top_p: float = 1.0
    max_tokens: int = 256
    """Response length limit; a response cut here is scored like any other."""
    max_prompt_length: int = 512
    """Prompts longer than this many tokens are dropped (and counted)."""
    prompts_per_batch: int = 64
    """Prompts generated together (bounds the engine's memory)."""
    gpu_memory_utilization: float = 0.5
    """vllm: share of device memory for weights and KV cache (<= 0.5 on CPU)."""
    reward_workers: int = 2
    """Verifier worker processes."""
    reward_timeout_s: float = 10.0
    """Seconds one verification may take before it scores 0."""


@dataclasses.dataclass
class DPOConfig:
    output_dir: str = "outputs/dpo"
    """metrics.jsonl, checkpoints/, tensorboard/, reference_logps.pt and hf/ go here; a restart resumes."""
    model: ModelConfig = dataclasses.field(default_factory=ModelConfig)
    parallel: ParallelConfig = dataclasses.field(default_factory=ParallelConfig)
    """Training layout: tensor_parallel, pipeline_parallel (and its stage layers), sequence_parallel,
    use_distributed_optimizer, world_size; rollout_tensor_parallel for --make-pairs with vllm. DPO is colocated."""
    data: DPODataConfig = dataclasses.field(default_factory=DPODataConfig)
    loss: DPOLossConfig = dataclasses.field(default_factory=DPOLossConfig)
    train: DPOTrainConfig = dataclasses.field(default_factory=DPOTrainConfig)
    checkpoint: CheckpointConfig = dataclasses.field(default_factory=CheckpointConfig)
    metrics: MetricsConfig = dataclasses.field(default_factory=MetricsConfig)
    pairs: PairsConfig = dataclasses.field(default_factory=PairsConfig)

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


_PAIRS_PATH_KEYS = (("pairs", "prompt_files"), ("pairs", "output_file"))


def load_dpo_config(path: str | None, overrides=()) -> DPOConfig:
    """Read `path` (YAML; None: defaults) and apply dotted overrides; unknown keys raise ConfigError. Paths in the
    file that start with ./ or ../ are relative to the file."""
    data: dict = {}
    if path is not None:
        if not os.path.isfile(path):
            raise ConfigError(f"config file {path!r} does not exist")
        with open(path) as f:
            data = yaml.safe_load(f) or {}
        base = os.path.dirname(os.path.abspath(path))
        data = _resolve_relative(data, base)
        data = _resolve_relative(data, base, _PAIRS_PATH_KEYS)
    data = copy.deepcopy(data)
    for key, value in parse_overrides(list(overrides)):
        _set_dotted(data, key, value)
    return _build(DPOConfig, data)


def validate_dpo(cfg: DPOConfig, world_size: int, *, check_paths: bool = True, make_pairs: bool = False) -> list[str]:
    """Raise ConfigError on the first problem (naming the key and the fix); returns the paths not on this machine
    when `check_paths` is False (`--dry-run` of a cluster job). `make_pairs` checks the pairs section instead of
    the training data."""
    from megatron_rlvr.algorithms.dpo import DPO_LOSSES, REFERENCE_FREE
    from megatron_rlvr.schedule import check_optimizer

    missing: list[str] = []
    par = cfg.parallel
    if par.layout != "colocated":
        raise ConfigError("parallel.layout: DPO trains on every rank (colocated); remove parallel.layout=split")
    check_parallel(par)
    if cfg.model.dtype not in ("float32", "bfloat16"):
        raise ConfigError(f"model.dtype={cfg.model.dtype!r} is not one of float32, bfloat16")
    if not cfg.model.path:
        raise ConfigError("model.path is empty: set it to a HuggingFace Llama directory (the SFT model)")
    arch, source = model_arch(cfg.model.path, cfg.model.shape, "model.path")
    if arch is None:
        if check_paths:
            raise ConfigError(f"model.path={cfg.model.path!r} has no config.json: point it at a HuggingFace Llama "
                              "directory, or set model.shape for a --dry-run")
        missing.append(cfg.model.path)
    else:
        if source != cfg.model.path:
            missing.append(cfg.model.path)
        first, last = policy_stage_layers(par)
        check_model_parallel(arch, source, par.tensor_parallel, par.pipeline_parallel, first_stage_layers=first,
                             last_stage_layers=last)
    model_parallel = par.tensor_parallel * par.pipeline_parallel
    check_declared_world(par, world_size)
    if world_size % model_parallel:
        raise ConfigError(f"world size {world_size} is not a multiple of parallel.tensor_parallel x "
                          f"parallel.pipeline_parallel = {model_parallel}; launch {model_parallel} x k ranks")
    dp = world_size // model_parallel

    if make_pairs:
        pairs = cfg.pairs
        if pairs.backend not in ("vllm", "megatron"):
            raise ConfigError(f"pairs.backend={pairs.backend!r} is not one of vllm, megatron")
        if world_size % par.rollout_tensor_parallel:
            raise ConfigError(f"world size {world_size} is not a multiple of parallel.rollout_tensor_parallel="
                              f"{par.rollout_tensor_parallel}")
        for key in ("samples_per_prompt", "pairs_per_prompt", "max_tokens", "max_prompt_length", "prompts_per_batch",
                    "reward_workers"):
            if getattr(pairs, key) < 1:
                raise ConfigError(f"pairs.{key}={getattr(pairs, key)} must be >= 1")
        if pairs.samples_per_prompt < 2:
            raise ConfigError("pairs.samples_per_prompt must be >= 2: a pair needs a verified and a failed response")
        longest = getattr(arch, "max_position_embeddings", None)
        if longest and pairs.max_prompt_length + pairs.max_tokens > longest:
            raise ConfigError(f"pairs.max_prompt_length={pairs.max_prompt_length} + "
                              f"pairs.max_tokens={pairs.max_tokens} "
                              f"exceeds the model's max_position_embeddings={longest} ({source}); lower them")
        if pairs.temperature <= 0:
            raise ConfigError(f"pairs.temperature={pairs.temperature} must be > 0: identical greedy samples make "
                              "no pairs")
        missing += check_files("pairs.prompt_files", pairs.prompt_files, check_paths,
                                "list the RLVR records (messages, ground_truth, dataset) to sample")
        return missing

    if cfg.loss.name not in DPO_LOSSES.names():
        raise ConfigError(f"loss.name={cfg.loss.name!r} is not registered; known: {', '.join(DPO_LOSSES.names())}")
    if cfg.loss.reference not in ("cached", "on_the_fly"):
        raise ConfigError(f"loss.reference={cfg.loss.reference!r} is not one of cached, on_the_fly")
    if cfg.loss.beta <= 0:
        raise ConfigError(f"loss.beta={cfg.loss.beta} must be > 0")
    if not 0.0 <= cfg.loss.label_smoothing < 0.5:
        raise ConfigError(f"loss.label_smoothing={cfg.loss.label_smoothing} must be in [0, 0.5)")
    if cfg.loss.name in REFERENCE_FREE and cfg.loss.reference == "on_the_fly":
        raise ConfigError(f"loss.name={cfg.loss.name} reads no reference log-probs: set loss.reference=cached "
                          "(nothing is computed for it) to avoid building a reference model for nothing")
    for key in ("epochs", "batch_size", "micro_batch_size"):
        if getattr(cfg.train, key) < 1:
            raise ConfigError(f"train.{key}={getattr(cfg.train, key)} must be >= 1")
    for key in ("steps", "eval_interval"):
        if getattr(cfg.train, key) < 0:
            raise ConfigError(f"train.{key}={getattr(cfg.train, key)} must be >= 0")
    if cfg.data.max_length < 2:
        raise ConfigError(f"data.max_length={cfg.data.max_length} must be >= 2")
    check_optimizer(cfg.train.optimizer, "train.optimizer")
    if cfg.train.batch_size % dp:
        raise ConfigError(f"train.batch_size={cfg.train.batch_size} must be a multiple of the data-parallel size "
                          f"{dp} (world {world_size} / TP {par.tensor_parallel} / PP {par.pipeline_parallel})")
    missing += check_files("data.train_files", cfg.data.train_files, check_paths,
                            "list at least one JSONL file of preference records (chosen / rejected)")
    missing += check_files("data.eval_files", cfg.data.eval_files, check_paths, None)
    return missing
