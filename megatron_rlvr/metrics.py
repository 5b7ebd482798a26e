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
