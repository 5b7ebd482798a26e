"""`megatron-rlvr eval --config PATH [key=value ...]`: greedy held-out accuracy of `model.path` on
`data.eval_files`, scored by the records' verifiers (the job config of `train`; launch with torchrun for more
than one rank). Prints the accuracy and, with `--json`, writes it with the model and files it measured."""

from __future__ import annotations

import argparse
import json
import os
import sys

from megatron_rlvr.config import ConfigError, load_config
from megatron_rlvr.preflight import validate


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--config", help="YAML job config (examples/configs/*.yaml); model.path is evaluated")
    parser.add_argument("overrides", nargs="*", metavar="key=value",
                        help="dotted overrides, e.g. model.path=outputs/demo/rlvr/hf data.eval_files=[eval.jsonl]")
    parser.add_argument("--json", default=None, help="also write {accuracy, model, eval_files} to this file")


def run(args: argparse.Namespace) -> int:
    try:
        cfg = load_config(args.config, list(args.overrides))
        if not cfg.data.eval_files:
            raise ConfigError("data.eval_files is empty: give the held-out RLVR records to score, "
                              "e.g. data.eval_files=[outputs/demo/data/eval.jsonl]")
        validate(cfg, int(os.environ.get("WORLD_SIZE", "1")))
    except ConfigError as err:
        print(f"megatron-rlvr eval: config error: {err}", file=sys.stderr)
        return 2
    from megatron_rlvr.commands.train import single_process_env

    single_process_env()
    from megatron_rlvr.commands.running import run_job

    result = []
    status = run_job("eval", None, lambda: result.append(evaluate_policy(cfg)))
    if status:
        return status
    accuracy = result[0]
    if int(os.environ.get("RANK", "0")) == 0:
        print(f"held-out accuracy (greedy): {accuracy:.4f}  model {cfg.model.path}  "
              f"files {', '.join(cfg.data.eval_files)}")
        if args.json:
            with open(args.json, "w") as f:
                json.dump({"accuracy": accuracy, "model": cfg.model.path, "eval_files": cfg.data.eval_files}, f)
    return 0


def evaluate_policy(cfg) -> float:
    """Greedy held-out accuracy of the policy at `cfg.model.path` on `cfg.data.eval_files`: the same groups,
    engine, prompts and verifiers as the evaluations inside `train`. Collective; every rank gets it."""
    from transformers import AutoTokenizer

    from megatron_rlvr.models.build import Models, build_model
    from megatron_rlvr.models.llama import LlamaArch
    from megatron_rlvr.parallel.groups import init_groups
    from megatron_rlvr.parallel.state import init_distributed, seed_everything
    from megatron_rlvr.preflight import check_model_files, load_prompt_sets
    from megatron_rlvr.rewards import RewardPool
    from megatron_rlvr.rollout.producer import build_engine, evaluate

    check_model_files(cfg.model.path)
    tokenizer = AutoTokenizer.from_pretrained(cfg.model.path)
    _, prompts = load_prompt_sets(cfg, tokenizer)
    rank, world = init_distributed(cfg.parallel.timeout_s)
    seed_everything(cfg.train.seed)
    groups = init_groups(cfg, world, vllm=cfg.rollout.backend == "vllm")
    models, arch = None, LlamaArch.from_pretrained(cfg.model.path)  # rollout-only ranks: vLLM loads the weights
    if groups.trains:
        policy, arch = build_model(cfg, cfg.model.path, groups.policy, frozen=True)
        models = Models(policy, None)
    engine = build_engine(cfg, groups, models, arch, tokenizer)
    pool = RewardPool(cfg.reward.workers, cfg.reward.timeout_s) if rank == 0 else None
    try:
        return evaluate(engine, prompts, cfg, tokenizer, pool, rank, seed=cfg.train.seed)
    finally:
        engine.close()
        if pool is not None:
            pool.close()
