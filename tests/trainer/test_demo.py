"""A shorter run of the embedded demo through the real CLI: the bundled task, the demo's SFT warm start, then 20
of its GRPO steps with in-process vLLM rollouts under torchrun (2 ranks, colocated). The verified reward mean of
the last 5 steps exceeds that of the first 5 by more than 0.05 (the full demo rises by about 0.15 over these steps;
a 5-step mean of 128 samples a step has a standard deviation of about 0.03).
"""

import json
import os
import subprocess
import sys

from megatron_rlvr.testing.distributed import free_port

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
CONFIGS = os.path.join(ROOT, "examples", "configs")


def _env() -> dict:
    env = dict(os.environ, TOKENIZERS_PARALLELISM="false", OMP_NUM_THREADS="1")
    env.pop("TRITON_INTERPRET", None)  # the plain-torch kernel twins: the interpreter is too slow for training
    env.pop("VLLM_CPU_KVCACHE_SPACE", None)  # the commands set it from rollout.kv_cache_gib, as a user runs them
    return env


def _run(args: list[str], timeout: float) -> None:
    proc = subprocess.run(args, env=_env(), capture_output=True, text=True, timeout=timeout, cwd=ROOT)
    assert proc.returncode == 0, f"{' '.join(args[:6])} ... failed:\n{(proc.stdout + proc.stderr)[-6000:]}"


def _torchrun(*args: str) -> list[str]:
    return [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node=2", "--master-addr=127.0.0.1",
            f"--master-port={free_port()}", "-m", "megatron_rlvr.cli", *args]


def test_demo_reward_rises(tmp_path):
    work = str(tmp_path)
    _run([sys.executable, "-m", "megatron_rlvr.demo", "prepare", work, "--num-eval", "40"],
         timeout=120)
    _run(_torchrun("sft", "--config", os.path.join(CONFIGS, "demo-sft.yaml"), f"output_dir={work}/sft",
                   f"model.path={work}/model", f"data.train_files=[{work}/data/sft.jsonl]"),
         timeout=600)
    steps = 20
    _run(_torchrun("train", "--config", os.path.join(CONFIGS, "tiny-cpu.yaml"), f"output_dir={work}/rlvr",
                   f"model.path={work}/sft/hf", f"data.train_files=[{work}/data/train.jsonl]", "data.eval_files=[]",
                   f"train.steps={steps}", "checkpoint.interval=0", "metrics.tensorboard=false",
                   "metrics.progress_bar=false"), timeout=900)
    with open(os.path.join(work, "rlvr", "metrics.jsonl")) as f:
        rewards = [r["reward_mean"] for r in map(json.loads, f) if "reward_mean" in r]
    assert len(rewards) == steps
    first, last = sum(rewards[:5]) / 5, sum(rewards[-5:]) / 5
    assert last > first + 0.05, f"verified reward mean did not rise: {[round(r, 3) for r in rewards]}"
