"""`megatron-rlvr train --config PATH [key=value ...] [--dry-run] [--export-hf]`: run RLVR (see trainer.py).

Launch with torchrun for more than one rank (`torchrun --nproc-per-node 2 -m megatron_rlvr.cli train ...`);
without torchrun it runs as a world of one. `--dry-run` validates the config and prints the layout, the process
groups and the planner's per-GPU memory estimate without building anything.
"""

from __future__ import annotations

import argparse
import os
import sys

from megatron_rlvr.config import ConfigError, describe, load_config, token_budget
from megatron_rlvr.preflight import validate


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--config", help="YAML job config (examples/configs/*.yaml)")
    parser.add_argument("overrides", nargs="*", metavar="key=value", help="dotted overrides, e.g. train.steps=20")
    parser.add_argument("--dry-run", action="store_true",
                        help="validate and print layout, process groups and memory estimate; build nothing")
    parser.add_argument("--world-size", type=int, default=None,
                        help="--dry-run: plan for this many ranks (default: WORLD_SIZE, or what the layout needs)")
    parser.add_argument("--export-hf", action="store_true",
                        help="write the final policy as a HuggingFace directory, <output_dir>/hf")
    parser.add_argument("--list-keys", action="store_true", help="print every config key with its doc and exit")


def single_process_env() -> None:
    """Let `megatron-rlvr train` run without torchrun as a world of one."""
    if "RANK" not in os.environ:
        from megatron_rlvr.testing.distributed import free_port

        os.environ.update(RANK="0", LOCAL_RANK="0", WORLD_SIZE="1", LOCAL_WORLD_SIZE="1",
                          MASTER_ADDR="127.0.0.1", MASTER_PORT=str(free_port()))


def run(args: argparse.Namespace) -> int:
    if args.list_keys:
        print("\n".join(describe()))
        return 0
    try:
        overrides = list(args.overrides) + (["checkpoint.export_hf=true"] if args.export_hf else [])
        cfg = load_config(args.config, overrides)
        if args.dry_run:
            print(dry_run_report(cfg, args.world_size))
            return 0
        validate(cfg, int(os.environ.get("WORLD_SIZE", "1")))
    except ConfigError as err:
        print(f"megatron-rlvr train: config error: {err}", file=sys.stderr)
        return 2
    single_process_env()
    from megatron_rlvr.commands.running import run_job
    from megatron_rlvr.trainer import train

    return run_job("train", cfg.output_dir, lambda: train(cfg))


def _groups(tp: int, pp: int, dp: int, offset: int) -> dict[str, list[list[int]]]:
    """megatron-core's rank order over a block of ranks starting at `offset`: TP fastest, then DP, then PP."""
    def rank(t, d, p):
        return offset + t + tp * (d + dp * p)

    return {
        "tensor": [[rank(t, d, p) for t in range(tp)] for p in range(pp) for d in range(dp)],
        "pipeline": [[rank(t, d, p) for p in range(pp)] for d in range(dp) for t in range(tp)],
        "data": [[rank(t, d, p) for d in range(dp)] for p in range(pp) for t in range(tp)],
    }


def _show(groups: list[list[int]], limit: int = 4) -> str:
    shown = " ".join(str(g) for g in groups[:limit])
    return f"{len(groups)} x {len(groups[0])} ranks: {shown}" + (" ..." if len(groups) > limit else "")


def dry_run_report(cfg, world_size: int | None = None) -> str:
    """Validate `cfg` for `world_size` ranks (default: parallel.world_size, WORLD_SIZE, or the smallest world the
    layout fits) and describe layout, process groups and the planner's per-GPU memory estimate."""
    from megatron_rlvr.parallel.check import (check_world, policy_stage_layers, rollout_only_ranks, training_world,
                                              value_parallel_sizes)
    from megatron_rlvr.parallel.groups import job_layout
    from megatron_rlvr.models.stages import PipelineSplit
    from megatron_rlvr.planner import CLUSTER_PRESETS, ClusterSpec, Layout, load_model, make_plan
    from megatron_rlvr.planner.plan import GIB

    par = cfg.parallel
    world = world_size or par.world_size or int(os.environ.get("WORLD_SIZE", "0")) or (
        rollout_only_ranks(cfg) + par.tensor_parallel * par.pipeline_parallel)
    missing = validate(cfg, world, check_paths=False)
    dp = check_world(cfg, world)
    train_ranks = training_world(cfg, world)
    offset = world - train_ranks
    # the rank roles the job would take (vLLM engines only; the megatron backend samples on every trainer rank)
    roles = job_layout(cfg, world) if cfg.rollout.backend == "vllm" else None
    split = roles is not None and not roles.trainers_host_engines
    local = bool(cfg.model.path) and os.path.isfile(os.path.join(cfg.model.path, "config.json"))
    spec = load_model(cfg.model.path if local else cfg.model.shape) if (local or cfg.model.shape) else None
    first, last = policy_stage_layers(par)
    stages = ""
    if (first or last) and spec is not None:
        stages = f" (layers per stage {PipelineSplit(spec.layers, par.pipeline_parallel, first, last).describe()})"
    gae = cfg.algorithm.advantage_estimator == "gae"
    vtp, vpp = value_parallel_sizes(par)
    value_own = gae and (vtp, vpp) != (par.tensor_parallel, par.pipeline_parallel)
    value_dp = train_ranks // (vtp * vpp)
    out = [f"config valid for a world of {world} ranks",
           f"layout {par.layout}: training ranks {offset}..{world - 1} as TP {par.tensor_parallel} x "
           f"PP {par.pipeline_parallel} x DP {dp}{stages}" + (" (sequence parallel)" if par.sequence_parallel else ""),
           f"rollout: backend {cfg.rollout.backend}, "
           + (f"ranks 0..{offset - 1} as {roles.num_engines} engine(s) of TP {par.rollout_tensor_parallel}" if split
              else f"every rank, {roles.num_engines} engine(s) of TP {par.rollout_tensor_parallel}" if roles
              else "every rank, with the trainer's own model")
           + f"; {cfg.train.prompts_per_step} prompts x {cfg.rollout.n} samples "
           f"per step, up to {cfg.rollout.max_tokens} new tokens",
           f"algorithm: {cfg.algorithm.advantage_estimator} advantages, {cfg.algorithm.policy_loss} loss, "
           f"KL beta {cfg.algorithm.kl_coef} ({cfg.algorithm.kl_mode}), lr {cfg.train.optimizer.lr}",
           "", "process groups (global ranks):"]
    if split:
        out.append(f"  rollout    {_show([list(roles.engine_ranks(e)) for e in range(roles.num_engines)])}")
    for name, groups in _groups(par.tensor_parallel, par.pipeline_parallel, dp, offset).items():
        out.append(f"  {name:<10} {_show(groups)}")
    if gae:
        out += ["", f"value model: TP {vtp} x PP {vpp} x DP {value_dp} over the same training ranks, "
                + ("groups of its own (global ranks):" if value_own else "on the policy's groups")]
        if value_own:
            for name, groups in _groups(vtp, vpp, value_dp, offset).items():
                out.append(f"  {name:<10} {_show(groups)}")
    if spec is not None:
        value = ""
        if cfg.algorithm.advantage_estimator == "gae":
            value_local = cfg.model.value_path and os.path.isfile(os.path.join(cfg.model.value_path, "config.json"))
            value = cfg.model.value_path if value_local else (cfg.model.value_shape or (
                cfg.model.path if local else cfg.model.shape))
        budget = token_budget(cfg)
        layout = Layout(
            placement=par.layout, train_gpus=train_ranks, tp=par.tensor_parallel, pp=par.pipeline_parallel, dp=dp,
            pp_first_layers=par.pipeline_first_stage_layers, pp_last_layers=par.pipeline_last_stage_layers,
            value_tp=par.value_tensor_parallel, value_pp=par.value_pipeline_parallel,
            rollout_tp=par.rollout_tensor_parallel, rollout_gpus=offset if split else world,
            rollout_eager=cfg.rollout.enforce_eager, rollout_memory_fraction=cfg.rollout.gpu_memory_utilization,
            value_model=value, kl_beta=cfg.algorithm.kl_coef, prompts_per_step=cfg.train.prompts_per_step,
            samples_per_prompt=cfg.rollout.n, prompt_len=max(cfg.data.max_prompt_length // 2, 1),
            max_prompt_len=cfg.data.max_prompt_length, response_len=cfg.rollout.max_tokens,
            ppo_epochs=cfg.algorithm.ppo_epochs, micro_batch_size=cfg.train.micro_batch_size,
            packing=budget > 0, pack_tokens=budget or Layout.pack_tokens,
            recompute="full" if cfg.model.recompute else "none")
        plan = make_plan(spec, ClusterSpec(gpus=world, **CLUSTER_PRESETS["h100-80g"]), layout)
        out += ["", f"per-GPU memory estimate on H100 80 GB (megatron-rlvr plan; model {spec.name}, "
                    f"{spec.params / 1e9:.2f} B parameters):"]
        if plan.train_memory is not None:
            out.append(f"  training ({plan.train_memory.stage}): "
                       + ", ".join(f"{k} {v / GIB:.1f}" for k, v in plan.train_memory.items())
                       + f"; total {plan.train_memory.total / GIB:.1f} GiB")
            if plan.value is not None:
                out.append(f"  value model ({plan.value.name}, {plan.value.params / 1e9:.2f} B parameters, TP {vtp} x "
                           f"PP {vpp} x DP {value_dp}): weights, gradients and optimizer "
                           f"{plan.train_memory.value_model / GIB:.1f} GiB of that GPU's total")
        if plan.rollout_memory is not None:
            out.append("  rollout: " + ", ".join(f"{k} {v / GIB:.1f}" for k, v in plan.rollout_memory.items())
                       + f"; total {plan.rollout_memory.total / GIB:.1f} GiB")
        for problem in plan.problems:
            out.append(f"  planner problem: {problem.what} (fix: {problem.fix})")
    if missing:
        out += ["", "not on this machine (needed at launch): " + ", ".join(missing)]
    return "\n".join(out)
