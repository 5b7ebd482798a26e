"""Shared pieces of the trainer tests: a tiny task and model, and torchrun launches of tests/trainer/run_job.py."""

import os
import subprocess
import sys

from megatron_rlvr.demo.task import write_task
from megatron_rlvr.models.tiny import save_tiny_llama
from megatron_rlvr.testing.distributed import free_port

RUN_JOB = os.path.join(os.path.dirname(__file__), "run_job.py")


def job_env() -> dict:
    # the plain-torch kernel twins: the Triton interpreter is far too slow for whole training steps
    env = dict(os.environ, MEGATRON_RLVR_KERNELS="torch", TOKENIZERS_PARALLELISM="false", OMP_NUM_THREADS="1")
    env.pop("TRITON_INTERPRET", None)
    return env


def worker_env() -> dict:
    """`job_env`'s settings for `run_workers`, which adds variables to the inherited environment (a TRITON_INTERPRET
    left set there is harmless: the plain-torch kernels never read it)."""
    env = job_env()
    return {key: env[key] for key in ("MEGATRON_RLVR_KERNELS", "TOKENIZERS_PARALLELISM", "OMP_NUM_THREADS")}


def tiny_job(root, *, digits=1, num_train=400, num_eval=40, model="tiny") -> dict:
    paths = write_task(str(root / "data"), num_train=num_train, num_eval=num_eval, seed=0, digits=digits)
    save_tiny_llama(str(root / "model"), model, seed=0, std=0.02)
    return {"model": str(root / "model"), **paths}


def overrides(job: dict, output_dir, **extra) -> list[str]:
    base = {
        "output_dir": str(output_dir), "model.path": job["model"], "model.pad_vocab_multiple": 8,
        "data.train_files": f"[{job['train']}]", "data.max_prompt_length": 128,
        "rollout.n": 4, "rollout.max_tokens": 8, "train.prompts_per_step": 4, "train.micro_batch_size": 16,
        "reward.workers": 1, "metrics.tensorboard": "false", "metrics.progress_bar": "false",
    }
    base.update(extra)
    return [f"{k}={v}" for k, v in base.items()]


def torchrun(args: list[str], nproc: int = 2, **popen) -> subprocess.Popen:
    cmd = [sys.executable, "-m", "torch.distributed.run", f"--nproc-per-node={nproc}", "--master-addr=127.0.0.1",
           f"--master-port={free_port()}", RUN_JOB, *args]
    return subprocess.Popen(cmd, env=job_env(), stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            **popen)


def run_to_end(args: list[str], nproc: int = 2, timeout: float = 300) -> str:
    proc = torchrun(args, nproc)
    out, _ = proc.communicate(timeout=timeout)
    assert proc.returncode == 0, f"training failed (exit {proc.returncode}):\n{out[-6000:]}"
    return out
