"""`megatron-rlvr dpo --config PATH [key=value ...] [--dry-run] [--export-hf] [--list-keys] [--make-pairs]`: DPO on
preference pairs (see megatron_rlvr/dpo/), or, with `--make-pairs`, preference pairs made by the verifiers.

Launch with torchrun for more than one rank (`torchrun --nproc-per-node 2 -m megatron_rlvr.cli dpo ...`); without
torchrun it runs as a world of one. `--dry-run` validates the config and prints the layout, the process groups and
the run's length without building anything.
"""

from __future__ import annotations

import argparse
import os
import sys

from megatron_rlvr.config import ConfigError


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--config", help="YAML DPO config (examples/configs/demo-dpo.yaml, *-tulu3-dpo.yaml)")
    parser.add_argument("overrides", nargs="*", metavar="key=value", help="dotted overrides, e.g. train.steps=20")
    parser.add_argument("--dry-run", action="store_true",
                        help="validate and print layout, process groups and run length; build nothing")
    parser.add_argument("--world-size", type=int, default=None,
                        help="--dry-run: plan for this many ranks (default: parallel.world_size, WORLD_SIZE, TP x PP)")
    parser.add_argument("--export-hf", action="store_true",
                        help="write the final policy as a HuggingFace directory, <output_dir>/hf")
    parser.add_argument("--list-keys", action="store_true", help="print every config key with its doc and exit")
    parser.add_argument("--make-pairs", action="store_true",
                        help="instead of training: sample pairs.samples_per_prompt responses per prompt of "
                        "pairs.prompt_files, score them with the verifiers and write verified/failed pairs")


def run(args: argparse.Namespace) -> int:
    from megatron_rlvr.config import describe
    from megatron_rlvr.dpo.config import DPOConfig, load_dpo_config, validate_dpo

    if args.list_keys:
        print("\n".join(describe(DPOConfig)))
        return 0
    try:
        overrides = list(args.overrides) + (["checkpoint.export_hf=true"] if args.export_hf else [])
        cfg = load_dpo_config(args.config, overrides)
        if args.dry_run:
            print(dry_run_report(cfg, args.world_size, make_pairs=args.make_pairs))
            return 0
        validate_dpo(cfg, int(os.environ.get("WORLD_SIZE", "1")), make_pairs=args.make_pairs)
    except ConfigError as err:
        print(f"megatron-rlvr dpo: config error: {err}", file=sys.stderr)
        return 2
    from megatron_rlvr.commands.train import single_process_env

    single_process_env()
    if args.make_pairs:
        from megatron_rlvr.dpo.pairs import make_pairs

        make_pairs(cfg)
        return 0
    from megatron_rlvr.commands.running import run_job
    from megatron_rlvr.dpo.loop import run_dpo

    return run_job("dpo", cfg.output_dir, lambda: run_dpo(cfg))


def dry_run_report(cfg, world_size: int | None = None, *, make_pairs: bool = False) -> str:
    """Validate `cfg` for `world_size` ranks and describe the layout, the process groups and what the run does."""
    from megatron_rlvr.commands.train import _groups, _show
    from megatron_rlvr.dpo.config import validate_dpo

    par = cfg.parallel
    world = world_size or par.world_size or int(os.environ.get("WORLD_SIZE", "0")) or (
        par.tensor_parallel * par.pipeline_parallel)
    missing = validate_dpo(cfg, world, check_paths=False, make_pairs=make_pairs)
    dp = world // (par.tensor_parallel * par.pipeline_parallel)
    train, loss, optim = cfg.train, cfg.loss, cfg.train.optimizer
    warmup = f"{optim.warmup_steps} steps" if optim.warmup_steps else f"{optim.warmup_ratio:g} of the steps"
    length = f"{train.steps} steps" if train.steps else f"{train.epochs} epoch(s) over the pairs"
    out = [f"config valid for a world of {world} ranks",
           f"training ranks 0..{world - 1} as TP {par.tensor_parallel} x PP {par.pipeline_parallel} x DP {dp}"
           + (" (sequence parallel)" if par.sequence_parallel else "")
           + (", distributed optimizer" if par.use_distributed_optimizer else ""),
           f"model {cfg.model.path or cfg.model.shape} ({cfg.model.dtype})"
           + (", full activation recomputation" if cfg.model.recompute else "")]
    if make_pairs:
        pairs = cfg.pairs
        out.append(f"make pairs: {pairs.samples_per_prompt} samples per prompt of {', '.join(pairs.prompt_files)} "
                   f"with {pairs.backend} (temperature {pairs.temperature}, up to {pairs.max_tokens} tokens), at most "
                   f"{pairs.pairs_per_prompt} verified/failed pair(s) per prompt -> "
                   f"{pairs.output_file or os.path.join(cfg.output_dir, 'pairs.jsonl')}")
    else:
        out += [f"loss {loss.name}, beta {loss.beta:g}, label smoothing {loss.label_smoothing:g}"
                + (f", gamma/beta {loss.gamma_beta_ratio:g}" if loss.name == "simpo" else "")
                + f"; reference log-probs {loss.reference.replace('_', ' ')}",
                f"{length}, {train.batch_size} pairs per step ({train.batch_size // dp} per data-parallel rank, "
                f"{train.micro_batch_size} per packed micro-batch), sequences up to {cfg.data.max_length} tokens",
                f"optimizer {optim.name}, lr {optim.lr:g}, warm-up {warmup}, then {optim.schedule}"
                + (f" to {optim.min_lr:g}" if optim.schedule != "constant" else "")
                + f", weight decay {optim.weight_decay:g}, clip {optim.clip_grad:g}"]
    out += ["", "process groups (global ranks):"]
    for name, groups in _groups(par.tensor_parallel, par.pipeline_parallel, dp, 0).items():
        out.append(f"  {name:<10} {_show(groups)}")
    if missing:
        out += ["", "not on this machine (needed at launch): " + ", ".join(missing)]
    return "\n".join(out)
