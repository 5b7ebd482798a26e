"""A job checked before any process group or model exists.

- `validate(cfg, world_size)`: the config, each section by the subsystem that owns it (a `ConfigError` naming the
  key and the fix).
- `check_model_files`, `load_prompt_sets`: the inputs: the model directory's files open, every data record parses
  and names a verifier the registry knows (`data.on_malformed`: fail or skip), no data file is empty, and some
  prompt fits `data.max_prompt_length`. Each problem is an `InputError` naming the file (and line) and the fix.

The commands print either without a traceback.
"""

from __future__ import annotations

import json
import os

from megatron_rlvr.config import ConfigError, JobConfig, check_values


def validate(cfg: JobConfig, world_size: int | None = None, *, check_paths: bool = True) -> list[str]:
    """Check `cfg` (and that it fits `world_size` ranks) before anything is built; raise ConfigError on the
    first problem. Returns the paths that were not checked or not found when `check_paths` is False (the
    dry run plans a cluster job on a machine that does not hold its files)."""
    # the subsystems bring torch and megatron-core with them: imported here, so `--help` and `--list-keys` stay fast
    from megatron_rlvr import algorithms, rewards
    from megatron_rlvr.data import check as data_check
    from megatron_rlvr.models import check as model_check
    from megatron_rlvr.parallel.check import check_parallel, check_world
    from megatron_rlvr.schedule import check_optimizer

    unchecked: list[str] = []
    check_values(cfg)
    check_optimizer(cfg.train.optimizer, "train.optimizer")
    check_optimizer(cfg.train.value_optimizer, "train.value_optimizer")
    check_parallel(cfg.parallel)
    algorithms.check_config(cfg)
    rewards.check_config(cfg)
    model_check.check_config(cfg, check_paths=check_paths, unchecked=unchecked)
    data_check.check_config(cfg, check_paths=check_paths, unchecked=unchecked)
    if world_size is not None:
        check_world(cfg, world_size)
    return unchecked


class InputError(ConfigError):
    """A model or data file the job cannot use, named with what is wrong and how to fix it."""


def check_model_files(path: str, key: str = "model.path") -> None:
    """config.json parses and every safetensors file opens (its header, and a size that holds every tensor the
    header lists: a truncated download fails here, not 15 s into model building)."""
    from safetensors import safe_open

    config = os.path.join(path, "config.json")
    try:
        with open(config) as f:
            json.load(f)
    except (OSError, ValueError) as err:
        raise InputError(f"{key}: {config} cannot be read ({type(err).__name__}: {err}); re-download or re-convert "
                         "the model") from None
    files = sorted(name for name in os.listdir(path) if name.endswith(".safetensors"))
    if not files:
        raise InputError(f"{key}: {path} holds no *.safetensors weights (a HuggingFace model directory has them; "
                         "megatron checkpoints convert with `megatron-rlvr convert --from mcore --to hf`)")
    for name in files:
        file = os.path.join(path, name)
        try:
            with safe_open(file, "pt") as weights:
                weights.keys()
        except Exception as err:  # noqa: BLE001 - safetensors raises its own error types, all meaning "unusable"
            raise InputError(f"{key}: {file} is not a readable safetensors file ({type(err).__name__}: {err}); it "
                             "is damaged or truncated: re-download or re-convert the model") from None


def load_prompt_sets(cfg, tokenizer):
    """(training prompts, held-out prompts or None) of a job config, every record checked (see module doc)."""
    from megatron_rlvr.data import MalformedRecordError, RLVRPromptDataset

    template = None if cfg.data.chat_template == "tokenizer" else cfg.data.chat_template
    out = []
    for key, files in (("data.train_files", cfg.data.train_files), ("data.eval_files", cfg.data.eval_files)):
        if not files:
            out.append(None)
            continue
        try:
            out.append(RLVRPromptDataset.from_files(files, tokenizer, max_prompt_length=cfg.data.max_prompt_length,
                                                    chat_template=template, on_malformed=cfg.data.on_malformed))
        except MalformedRecordError as err:
            raise InputError(f"{key}: {err} (data.on_malformed=skip drops such records with a warning)") from None
        except (ValueError, OSError) as err:
            raise InputError(f"{key}: {err}") from None
    return tuple(out)
