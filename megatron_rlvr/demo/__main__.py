"""`python -m megatron_rlvr.demo prepare WORKDIR` writes the demo's task and starting model;
`python -m megatron_rlvr.demo summary WORKDIR` prints held-out accuracy before and after RLVR."""

from __future__ import annotations

import argparse
import os
import sys


def prepare(workdir: str, seed: int, num_train: int, num_eval: int, digits: int, num_sft: int | None = None) -> None:
    from megatron_rlvr.demo.task import write_task
    from megatron_rlvr.models.tiny import save_tiny_llama

    paths = write_task(os.path.join(workdir, "data"), num_train=num_train, num_eval=num_eval, num_sft=num_sft,
                       seed=seed, digits=digits)
    model_dir = os.path.join(workdir, "model")
    if not os.path.isfile(os.path.join(model_dir, "config.json")):
        # std 0.02 (GPT-2's initialisation): the tiny.py default of 0.2 suits numerics tests, not training
        save_tiny_llama(model_dir, "demo", seed=seed, std=0.02)
    print(f"task: {', '.join(paths.values())}\nmodel: {model_dir}")


def summary(workdir: str) -> int:
    from megatron_rlvr.metrics import read_metrics

    records = read_metrics(os.path.join(workdir, "rlvr"))
    evals = [(r["step"], r["eval/accuracy"]) for r in records if "eval/accuracy" in r]
    if not evals:
        print(f"{workdir}/rlvr/metrics.jsonl has no eval/accuracy records", file=sys.stderr)
        return 1
    (first_step, start), (last_step, end) = evals[0], evals[-1]
    rewards = [r["reward_mean"] for r in records if "reward_mean" in r]
    print(f"held-out accuracy (greedy, gsm8k verifier): {start:.3f} at step {first_step} (SFT start) -> "
          f"{end:.3f} at step {last_step} (after RLVR)")
    if rewards:
        k = max(len(rewards) // 5, 1)
        print(f"training reward mean: first {k} steps {sum(rewards[:k]) / k:.3f}, last {k} steps "
              f"{sum(rewards[-k:]) / k:.3f}")
    return 0


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m megatron_rlvr.demo", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)
    p = sub.add_parser("prepare", help="write the task files and the starting model")
    p.add_argument("workdir")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--num-train", type=int, default=4000)
    p.add_argument("--num-eval", type=int, default=200)
    p.add_argument("--num-sft", type=int, default=None, help="SFT examples (default: all training problems)")
    p.add_argument("--digits", type=int, default=1, help="digits per operand (2 makes a much harder task)")
    s = sub.add_parser("summary", help="held-out accuracy before and after RLVR")
    s.add_argument("workdir")
    args = parser.parse_args(argv)
    if args.command == "prepare":
        prepare(args.workdir, args.seed, args.num_train, args.num_eval, args.digits, args.num_sft)
        return 0
    return summary(args.workdir)


if __name__ == "__main__":
    sys.exit(main())
