"""The data section's files, checked before anything is built: at least one training file, and every listed file
on this machine (their records are read and checked later, by `preflight.load_prompt_sets`)."""

from __future__ import annotations

from megatron_rlvr.config import JobConfig, check_files


def check_config(cfg: JobConfig, *, check_paths: bool, unchecked: list[str]) -> None:
    """ConfigError for an empty data.train_files, or a missing file when `check_paths`; without `check_paths` a
    missing file is appended to `unchecked` (the dry run of a cluster job)."""
    unchecked += check_files("data.train_files", cfg.data.train_files, check_paths,
                             "list at least one JSONL/Parquet file of RLVR records")
    unchecked += check_files("data.eval_files", cfg.data.eval_files, check_paths, None)
