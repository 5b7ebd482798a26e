"""The models a job names, checked before anything is built: the HF directory (or, for a `--dry-run` of a cluster
job, the named shape) read for its heads and layers, and those against the configured TP / PP.

    check_config(cfg, check_paths=True, unchecked=[])    # the policy, and the PPO value model
    check_model_parallel(arch, source, tp, pp)           # any model against any sizes (sft, dpo)
"""

from __future__ import annotations

import os

from megatron_rlvr.config import ConfigError, JobConfig
from megatron_rlvr.models.stages import PipelineSplit
from megatron_rlvr.parallel.check import policy_stage_layers, value_parallel_sizes
from megatron_rlvr.planner import load_model


def model_arch(path: str, shape: str, key: str):
    """The architecture of `path` (a HF dir) or, when it is not on this machine, of the named `shape`.

    Returns (LlamaArch or planner ModelSpec, source), (None, None) when neither is there, or raises ConfigError
    naming `key`.
    """
    if path and os.path.isfile(os.path.join(path, "config.json")):
        # megatron-core loads with the model module: only when there is a model to read
        from megatron_rlvr.models.llama import LlamaArch

        try:
            return LlamaArch.from_pretrained(path), path
        except ValueError as err:
            raise ConfigError(f"{key}: {err}") from None
    if shape:
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
            uneven = ("" if keys[1] != "pipeline_parallel" else f", or split unevenly with {key_prefix}.pipeline_"
                      f"first_stage_layers / {key_prefix}.pipeline_last_stage_layers")
            raise ConfigError(f"{pp_key}={pp}{notes[1]} does not divide num_hidden_layers={layers} of {source}; set "
                              f"{pp_key} to one of {fits}{uneven}") from None
        raise ConfigError(f"{pp_key}={pp} with {key_prefix}.pipeline_first_stage_layers={first_stage_layers or 0}, "
                          f"{key_prefix}.pipeline_last_stage_layers={last_stage_layers or 0} ({source}): "
                          f"{err}") from None


def check_config(cfg: JobConfig, *, check_paths: bool, unchecked: list[str]) -> None:
    """The policy at model.path and, for PPO (`gae`), the value model against their TP / PP. A model not on this
    machine is an error when `check_paths`, else appended to `unchecked` (the dry run of a cluster job)."""
    if not cfg.model.path:
        raise ConfigError("model.path is empty: set it to a HuggingFace Llama directory (model.path=/path/to/model)")
    _check_model_dir(cfg, "model.path", cfg.model.path, cfg.model.shape, check_paths, unchecked,
                     "point it at a HuggingFace Llama directory (download it first), or set model.shape for a "
                     "--dry-run")
    if cfg.algorithm.advantage_estimator != "gae":
        return
    if cfg.model.value_path:
        _check_model_dir(cfg, "model.value_path", cfg.model.value_path, cfg.model.value_shape, check_paths,
                         unchecked, "point it at a HuggingFace Llama directory, or leave it empty to start from the "
                         "policy", value_model=True)
    else:  # the value model starts from the policy's weights: same shape, its own TP / PP
        _check_model_dir(cfg, "model.path", cfg.model.path, cfg.model.shape, False, [], "", value_model=True)


def _check_model_dir(cfg: JobConfig, key: str, path: str, shape: str, check_paths: bool, unchecked: list[str],
                     fix: str, value_model: bool = False) -> None:
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
