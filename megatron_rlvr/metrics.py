"""Training metrics: one JSON object per step in `<output_dir>/metrics.jsonl`, TensorBoard events, and PNG plots.

Keys every RLVR step writes (the interface contract): `step`, `reward_mean`, `kl`, `timing/generate_s`,
`timing/sync_s`, `timing/train_s`, `tokens_per_s`; plus `score_mean` (verifier accuracy), `response_length/mean`,
`loss/*`, `actor/*` and, on evaluation steps, `eval/accuracy`. A DPO step writes `loss`, `rewards/{chosen,rejected,
accuracy,margin}`, `logps/{chosen,rejected}`, `lr`, `tokens_per_s` and, on evaluation steps, the same under `eval/`
with `eval/pairwise_accuracy`.

On resume the file is cut back to the checkpoint's step, so the steps a killed run did after its last checkpoint
(and redoes now) appear once and the curve continues where the checkpoint left it.
"""

from __future__ import annotations

import json
import math
import os
from typing import Iterable

METRICS_FILE = "metrics.jsonl"


def read_metrics(path: str) -> list[dict]:
    """Records of a metrics file (or of `<dir>/metrics.jsonl`); a torn last line (killed writer) is skipped."""
    if os.path.isdir(path):
        path = os.path.join(path, METRICS_FILE)
    records = []
    with open(path) as f:
        for line in f:
            try:
                records.append(json.loads(line))
            except json.JSONDecodeError:
                continue
    return records


class MetricsWriter:
    """Appends step records to metrics.jsonl and TensorBoard; a no-op unless `enabled` (rank 0)."""

    def __init__(self, output_dir: str, enabled: bool, tensorboard: bool = True, resume_step: int | None = None):
        self.enabled = enabled
        self.path = os.path.join(output_dir, METRICS_FILE)
        self._tb = None
        if not enabled:
            return
        os.makedirs(output_dir, exist_ok=True)
        self._truncate(resume_step or 0)
        if tensorboard:
            from torch.utils.tensorboard import SummaryWriter

            self._tb = SummaryWriter(os.path.join(output_dir, "tensorboard"), purge_step=(resume_step or 0) + 1)

    def _truncate(self, keep_through: int) -> None:
        if not os.path.isfile(self.path):
            return
        kept = [r for r in read_metrics(self.path) if r.get("step", 0) <= keep_through]
        with open(self.path, "w") as f:
            f.writelines(json.dumps(r) + "\n" for r in kept)

    def log(self, record: dict) -> None:
        if not self.enabled:
            return
        clean = {k: (float(v) if isinstance(v, float) and math.isfinite(v) else v) for k, v in record.items()}
        with open(self.path, "a") as f:
            f.write(json.dumps(clean) + "\n")
            f.flush()
        if self._tb is not None:
            for key, value in clean.items():
                if key != "step" and isinstance(value, (int, float)) and not isinstance(value, bool):
                    self._tb.add_scalar(key, value, record["step"])
            self._tb.flush()

    def close(self) -> None:
        if self._tb is not None:
            self._tb.close()



# ------------------------------------------------------------------------------------------------ a step's record


def step_record(step: int, rollouts, stats: dict, timing: dict[str, float], *, kl_coef: float,
                peak_memory_gib: float) -> dict:
    """The metrics.jsonl record of one RLVR step: reward, score and length statistics of its rollouts
    (`rollout.producer.ScoredRollouts`), the update's `stats` (`gather_mean`; `kl`, `lr` and
    `timing/logprob_s` are taken out of it), the phase times (`timing`: train_s, rollout_wait_s, sync_s,
    sync_check_s, step_s) and tokens/s over the whole step (prompt + response tokens)."""
    samples, rewards, scores = rollouts.samples, rollouts.rewards, rollouts.scores
    stats = dict(stats)
    lengths = [len(s.response_ids) for s in samples]
    tokens = sum(len(s.prompt_ids) + len(s.response_ids) for s in samples)
    return {
        "step": step,
        "reward_mean": sum(rewards) / len(rewards),
        "score_mean": sum(scores) / len(scores),
        "kl": stats.pop("kl", 0.0),
        "kl_coef": kl_coef,
        "lr": stats.pop("lr", 0.0),
        "response_length/mean": sum(lengths) / len(lengths),
        "response_length/max": max(lengths),
        "response_length/clip_ratio": sum(not s.finished for s in samples) / len(samples),
        "rollout/weights_step": rollouts.weights_step,
        "rollout/generation_rounds": rollouts.rounds,
        "rollout/dynamic_sampling_filled": rollouts.filled_groups,
        "timing/generate_s": rollouts.generate_s,
        "timing/verify_s": rollouts.verify_s,
        "timing/logprob_s": stats.pop("timing/logprob_s", 0.0),
        **{f"timing/{k}": v for k, v in timing.items()},
        "tokens_per_s": tokens / timing["step_s"],
        "memory/peak_gib": peak_memory_gib,
        **stats,
    }


def combine_micro_batches(stats: list[dict], tokens: list) -> dict[str, float]:
    """One update's stats from its micro-batches': the `loss/*` terms are each micro-batch's share of the global
    loss and add up; the rest are means over a micro-batch's response tokens, weighted by them."""
    total = float(sum(float(t) for t in tokens)) or 1.0
    out = {}
    for key in {k for s in stats for k in s}:
        if key.startswith("loss/"):
            out[key] = float(sum(float(s[key]) for s in stats if key in s))
        else:
            out[key] = float(sum(float(s[key]) * float(t) for s, t in zip(stats, tokens) if key in s)) / total
    return out


def mean_stats(per_update: list[dict]) -> dict[str, float]:
    """The mean of each key over the dicts that have it."""
    keys = {k for s in per_update for k in s}
    return {k: float(sum(float(s[k]) for s in per_update if k in s) / sum(k in s for s in per_update))
            for k in sorted(keys)}


def gather_mean(stats: dict[str, float] | None) -> dict[str, float]:
    """Average `stats` over the ranks that pass one (last PP stage, TP rank 0: one per data-parallel replica);
    the `loss/*` terms, each replica's share of the global loss, are added up. Every rank gets the result
    (collective over the world)."""
    import torch.distributed as dist

    gathered = [None] * dist.get_world_size()
    dist.all_gather_object(gathered, stats)
    passed = [s for s in gathered if s]
    out = mean_stats(passed)
    for key in out:
        if key.startswith("loss/"):
            out[key] = float(sum(s[key] for s in passed if key in s))
    return out


PLOTS = (
    ("reward", ("reward_mean", "score_mean", "eval/accuracy")),
    ("kl", ("kl",)),
    ("response_length", ("response_length/mean",)),
    ("timing", ("timing/generate_s", "timing/sync_s", "timing/train_s", "timing/step_s")),
    # `sft` and `dpo`
    ("loss", ("loss", "eval/loss")),
    ("dpo_accuracy", ("rewards/accuracy", "eval/rewards/accuracy", "eval/pairwise_accuracy")),
    ("dpo_rewards", ("rewards/chosen", "rewards/rejected", "rewards/margin", "eval/rewards/margin")),
    ("dpo_logps", ("logps/chosen", "logps/rejected")),
)


def plot_metrics(output_dir: str, out_dir: str | None = None, panels: Iterable = PLOTS) -> list[str]:
    """Draw reward, KL, response-length and timing curves of `<output_dir>/metrics.jsonl` to PNG files;
    returns the paths written. Keys absent from every record are left out of their panel."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    records = read_metrics(output_dir)
    if not records:
        raise ValueError(f"{os.path.join(output_dir, METRICS_FILE)} has no records to plot")
    out_dir = out_dir or os.path.join(output_dir, "plots")
    os.makedirs(out_dir, exist_ok=True)
    written = []
    for name, keys in panels:
        fig, ax = plt.subplots(figsize=(6, 3.5))
        drawn = 0
        for key in keys:
            points = [(r["step"], r[key]) for r in records if isinstance(r.get(key), (int, float))]
            if points:
                xs, ys = zip(*points)
                ax.plot(xs, ys, marker="o" if len(points) < 20 else None, markersize=3, label=key)
                drawn += 1
        if not drawn:
            plt.close(fig)
            continue
        ax.set_xlabel("step")
        ax.set_title(name.replace("_", " "))
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
        path = os.path.join(out_dir, f"{name}.png")
        fig.tight_layout()
        fig.savefig(path, dpi=100)
        plt.close(fig)
        written.append(path)
    return written
