"""`megatron-rlvr bench step --json OUT` through the CLI on the tiny shape: the figures it writes are consistent with
its synthetic batch (real tokens, padding share, rates from the times), and the batch is long-tailed as stated."""

import json
import os
import subprocess
import sys

import pytest
import torch

from megatron_rlvr.benchmarks.step import synthetic_lengths


def test_synthetic_lengths_are_long_tailed():
    prompts, responses = synthetic_lengths(2000, 64, 512, seed=0)
    assert prompts.min() >= 32 and prompts.max() <= 64
    assert responses.min() >= 1 and responses.max() == 512  # some hit the cap
    median = float(responses.float().median())
    assert 48 <= median <= 80, median  # log-normal median 512 / 8
    assert float(responses.float().mean()) > 1.3 * median  # the tail pulls the mean above the median


def test_bench_step_json(tmp_path):
    out = tmp_path / "step.json"
    env = dict(os.environ, TOKENIZERS_PARALLELISM="false")
    env.pop("TRITON_INTERPRET", None)  # the plain-torch kernel twins
    args = ["--rows", "8", "--prompt-len", "16", "--max-response", "64", "--micro-batch", "4", "--iters", "1",
            "--warmup", "0", "--json", str(out)]
    proc = subprocess.run([sys.executable, "-m", "megatron_rlvr.cli", "bench", "step", *args], env=env,
                          capture_output=True, text=True, timeout=300, check=False)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    result = json.loads(out.read_text())
    prompts, responses = synthetic_lengths(8, 16, 64, seed=0)
    assert result["real_tokens"] == int((prompts + responses).sum())
    assert 0 < result["pad_fraction"] < 1
    assert result["packed_micro_batches"] <= result["padded_micro_batches"]
    for layout in ("padded", "packed"):
        assert result[f"{layout}_tokens_per_s"] == pytest.approx(result["real_tokens"] / result[f"{layout}_s"])
    assert result["no_padding_ideal_tokens_per_s"] == pytest.approx(
        result["padded_tokens_per_s"] / (1 - result["pad_fraction"]))
    assert torch.isfinite(torch.tensor(result["packed_vs_ideal"]))
