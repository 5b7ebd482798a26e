"""Shared pieces of the DPO tests: the demo task's preference pairs on a tiny model, config overrides, launches."""

import os
import subprocess
import sys

from megatron_rlvr.demo.task import write_task
from megatron_rlvr.models.tiny import save_tiny_llama
from megatron_rlvr.testing.distributed import free_port
from tests.trainer.common import job_env


def tiny_dpo_job(root, *, num_train=64, num_eval=16, model="tiny") -> dict:
    paths = write_task(str(root / "data"), num_train=num_train, num_eval=num_eval, seed=0)
    save_tiny_llama(str(root / "model"), model, seed=0, std=0.02)
    return {"model": str(root / "model"), **paths}


def dpo_overrides(job: dict, output_dir, **extra) -> list[str]:
    base = {
        "output_dir": str(output_dir), "model.path": job["model"], "model.pad_vocab_multiple": 8,
        "data.train_files": f"[{job['dpo']}]", "data.max_length": 128,
        "train.batch_size": 8, "train.micro_batch_size": 2, "train.optimizer.lr": 1e-3,
        "train.optimizer.warmup_ratio": 0.0, "loss.name": "sigmoid", "loss.beta": 0.1,
        "metrics.tensorboard": "false", "metrics.progress_bar": "false",
    }
    base.update(extra)
    return [f"{k}={v}" for k, v in base.items()]


def dpo_cli(args: list[str], nproc: int = 2, **popen) -> subprocess.Popen:
    """`megatron-rlvr dpo ARGS` under torchrun with `nproc` ranks."""
    cmd = [sys.executable, "-m", "torch.distributed.run", f"--nproc-per-node={nproc}", "--master-addr=127.0.0.1",
           f"--master-port={free_port()}", "-m", "megatron_rlvr.cli", "dpo", *args]
    return subprocess.Popen(cmd, env=job_env(), stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            cwd=os.path.join(os.path.dirname(__file__), "..", ".."), **popen)


def run_dpo_cli(args: list[str], nproc: int = 2, timeout: float = 400) -> str:
    proc = dpo_cli(args, nproc)
    out, _ = proc.communicate(timeout=timeout)
    assert proc.returncode == 0, f"dpo failed (exit {proc.returncode}):\n{out[-6000:]}"
    return out
