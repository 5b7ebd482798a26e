"""Packed, balanced micro-batches in the trainer equal the padded layout.

The same job (tiny model, 2 ranks: DP 2, the megatron rollout backend, fixed seeds, so both runs draw the same
samples at step 1) runs once with padded micro-batches (`train.max_tokens_per_micro_batch=0`, one micro-batch of
16 rows) and once packed under a 60-token budget (several micro-batches per rank, rows reordered by the balanced
partition). Every model pass goes through the packing: old log-probs (ppo_epochs 2 needs them), reference
log-probs (kl_coef > 0) and the update. Step 1's metrics (gradient norm, KL, entropy: token-weighted over the
micro-batches; the loss: the sum of their shares) agree to fp32 summation order: relative 1e-5 (the loss: 1e-6
absolute). The second PPO epoch follows an optimizer step, which packing changes only at that order too.
A third run, packed with `model.fused_output_logprobs=true` (log-probs from the hidden states and the output
weight in every pass), agrees with the padded one to the same tolerances.
"""

import pytest

from megatron_rlvr.metrics import read_metrics
from tests.trainer.common import overrides, run_to_end, tiny_job

KEYS = ("actor/grad_norm", "actor/entropy", "kl", "reward_mean", "response_length/mean")


def test_packed_equals_padded_in_the_trainer(tmp_path):
    job = tiny_job(tmp_path, num_train=64, num_eval=8)
    common = {"train.steps": 1, "checkpoint.interval": 0, "checkpoint.export_hf": "false", "algorithm.ppo_epochs": 2,
              "algorithm.kl_coef": 0.05, "train.micro_batch_size": 16}
    runs = {}
    for name, budget, fused in (("padded", 0, "false"), ("packed", 60, "false"), ("packed-fused", 60, "true")):
        out = run_to_end(overrides(job, tmp_path / name, **common, **{"train.max_tokens_per_micro_batch": budget,
                                                                      "model.fused_output_logprobs": fused}))
        assert "Traceback" not in out
        (row,) = [r for r in read_metrics(str(tmp_path / name)) if "reward_mean" in r]
        runs[name] = row
    for name in ("packed", "packed-fused"):
        for key in KEYS:
            assert key in runs["padded"], f"{key} missing from the metrics"
            padded, other = runs["padded"][key], runs[name][key]
            assert other == pytest.approx(padded, rel=1e-5, abs=1e-7), f"{key}: {name} {other} vs padded {padded}"
        # the loss is a sum of terms of both signs (GRPO advantages add up to zero per group): compare it at the
        # scale of its terms, not of the sum
        assert abs(runs[name]["loss/policy"] - runs["padded"]["loss/policy"]) <= 1e-6
