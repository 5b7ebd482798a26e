"""The job configuration: typed dataclasses with a docstring per field, loaded from YAML, overridden from the
command line with dotted `key=value` pairs, and validated before any process group is built.

    cfg = load_config("examples/configs/tiny-cpu.yaml", ["train.steps=20", "rollout.n=8"])
    validate(cfg, world_size=2)    # raises ConfigError naming the key and the fix

An unknown key, a tensor-parallel size that does not divide the attention heads, a world size that does not fit
the layout and a missing data file all raise `ConfigError` here, so a mistake costs seconds, not a cluster
allocation. Values in overrides are parsed as YAML scalars (`train.steps=20` is an int, `data.train_files=[a,b]`
a list).
"""

from __future__ import annotations

import copy
import dataclasses
import difflib
import os
import typing
from typing import Any

import yaml


class ConfigError(ValueError):
    """A configuration mistake; the message names the key, the value and how to fix it."""


@dataclasses.dataclass
class ModelConfig:
    path: str = ""
    """HuggingFace Llama directory the policy starts from (config.json, safetensors, tokenizer)."""
    shape: str = ""
    """Named architecture (8B, 70B, 405B: Llama 3.1 shapes) used by `--dry-run` when `path` is not on this
    machine; ignored when `path` has a config.json."""
    value_path: str = ""
    """PPO only: HF directory the value model's trunk starts from (Tülu 3 uses a reward model); empty: the policy's
    weights. The value head starts at zero."""
    value_shape: str = ""
    """Named architecture of the value model for `--dry-run` when `value_path` is not on this machine."""
    dtype: str = "float32"
    """Parameter dtype: float32 or bfloat16 (master weights and gradient reduction stay fp32)."""
    pad_vocab_multiple: int = 128
    """Pad the vocab so each tensor-parallel shard is a multiple of this (padded rows are masked to -inf)."""
    recompute: bool = False
    """Full activation recomputation (stores layer inputs only; ~1/3 more compute)."""


@dataclasses.dataclass
class ParallelConfig:
    layout: str = "colocated"
    """colocated: every rank trains and generates, taking turns; split: the first `rollout_ranks` ranks only
    generate, the rest only train, weights broadcast between them."""
    tensor_parallel: int = 1
    """Training tensor-parallel size (divides the attention and KV heads)."""
    pipeline_parallel: int = 1
    """Training pipeline-parallel size (divides the layers, or see pipeline_first_stage_layers)."""
    pipeline_first_stage_layers: int = 0
    """Policy layers on the first pipeline stage, which also holds the embedding (0: the even share). The layers
    not on the first/last stage must split evenly over the stages between them."""
    pipeline_last_stage_layers: int = 0
    """Policy layers on the last pipeline stage, which also holds the final norm and the LM head (0: the even
    share)."""
    value_tensor_parallel: int = 0
    """PPO value model's tensor-parallel size over the same training ranks, in groups of its own (0: the
    policy's tensor_parallel)."""
    value_pipeline_parallel: int = 0
    """PPO value model's pipeline-parallel size (0: the policy's pipeline_parallel); divides the value model's
    layers (an even split)."""
    sequence_parallel: bool = False
    """Shard activations along the sequence over the TP group (needs tensor_parallel > 1)."""
    rollout_ranks: int = 0
    """split layout: ranks that only generate (a multiple of rollout_tensor_parallel)."""
    rollout_tensor_parallel: int = 1
    """Tensor-parallel size of one rollout engine."""
    use_distributed_optimizer: bool = False
    """Shard optimizer state over the data-parallel group (megatron-core's distributed optimizer)."""
    world_size: int = 0
    """Ranks the job is meant to run on (0: any that fits the layout); checked at launch, planned by --dry-run."""
    timeout_s: float = 1800.0
    """Seconds a collective may wait for the other ranks before the job ends with the watchdog's report (every
    process group: the world's, megatron's, the layout's and vLLM's)."""
    watchdog_s: float = 300.0
    """The watchdog reports a phase (rollout, train, sync, checkpoint, ...) that has run this long, or 3x its
    longest time so far on this rank if that is later: which step, and where every other rank is. Must be below
    timeout_s."""


@dataclasses.dataclass
class DataConfig:
    train_files: list[str] = dataclasses.field(default_factory=list)
    """open-instruct RLVR records (JSONL or Parquet): messages, ground_truth, dataset; `builtin:NAME` is a set
    shipped with the package (megatron_rlvr/data/builtin: ifeval-train.jsonl, ifeval-heldout.jsonl)."""
    eval_files: list[str] = dataclasses.field(default_factory=list)
    """Held-out records scored every `train.eval_interval` steps (greedy decoding)."""
    chat_template: str = "tokenizer"
    """tokenizer (the model's own chat template) or a built-in one: tulu, plain."""
    max_prompt_length: int = 256
    """Prompts longer than this many tokens are dropped (and counted) when the data is loaded."""
    on_malformed: str = "fail"
    """fail: stop at the first malformed record (named with file and line); skip: log it and go on."""
    shuffle: bool = True
    """Shuffle prompts each epoch (deterministic from train.seed)."""


@dataclasses.dataclass
class RolloutConfig:
    backend: str = "megatron"
    """megatron: sample with the trainer's own model (no weight copy); vllm: in-process vLLM engines."""
    n: int = 4
    """Samples per prompt (the GRPO group size)."""
    temperature: float = 1.0
    """Sampling temperature; log-probs of policy, old policy and reference use the same temperature."""
    top_p: float = 1.0
    max_tokens: int = 64
    """Response length limit; a response cut here without EOS gets reward.truncation_penalty."""
    gpu_memory_utilization: float = 0.5
    """vllm: share of device memory for weights and KV cache (<= 0.5 on CPU)."""
    enforce_eager: bool = False
    """vllm: no CUDA graphs."""
    kv_cache_gib: int = 1
    """vllm on CPU: GiB of KV cache per engine (vLLM's VLLM_CPU_KVCACHE_SPACE, set from here)."""
    cpu_plain_weights: bool = False
    """vllm on CPU: keep vLLM's linear weights plain (torch's F.linear) instead of oneDNN-packed copies, so a sync
    writes them in place (colocated, training TP 1 or equal to the rollout TP) or loads them without re-packing
    (split); see docs/sync.md. No effect on GPUs."""
    sync_probe_interval: int = 0
    """vllm: every sync is followed by an exact check (per-tensor checksums of vLLM's weights against the
    trainer's); the log-prob probe (does vLLM compute what the trainer computes) runs after the first sync and
    then after every N-th (0: first sync only). See docs/sync.md."""
    sync_probe_atol: float | None = None
    """vllm: mean absolute log-prob difference the probe accepts; null: by dtype (float32 1e-3, bfloat16 0.3; with
    identical weights SmolLM2-135M's probe differs by 0.094 on average in bf16: sync.verify.PROBE_ATOL)."""
    one_step_off_policy: bool = False
    """split layout: the rollout ranks generate (and rank 0 scores) step n+1's samples with the weights of step
    n-1 while the trainer ranks train on step n's, so generation and training overlap; the update's importance
    ratio is taken against the log-probs the trainer recomputes before it. Off: every step samples with the
    latest weights and the two sides wait for each other."""


@dataclasses.dataclass
class AlgorithmConfig:
    advantage_estimator: str = "grpo"
    """grpo, dr_grpo, rloo, reinforce_plus_plus, reinforce_plus_plus_baseline (no value model) or gae (PPO with a
    value model)."""
    policy_loss: str = "ppo"
    """Registered policy loss (megatron_rlvr.algorithms.POLICY_LOSSES)."""
    clip_low: float = 0.2
    """PPO ratio clip below 1: rho >= 1 - clip_low."""
    clip_high: float = 0.2
    """PPO ratio clip above 1: rho <= 1 + clip_high (DAPO's clip-higher uses 0.28)."""
    loss_agg_mode: str = "token-mean"
    """token-mean, seq-mean-token-mean or seq-mean-token-sum-norm (see algorithms.aggregate_loss)."""
    kl_coef: float = 0.0
    """beta of the KL to the frozen reference policy; 0 keeps no reference model."""
    kl_mode: str = "loss"
    """loss: beta * KL added to the loss (GRPO); reward: beta * KL subtracted from per-token rewards (Tülu 3 PPO)."""
    kl_estimator: str = "k3"
    """k1, k2 or k3 (Schulman's estimators; Tülu 3 uses k1 in the reward)."""
    target_kl: float | None = None
    """Adaptive KL controller target (per-sequence KL); None: a fixed beta."""
    entropy_coef: float = 0.0
    """Subtract entropy_coef * mean token entropy from the loss."""
    ppo_epochs: int = 1
    """Optimizer passes over each rollout batch."""
    mini_batches: int = 1
    """Optimizer steps per pass (the rollout batch is cut into this many mini-batches of whole prompts)."""
    gamma: float = 1.0
    """GAE / REINFORCE++ discount."""
    lam: float = 0.95
    """GAE lambda."""
    value_clip: float = 0.2
    """PPO value clip range."""
    value_loss_coef: float = 0.1
    """Scales the value loss (the value model has its own optimizer; this is its loss scale)."""
    clip_ratio_c: float | None = None
    """Dual-clip constant c > 1 (typically 3): for negative advantages the token loss is capped at -c * A, so a
    huge ratio cannot blow up the update (Ye et al., 2020); None: off."""
    rollout_correction: str = "none"
    """Correction for the gap between the rollout engine's sampling log-probs and the trainer's (other kernels,
    precision, or one-step-off weights): none, tis (token weight min(pi_old / pi_rollout, C)) or mis (tokens or
    sequences, see rollout_mis_level, whose ratio leaves [1/C, C] get no loss); see algorithms/correction.py."""
    rollout_is_cap: float = 2.0
    """C of rollout_correction (> 1)."""
    rollout_mis_level: str = "token"
    """mis only: token (mask single tokens) or sequence (mask a response whose product of ratios leaves the band)."""
    dynamic_sampling: bool = False
    """DAPO dynamic sampling: prompt groups whose rewards are all equal (zero advantage, no gradient) are dropped
    and more prompts sampled until train.prompts_per_step informative groups are in hand."""
    dynamic_sampling_max_rounds: int = 4
    """Generation rounds one step may take for dynamic sampling; after that the batch is filled up with the
    uninformative groups of those rounds (logged, and counted in rollout/dynamic_sampling_filled)."""


@dataclasses.dataclass
class OptimizerConfig:
    name: str = "adam"
    """adam or sgd."""
    lr: float = 1e-6
    """Peak learning rate, reached at the end of warm-up (then see `schedule`)."""
    warmup_steps: int = 0
    """Linear warm-up from 0 over this many optimizer steps (0: `warmup_ratio` decides)."""
    warmup_ratio: float = 0.0
    """Warm-up as a fraction of all optimizer steps (Tülu 3 SFT and DPO: 0.1); used when warmup_steps is 0."""
    schedule: str = "constant"
    """After warm-up: constant, linear (decay to min_lr at the last step) or cosine (to min_lr); see
    megatron_rlvr/schedule.py."""
    min_lr: float = 0.0
    """Floor of the linear and cosine schedules."""
    weight_decay: float = 0.0
    adam_beta1: float = 0.9
    adam_beta2: float = 0.95
    adam_eps: float = 1e-8
    clip_grad: float = 1.0
    """Global gradient-norm clip (0 disables)."""


@dataclasses.dataclass
class TrainConfig:
    steps: int = 100
    """RLVR steps (rollout + update) to run in total; a resumed run continues up to this."""
    prompts_per_step: int = 8
    """Prompts per rollout batch (each sampled rollout.n times); a multiple of data-parallel size x
    algorithm.mini_batches."""
    micro_batch_size: int = 8
    """Sequences per forward/backward micro-batch of the padded layout (max_tokens_per_micro_batch: 0)."""
    max_tokens_per_micro_batch: int | None = None
    """Every model pass (old and reference log-probs, values, updates) packs the rows of a DP rank back to back
    into micro-batches of at most this many tokens, spread by the balanced partition; null: micro_batch_size x
    (data.max_prompt_length + rollout.max_tokens), the padded layout's bound; 0: padded micro-batches of
    micro_batch_size rows (each row padded to the micro-batch's longest)."""
    seed: int = 1
    """Seeds data order, sampling and model-parallel RNG."""
    eval_interval: int = 0
    """Score data.eval_files every this many steps (0: only at the end, if eval files are given)."""
    optimizer: OptimizerConfig = dataclasses.field(default_factory=OptimizerConfig)
    """Policy optimizer."""
    value_optimizer: OptimizerConfig = dataclasses.field(default_factory=lambda: OptimizerConfig(lr=1e-5))
    """PPO value model optimizer."""


@dataclasses.dataclass
class RewardSettings:
    verified_reward: float = 1.0
    """Reward for a response the verifier accepts (Tülu 3: 10)."""
    truncation_penalty: float | None = None
    """Reward of a response cut at rollout.max_tokens without EOS (Tülu 3: -10); None: scored like the rest."""
    format_pattern: str | None = None
    """Regular expression a response must match to earn format_reward."""
    format_reward: float = 0.0
    overlong_buffer: int = 0
    """DAPO soft overlong punishment: a finished response within this many tokens of rollout.max_tokens loses up
    to overlong_penalty, linearly (0: off)."""
    overlong_penalty: float = 1.0
    """The overlong punishment at rollout.max_tokens."""
    workers: int = 2
    """Verifier worker processes."""
    timeout_s: float = 10.0
    """Seconds one verification may take before it scores 0."""


@dataclasses.dataclass
class CheckpointConfig:
    interval: int = 50
    """Save every this many steps (and at the end); 0: only at the end."""
    keep: int = 2
    """Complete checkpoints kept (older ones are deleted once a newer one is complete)."""
    export_hf: bool = True
    """Write the final policy as a HuggingFace directory (`<output_dir>/hf`, streamed tensor by tensor) that
    transformers and vLLM load as it is; false: only the checkpoints."""


@dataclasses.dataclass
class MetricsConfig:
    tensorboard: bool = True
    """Write TensorBoard events to `<output_dir>/tensorboard`."""
    progress_bar: bool = True
    """tqdm progress bar on rank 0."""


@dataclasses.dataclass
class JobConfig:
    output_dir: str = "outputs/run"
    """metrics.jsonl, checkpoints/, tensorboard/ and hf/ go here; a restart on the same directory resumes."""
    model: ModelConfig = dataclasses.field(default_factory=ModelConfig)
    parallel: ParallelConfig = dataclasses.field(default_factory=ParallelConfig)
    data: DataConfig = dataclasses.field(default_factory=DataConfig)
    rollout: RolloutConfig = dataclasses.field(default_factory=RolloutConfig)
    algorithm: AlgorithmConfig = dataclasses.field(default_factory=AlgorithmConfig)
    train: TrainConfig = dataclasses.field(default_factory=TrainConfig)
    reward: RewardSettings = dataclasses.field(default_factory=RewardSettings)
    checkpoint: CheckpointConfig = dataclasses.field(default_factory=CheckpointConfig)
    metrics: MetricsConfig = dataclasses.field(default_factory=MetricsConfig)

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


# --------------------------------------------------------------------------------------------- loading


def _field_types(cls) -> dict[str, Any]:
    hints = typing.get_type_hints(cls)
    return {f.name: hints[f.name] for f in dataclasses.fields(cls)}


def _unknown_key(key: str, known, cls) -> ConfigError:
    close = difflib.get_close_matches(key.rsplit(".", 1)[-1], list(known), n=1)
    hint = f"did you mean {key.rsplit('.', 1)[0] + '.' if '.' in key else ''}{close[0]}? " if close else ""
    return ConfigError(f"unknown config key {key!r}; {hint}{cls.__name__} has: {', '.join(known)}")


def _coerce(key: str, value: Any, hint: Any) -> Any:
    origin = typing.get_origin(hint)
    args = typing.get_args(hint)
    if origin in (typing.Union, getattr(__import__("types"), "UnionType", None)):
        if value is None and type(None) in args:
            return None
        inner = [a for a in args if a is not type(None)]
        return _coerce(key, value, inner[0])
    if origin is list:
        if isinstance(value, str):
            value = [value]
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"{key}: expected a list, got {value!r}")
        return [_coerce(f"{key}[{i}]", v, args[0]) for i, v in enumerate(value)]
    if hint is bool:
        if isinstance(value, bool):
            return value
        raise ConfigError(f"{key}: expected true or false, got {value!r}")
    if hint is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise ConfigError(f"{key}: expected an integer, got {value!r}")
        return value
    if hint is float:
        if isinstance(value, str):
            # YAML 1.1 reads `3e-7` (no dot) as a string
            try:
                return float(value)
            except ValueError:
                pass
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ConfigError(f"{key}: expected a number, got {value!r}")
        return float(value)
    if hint is str:
        if not isinstance(value, str):
            raise ConfigError(f"{key}: expected a string, got {value!r}")
        return value
    return value


def _build(cls, data: dict, prefix: str = ""):
    if not isinstance(data, dict):
        raise ConfigError(f"{prefix.rstrip('.') or 'config'}: expected a mapping of keys, got {data!r}")
    types = _field_types(cls)
    kwargs = {}
    for key, value in data.items():
        full = prefix + key
        if key not in types:
            raise _unknown_key(full, types, cls)
        hint = types[key]
        if dataclasses.is_dataclass(hint):
            kwargs[key] = _build(hint, value or {}, full + ".")
        else:
            kwargs[key] = _coerce(full, value, hint)
    return cls(**kwargs)


def _set_dotted(tree: dict, dotted: str, value: Any) -> None:
    parts = dotted.split(".")
    node = tree
    for part in parts[:-1]:
        child = node.setdefault(part, {})
        if not isinstance(child, dict):
            raise ConfigError(f"override {dotted}: {part!r} is a value, not a section")
        node = child
    node[parts[-1]] = value


def parse_overrides(overrides: list[str]) -> list[tuple[str, Any]]:
    """`["a.b=3", "c=[x, y]"]` -> `[("a.b", 3), ("c", ["x", "y"])]` (values parsed as YAML)."""
    out = []
    for item in overrides:
        key, sep, raw = item.partition("=")
        if not sep or not key.strip():
            raise ConfigError(f"override {item!r} is not key=value (e.g. train.steps=20)")
        out.append((key.strip(), yaml.safe_load(raw) if raw.strip() else ""))
    return out


def config_from_dict(data: dict, overrides: list[str] = ()) -> JobConfig:
    tree = copy.deepcopy(dict(data or {}))
    for key, value in parse_overrides(list(overrides)):
        _set_dotted(tree, key, value)
    _resolve_builtin(tree)
    return _build(JobConfig, tree)


# `builtin:NAME` in data.train_files / data.eval_files names a prompt set shipped inside the package
BUILTIN_PREFIX = "builtin:"
BUILTIN_DATA_DIR = os.path.join(os.path.dirname(os.path.abspath(__file__)), "data", "builtin")


def _resolve_builtin(tree: dict) -> None:
    data = tree.get("data")
    if not isinstance(data, dict):
        return
    for key in ("train_files", "eval_files"):
        files = data.get(key)
        if isinstance(files, list):
            data[key] = [os.path.join(BUILTIN_DATA_DIR, f[len(BUILTIN_PREFIX):])
                         if isinstance(f, str) and f.startswith(BUILTIN_PREFIX) else f for f in files]


def load_config(path: str | None, overrides: list[str] = ()) -> JobConfig:
    """Read `path` (YAML; None: defaults only) and apply dotted overrides; unknown keys raise ConfigError."""
    data: dict = {}
    if path is not None:
        if not os.path.isfile(path):
            raise ConfigError(f"config file {path!r} does not exist")
        with open(path) as f:
            data = yaml.safe_load(f) or {}
        base = os.path.dirname(os.path.abspath(path))
        data = _resolve_relative(data, base)
    return config_from_dict(data, overrides)


# paths in a config file are relative to the file itself, so a config can travel with its data
_PATH_KEYS = (("model", "path"), ("model", "value_path"), ("data", "train_files"), ("data", "eval_files"))


def _resolve_relative(data: dict, base: str, keys=_PATH_KEYS) -> dict:
    for section, key in keys:
        node = data.get(section)
        if not isinstance(node, dict) or key not in node:
            continue
        value = node[key]
        resolve = lambda p: p if not isinstance(p, str) or not p or os.path.isabs(p) or not (p.startswith("./") or p.startswith("../")) else os.path.normpath(os.path.join(base, p))  # noqa: E731
        node[key] = [resolve(v) for v in value] if isinstance(value, list) else resolve(value)
    return data


def save_config(cfg: JobConfig, path: str) -> None:
    with open(path, "w") as f:
        yaml.safe_dump(cfg.to_dict(), f, sort_keys=False)


# --------------------------------------------------------------------------------------------- validation

_CHOICES = {
    "parallel.layout": ("colocated", "split"),
    "rollout.backend": ("megatron", "vllm"),
    "model.dtype": ("float32", "bfloat16"),
    "algorithm.kl_mode": ("loss", "reward"),
    "algorithm.kl_estimator": ("k1", "k2", "k3"),
    "data.on_malformed": ("fail", "skip"),
    "algorithm.rollout_correction": ("none", "tis", "mis"),
    "algorithm.rollout_mis_level": ("token", "sequence"),
    "train.optimizer.name": ("adam", "sgd"),
    "train.value_optimizer.name": ("adam", "sgd"),
}


def _get(cfg: JobConfig, dotted: str) -> Any:
    node: Any = cfg
    for part in dotted.split("."):
        node = getattr(node, part)
    return node


def model_arch(path: str, shape: str, key: str):
    """The architecture of `path` (a HF dir) or, when it is not on this machine, of the named `shape`.

    Returns (LlamaArch or planner ModelSpec, source) or raises ConfigError naming `key`.
    """
    from megatron_rlvr.models.llama import LlamaArch

    if path and os.path.isfile(os.path.join(path, "config.json")):
        try:
            return LlamaArch.from_pretrained(path), path
        except ValueError as err:
            raise ConfigError(f"{key}: {err}") from None
    if shape:
        from megatron_rlvr.planner import load_model

        try:
            return load_model(shape), f"shape {shape}"
        except (KeyError, ValueError, FileNotFoundError) as err:
            raise ConfigError(f"{key.rsplit('.', 1)[0]}.shape={shape!r}: {err}") from None
    return None, None


def _heads_layers(arch) -> tuple[int, int, int]:
    """(attention heads, KV heads, layers) of a LlamaArch or a planner ModelSpec."""
    if hasattr(arch, "num_kv_heads"):
        return arch.num_heads, arch.num_kv_heads, arch.num_layers
    return arch.heads, arch.kv_heads, arch.layers


def check_model_parallel(arch, source: str, tp: int, pp: int, key_prefix: str = "parallel",
                         first_stage_layers: int | None = None, last_stage_layers: int | None = None,
                         keys: tuple[str, str] = ("tensor_parallel", "pipeline_parallel"),
                         notes: tuple[str, str] = ("", "")) -> None:
    """`arch` (a LlamaArch or planner ModelSpec read from `source`) sharded `tp` ways and split over `pp` stages
    (`first_stage_layers` / `last_stage_layers`: an uneven split); the error names `key_prefix`.`keys` (with
    `notes` after their values) and the values that fit."""
    from megatron_rlvr.models.stages import PipelineSplit

    heads, kv_heads, layers = _heads_layers(arch)
    tp_key, pp_key = (f"{key_prefix}.{k}" for k in keys)
    for name, value in (("num_attention_heads", heads), ("num_key_value_heads", kv_heads)):
        if value % tp:
            fits = [d for d in range(1, value + 1) if value % d == 0]
            raise ConfigError(f"{tp_key}={tp}{notes[0]} does not divide {name}={value} of {source}; set {tp_key} "
                              f"to one of {fits}")
    try:
        PipelineSplit(layers, pp, first_stage_layers, last_stage_layers)
    except ValueError as err:
        if first_stage_layers is None and last_stage_layers is None and layers % pp:
            fits = [d for d in range(1, layers + 1) if layers % d == 0]
            raise ConfigError(f"{pp_key}={pp}{notes[1]} does not divide num_hidden_layers={layers} of {source}; set {pp_key} "
                              f"to one of {fits}" + ("" if keys[1] != "pipeline_parallel" else
                                                     f", or split unevenly with {key_prefix}.pipeline_first_stage_"
                                                     f"layers / {key_prefix}.pipeline_last_stage_layers")) from None
        raise ConfigError(f"{pp_key}={pp} with {key_prefix}.pipeline_first_stage_layers={first_stage_layers or 0}, "
                          f"{key_prefix}.pipeline_last_stage_layers={last_stage_layers or 0} ({source}): {err}") from None


def value_parallel_sizes(par: ParallelConfig) -> tuple[int, int]:
    """(TP, PP) of the PPO value model: its own keys, else the policy's."""
    return par.value_tensor_parallel or par.tensor_parallel, par.value_pipeline_parallel or par.pipeline_parallel


def policy_stage_layers(par: ParallelConfig) -> tuple[int | None, int | None]:
    """(layers on the first, on the last pipeline stage) of the policy; None: the even share."""
    return par.pipeline_first_stage_layers or None, par.pipeline_last_stage_layers or None


def training_world(cfg: JobConfig, world_size: int) -> int:
    """Ranks that train: all of them (colocated) or those past the rollout block (split)."""
    return world_size - cfg.parallel.rollout_ranks if cfg.parallel.layout == "split" else world_size


def _check_model_dir(cfg, key: str, path: str, shape: str, check_paths: bool, unchecked: list, fix: str,
                     value_model: bool = False) -> None:
    """The model at `path` (or the named `shape`) against the configured TP / PP (the value model's own sizes
    when `value_model`); a path that cannot be read now is an error when `check_paths`, else listed in
    `unchecked`."""
    arch, source = model_arch(path, shape, key)
    if arch is None:
        if check_paths:
            raise ConfigError(f"{key}={path!r} has no config.json: {fix}")
        unchecked.append(path)
        return
    if source != path:
        unchecked.append(path)
    par = cfg.parallel
    if value_model:
        tp, pp = value_parallel_sizes(par)
        notes = tuple("" if own else f" (unset: the policy's parallel.{key})" for own, key in (
            (par.value_tensor_parallel, "tensor_parallel"), (par.value_pipeline_parallel, "pipeline_parallel")))
        check_model_parallel(arch, f"the value model {source}", tp, pp,
                             keys=("value_tensor_parallel", "value_pipeline_parallel"), notes=notes)
    else:
        if getattr(arch, "score_head", False):
            raise ConfigError(f"{key}={path!r} is a reward model (LlamaForSequenceClassification, no LM head): it can "
                              "start the value model (model.value_path), not the policy; point model.path at a "
                              "LlamaForCausalLM")
        first, last = policy_stage_layers(par)
        check_model_parallel(arch, source, par.tensor_parallel, par.pipeline_parallel, first_stage_layers=first,
                             last_stage_layers=last)


def token_budget(cfg: JobConfig) -> int:
    """Tokens per packed micro-batch of the trainer's passes (`train.max_tokens_per_micro_batch`; null:
    micro_batch_size of the longest sequences the config allows, the padded layout's bound); 0: padded."""
    budget = cfg.train.max_tokens_per_micro_batch
    if budget is None:
        return cfg.train.micro_batch_size * (cfg.data.max_prompt_length + cfg.rollout.max_tokens)
    return budget


def validate(cfg: JobConfig, world_size: int | None = None, *, check_paths: bool = True) -> list[str]:
    """Check `cfg` (and that it fits `world_size` ranks) before anything is built; raise ConfigError on the
    first problem. Returns the paths that were not checked or not found when `check_paths` is False (the
    dry run plans a cluster job on a machine that does not hold its files)."""
    unchecked: list[str] = []
    for key, choices in _CHOICES.items():
        value = _get(cfg, key)
        if value not in choices:
            raise ConfigError(f"{key}={value!r} is not one of {', '.join(choices)}")
    from megatron_rlvr.algorithms import ADVANTAGE_ESTIMATORS, LOSS_AGG_MODES, POLICY_LOSSES

    algo = cfg.algorithm
    for key, value, known in (
        ("algorithm.advantage_estimator", algo.advantage_estimator, list(ADVANTAGE_ESTIMATORS.names())),
        ("algorithm.policy_loss", algo.policy_loss, list(POLICY_LOSSES.names())),
        ("algorithm.loss_agg_mode", algo.loss_agg_mode, list(LOSS_AGG_MODES)),
    ):
        if value not in known:
            raise ConfigError(f"{key}={value!r} is not registered; known: {', '.join(known)}")
    for key in ("parallel.pipeline_first_stage_layers", "parallel.pipeline_last_stage_layers",
                "parallel.value_tensor_parallel", "parallel.value_pipeline_parallel"):
        if _get(cfg, key) < 0:
            raise ConfigError(f"{key}={_get(cfg, key)} must be >= 0 (0: the default, see --list-keys)")
    positive = ("train.steps", "train.prompts_per_step", "train.micro_batch_size", "rollout.n", "rollout.max_tokens",
                "parallel.tensor_parallel", "parallel.pipeline_parallel", "parallel.rollout_tensor_parallel",
                "algorithm.ppo_epochs", "algorithm.mini_batches", "data.max_prompt_length", "reward.workers")
    for key in positive:
        if _get(cfg, key) < 1:
            raise ConfigError(f"{key}={_get(cfg, key)} must be >= 1")
    budget = cfg.train.max_tokens_per_micro_batch
    if budget is not None and budget < 0:
        raise ConfigError(f"train.max_tokens_per_micro_batch={budget} must be >= 0 (0: padded micro-batches; null: "
                          "micro_batch_size x the longest sequence)")
    from megatron_rlvr.schedule import check_optimizer

    check_optimizer(cfg.train.optimizer, "train.optimizer")
    check_optimizer(cfg.train.value_optimizer, "train.value_optimizer")
    check_timeouts(cfg.parallel)
    if cfg.rollout.kv_cache_gib < 1:
        raise ConfigError(f"rollout.kv_cache_gib={cfg.rollout.kv_cache_gib} must be a whole number of GiB >= 1")
    if cfg.rollout.temperature <= 0:
        raise ConfigError(f"rollout.temperature={cfg.rollout.temperature} must be > 0 (log-probs divide by it)")
    if algo.advantage_estimator not in ("reinforce_plus_plus", "gae") and cfg.rollout.n < 2:
        raise ConfigError(f"algorithm.advantage_estimator={algo.advantage_estimator!r} compares samples of the "
                          f"same prompt: set rollout.n >= 2 (got {cfg.rollout.n})")
    if algo.clip_ratio_c is not None and algo.clip_ratio_c <= 1:
        raise ConfigError(f"algorithm.clip_ratio_c={algo.clip_ratio_c} must be > 1 (typically 3), or null for no "
                          "dual clip")
    if algo.rollout_correction != "none" and algo.rollout_is_cap <= 1:
        raise ConfigError(f"algorithm.rollout_is_cap={algo.rollout_is_cap} must be > 1: the importance ratio is "
                          "kept inside [1/C, C] (typical: 2)")
    if cfg.reward.overlong_buffer > cfg.rollout.max_tokens:
        raise ConfigError(f"reward.overlong_buffer={cfg.reward.overlong_buffer} must be at most rollout.max_tokens="
                          f"{cfg.rollout.max_tokens} (the punishment ramps up over the last overlong_buffer tokens)")
    if algo.dynamic_sampling:
        if algo.dynamic_sampling_max_rounds < 1:
            raise ConfigError(f"algorithm.dynamic_sampling_max_rounds={algo.dynamic_sampling_max_rounds} must be >= 1")
        if cfg.rollout.one_step_off_policy:
            raise ConfigError("algorithm.dynamic_sampling=true cannot be combined with rollout.one_step_off_policy="
                              "true (the next step's prompts are drawn before this step's rewards are known); turn "
                              "one of them off")
    if cfg.parallel.sequence_parallel and cfg.parallel.tensor_parallel == 1:
        raise ConfigError("parallel.sequence_parallel=true needs parallel.tensor_parallel > 1; set it to false")
    try:
        from megatron_rlvr.rewards import RewardConfig

        RewardConfig.from_settings(cfg.reward)
    except ValueError as err:
        raise ConfigError(f"reward: {err}") from None

    # model architecture against TP / PP
    if not cfg.model.path:
        raise ConfigError("model.path is empty: set it to a HuggingFace Llama directory (model.path=/path/to/model)")
    _check_model_dir(cfg, "model.path", cfg.model.path, cfg.model.shape, check_paths, unchecked,
                     "point it at a HuggingFace Llama directory (download it first), or set model.shape for a "
                     "--dry-run")
    if algo.advantage_estimator == "gae":
        if cfg.model.value_path:
            _check_model_dir(cfg, "model.value_path", cfg.model.value_path, cfg.model.value_shape, check_paths,
                             unchecked, "point it at a HuggingFace Llama directory, or leave it empty to start from "
                             "the policy", value_model=True)
        else:  # the value model starts from the policy's weights: same shape, its own TP / PP
            _check_model_dir(cfg, "model.path", cfg.model.path, cfg.model.shape, False, [], "", value_model=True)

    # data files
    if not cfg.data.train_files:
        raise ConfigError("data.train_files is empty: list at least one JSONL/Parquet file of RLVR records")
    for key, files in (("data.train_files", cfg.data.train_files), ("data.eval_files", cfg.data.eval_files)):
        for path in files:
            if not os.path.isfile(path):
                if check_paths:
                    raise ConfigError(f"{key}: file {path!r} does not exist (paths in a config file are relative "
                                      "to the working directory unless they start with ./ or ../)")
                unchecked.append(path)

    # world size against the layout
    if world_size is not None:
        check_world(cfg, world_size)
    return unchecked


def check_timeouts(par: ParallelConfig) -> None:
    """parallel.timeout_s and parallel.watchdog_s: positive, the watchdog reporting before the timeout."""
    if not par.timeout_s > 0:
        raise ConfigError(f"parallel.timeout_s={par.timeout_s} must be > 0 seconds")
    if not 0 < par.watchdog_s < par.timeout_s:
        raise ConfigError(f"parallel.watchdog_s={par.watchdog_s} must be > 0 and below parallel.timeout_s="
                          f"{par.timeout_s}, so a stuck phase is reported before the job times out")


def check_world(cfg: JobConfig, world_size: int) -> int:
    """Raise ConfigError unless `world_size` ranks fit the layout; returns the data-parallel size."""
    par = cfg.parallel
    model_parallel = par.tensor_parallel * par.pipeline_parallel
    if par.world_size and par.world_size != world_size:
        raise ConfigError(f"the job runs on {world_size} ranks but parallel.world_size={par.world_size}: launch "
                          f"{par.world_size} ranks, or set parallel.world_size={world_size} (0 accepts any)")
    if par.layout == "split":
        if par.rollout_ranks < 1:
            raise ConfigError("parallel.layout=split needs parallel.rollout_ranks >= 1 (ranks that only generate)")
        if par.rollout_ranks % par.rollout_tensor_parallel:
            raise ConfigError(f"parallel.rollout_ranks={par.rollout_ranks} is not a multiple of "
                              f"parallel.rollout_tensor_parallel={par.rollout_tensor_parallel}")
        if cfg.rollout.backend != "vllm":
            raise ConfigError("parallel.layout=split generates on ranks without the trainer's model: set "
                              "rollout.backend=vllm (or use parallel.layout=colocated)")
    elif cfg.rollout.one_step_off_policy:
        raise ConfigError("rollout.one_step_off_policy=true overlaps generation on the rollout ranks with training "
                          "on the others, so it needs parallel.layout=split (in the colocated layout every rank "
                          "does both, taking turns); set it to false or use the split layout")
    train_ranks = training_world(cfg, world_size)
    if train_ranks < 1 or train_ranks % model_parallel:
        need = f"{par.rollout_ranks} rollout + " if par.layout == "split" else ""
        raise ConfigError(
            f"world size {world_size} does not fit the layout: {need}training ranks {train_ranks} must be a "
            f"multiple of tensor_parallel x pipeline_parallel = {model_parallel}; launch "
            f"{(par.rollout_ranks if par.layout == 'split' else 0) + model_parallel} x k ranks "
            f"(torchrun --nproc-per-node) or change parallel.tensor_parallel / parallel.pipeline_parallel"
        )
    if par.layout == "colocated" and world_size % par.rollout_tensor_parallel:
        raise ConfigError(f"world size {world_size} is not a multiple of parallel.rollout_tensor_parallel="
                          f"{par.rollout_tensor_parallel}; every rank of the colocated layout generates")
    if cfg.algorithm.advantage_estimator == "gae":
        vtp, vpp = value_parallel_sizes(par)
        if train_ranks % (vtp * vpp):
            raise ConfigError(
                f"the value model's groups do not fit: training ranks {train_ranks} must be a multiple of "
                f"parallel.value_tensor_parallel x parallel.value_pipeline_parallel = {vtp} x {vpp}; choose sizes "
                f"whose product divides {train_ranks}"
            )
        value_dp = train_ranks // (vtp * vpp)
        if cfg.train.prompts_per_step % (value_dp * cfg.algorithm.mini_batches):
            raise ConfigError(
                f"train.prompts_per_step={cfg.train.prompts_per_step} must be a multiple of the value model's "
                f"data-parallel size {value_dp} x algorithm.mini_batches={cfg.algorithm.mini_batches} (whole prompt "
                "groups per value-model rank and mini-batch)"
            )
    dp = train_ranks // model_parallel
    groups = dp * cfg.algorithm.mini_batches
    if cfg.train.prompts_per_step % groups:
        raise ConfigError(
            f"train.prompts_per_step={cfg.train.prompts_per_step} must be a multiple of data-parallel size {dp} x "
            f"algorithm.mini_batches={cfg.algorithm.mini_batches} = {groups} (whole prompt groups per rank and "
            "mini-batch)"
        )
    return dp


def field_docs(cls) -> dict[str, str]:
    """Docstrings of `cls`'s fields (for `--help`-style listings)."""
    from megatron_rlvr.planner.specs import field_docs as _docs

    return _docs(cls)


def describe(cls=JobConfig, prefix: str = "") -> list[str]:
    """`key (type, default): doc` for every field, sections expanded (`megatron-rlvr train --list-keys`)."""
    lines = []
    docs = field_docs(cls)
    types = _field_types(cls)
    defaults = cls()
    for f in dataclasses.fields(cls):
        hint = types[f.name]
        if dataclasses.is_dataclass(hint):
            lines.extend(describe(hint, prefix + f.name + "."))
            continue
        name = getattr(hint, "__name__", str(hint).replace("typing.", ""))
        lines.append(f"{prefix}{f.name} ({name}, default {getattr(defaults, f.name)!r}): {docs.get(f.name, '')}")
    return lines
