"""The job configuration as plain typed data: dataclasses with a docstring per field, loaded from YAML, overridden
from the command line with dotted `key=value` pairs.

    cfg = load_config("examples/configs/tiny-cpu.yaml", ["train.steps=20", "rollout.n=8"])

An unknown key, a value of the wrong type and a value outside its choices or range raise `ConfigError` here.
Everything else is checked by the subsystem that owns it (the algorithm registry, the model's shape against
TP / PP, the world size against the layout, the data files); `megatron_rlvr.preflight.validate(cfg, world_size)`
runs every check before any process group is built, so a mistake costs seconds, not a cluster allocation. This
module imports nothing else of the package (and not torch): a config is read and listed (`--list-keys`) without
loading a model library. Values in overrides are parsed as YAML scalars (`train.steps=20` is an int,
`data.train_files=[a,b]` a list).
"""

from __future__ import annotations

import ast
import copy
import dataclasses
import difflib
import inspect
import os
import textwrap
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
    fused_output_logprobs: bool = False
    """Policy log-probs and entropy straight from the last hidden states and the output weight
    (`kernels.linear_token_logprobs`, blocks of a bounded workspace): no `[tokens, vocab / TP]` logits buffer in any
    pass of train, sft or dpo; false: the output layer's logits into `kernels.token_logprobs`."""


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
class RewardConfig:
    """How verifier scores in [0, 1] become training rewards (`megatron_rlvr.rewards.shape_rewards`), and the
    verifier pool that computes them."""

    verified_reward: float = 1.0
    """Reward for a response the verifier accepts: a score s in [0, 1] earns s * verified_reward (Tülu 3: 10)."""
    truncation_penalty: float | None = None
    """Reward of a response cut at rollout.max_tokens without EOS, replacing all other terms (Tülu 3: -10); null:
    scored like the rest."""
    format_pattern: str | None = None
    """Regular expression (`re.search`, `.` matching newlines) a response must match to earn format_reward, e.g.
    megatron_rlvr.rewards.shaping.THINK_ANSWER_FORMAT; null: no format term."""
    format_reward: float = 0.0
    """Reward added when the response matches format_pattern."""
    overlong_buffer: int = 0
    """DAPO soft overlong punishment: a finished response within this many tokens of rollout.max_tokens loses up
    to overlong_penalty, linearly (`algorithms.overlong_reward_penalty`; 0: off)."""
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
    reward: RewardConfig = dataclasses.field(default_factory=RewardConfig)
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


def token_budget(cfg: JobConfig) -> int:
    """Tokens per packed micro-batch of the trainer's passes (`train.max_tokens_per_micro_batch`; null:
    micro_batch_size of the longest sequences the config allows, the padded layout's bound); 0: padded."""
    budget = cfg.train.max_tokens_per_micro_batch
    if budget is None:
        return cfg.train.micro_batch_size * (cfg.data.max_prompt_length + cfg.rollout.max_tokens)
    return budget


# --------------------------------------------------------------------------------------------- value checks
# One key at a time: a value in its choices or its range. A check that relates keys across sections, or needs a
# registry, a model or the world size, belongs to the subsystem that knows why (see `preflight.validate`).

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

# 0 means "the default" for these (see --list-keys)
_AT_LEAST_ZERO = ("parallel.pipeline_first_stage_layers", "parallel.pipeline_last_stage_layers",
                  "parallel.value_tensor_parallel", "parallel.value_pipeline_parallel")

_AT_LEAST_ONE = ("train.steps", "train.prompts_per_step", "train.micro_batch_size", "rollout.n", "rollout.max_tokens",
                 "parallel.tensor_parallel", "parallel.pipeline_parallel", "parallel.rollout_tensor_parallel",
                 "algorithm.ppo_epochs", "algorithm.mini_batches", "data.max_prompt_length", "reward.workers")


def _get(cfg: JobConfig, dotted: str) -> Any:
    node: Any = cfg
    for part in dotted.split("."):
        node = getattr(node, part)
    return node


def check_files(key: str, files: list[str], check_paths: bool, empty_fix: str | None) -> list[str]:
    """The files listed under `key` that are not on this machine (ConfigError naming the first when `check_paths`);
    an empty list is an error saying `empty_fix` when one is given."""
    if not files and empty_fix:
        raise ConfigError(f"{key} is empty: {empty_fix}")
    missing = []
    for path in files:
        if not os.path.isfile(path):
            if check_paths:
                raise ConfigError(f"{key}: file {path!r} does not exist (paths in a config file are relative to the "
                                  "working directory unless they start with ./ or ../)")
            missing.append(path)
    return missing


def check_values(cfg: JobConfig) -> None:
    """ConfigError naming the key when a value is not one of its choices or is out of its range."""
    for key, choices in _CHOICES.items():
        value = _get(cfg, key)
        if value not in choices:
            raise ConfigError(f"{key}={value!r} is not one of {', '.join(choices)}")
    for key in _AT_LEAST_ZERO:
        if _get(cfg, key) < 0:
            raise ConfigError(f"{key}={_get(cfg, key)} must be >= 0 (0: the default, see --list-keys)")
    for key in _AT_LEAST_ONE:
        if _get(cfg, key) < 1:
            raise ConfigError(f"{key}={_get(cfg, key)} must be >= 1")
    budget = cfg.train.max_tokens_per_micro_batch
    if budget is not None and budget < 0:
        raise ConfigError(f"train.max_tokens_per_micro_batch={budget} must be >= 0 (0: padded micro-batches; null: "
                          "micro_batch_size x the longest sequence)")
    if cfg.rollout.kv_cache_gib < 1:
        raise ConfigError(f"rollout.kv_cache_gib={cfg.rollout.kv_cache_gib} must be a whole number of GiB >= 1")
    if cfg.rollout.temperature <= 0:
        raise ConfigError(f"rollout.temperature={cfg.rollout.temperature} must be > 0 (log-probs divide by it)")


# --------------------------------------------------------------------------------------------- key listing


def field_docs(cls) -> dict[str, str]:
    """The docstring under each dataclass field of `cls` (read from its source), for `--list-keys` and reports."""
    tree = ast.parse(textwrap.dedent(inspect.getsource(cls)))
    docs: dict[str, str] = {}
    body = tree.body[0].body
    for node, following in zip(body, body[1:] + [None]):
        if isinstance(node, ast.AnnAssign) and isinstance(following, ast.Expr) and isinstance(
            getattr(following, "value", None), ast.Constant
        ):
            docs[node.target.id] = " ".join(str(following.value.value).split())
    return docs


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
