"""The data section's files, checked before anything is built: at least one training file, and every listed file
on this machine (their records are read and checked later, by `preflight.load_prompt_sets`)."""

from __future__ import annotations

import os

from megatron_rlvr.config import ConfigError, JobConfig


def check_config(cfg: JobConfig, *, check_paths: bool, unchecked: list[str]) -> None:
    """ConfigError for an empty data.train_files, or a missing file when `check_paths`; without `check_paths` a
    missing file is appended to `unchecked` (the dry run of a cluster job)."""
    if not cfg.data.train_files:
        raise ConfigError("data.train_files is empty: list at least one JSONL/Parquet file of RLVR records")
    for key, files in (("data.train_files", cfg.data.train_files), ("data.eval_files", cfg.data.eval_files)):
        for path in files:
            if not os.path.isfile(path):
                if check_paths:
                    raise ConfigError(f"{key}: file {path!r} does not exist (paths in a config file are relative "
                                      "to the working directory unless they start with ./ or ../)")
                unchecked.append(path)
