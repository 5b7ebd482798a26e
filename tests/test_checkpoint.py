"""Checkpoints that heal and load safely, on 2 real ranks (gloo) with a megatron model and the distributed optimizer:

- each kind of file (policy shard `*.distcp`, the policy's `.metadata`, a rank file, trainer.json), truncated or
  with one bit flipped in the newest checkpoint: the damage is reported with the file's path and the reason, the
  checkpoint is renamed `*.damaged`, and the previous complete checkpoint is what gets loaded (its weights);
- every checkpoint damaged: a clear error, not a silent fresh start;
- a rank file replaced by a pickle that runs code, its manifest entry forged to match: refused
  (`weights_only=True`), the code never runs.
"""

import json
import logging
import os
import pickle
import shutil

import torch

from megatron_rlvr.testing.distributed import run_workers
from tests.models.common import tiny_model_dir, worker_env

KINDS = ("policy/__0_1.distcp", "policy/.metadata", "ranks/rank_00001.pt", "trainer.json")


class _Planted:
    """Unpickling this runs `open(marker, "w")`: what a planted file would do with arbitrary code."""

    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return (open, (self.marker, "w"))


def _damage(path: str, how: str) -> None:
    data = bytearray(open(path, "rb").read())
    if how == "truncate":
        data = data[: len(data) // 2]
    else:
        data[len(data) // 2] ^= 0x10
    with open(path, "wb") as f:
        f.write(data)


def _weights(ddp) -> dict:
    from megatron_rlvr.models.weights import unwrap

    return {k: v.detach().clone() for k, v in unwrap(ddp).state_dict().items() if isinstance(v, torch.Tensor)
            and not k.endswith("_extra_state")}


def _worker(rank, world, model_dir, root):
    import torch.distributed as dist

    from megatron_rlvr.checkpoint import Checkpointer, step_dir
    from megatron_rlvr.config import OptimizerConfig
    from megatron_rlvr.models.llama import LlamaArch, build_llama, transformer_config
    from megatron_rlvr.models.weights import load_hf_into_model, read_hf_state
    from megatron_rlvr.parallel.model import make_trainable
    from megatron_rlvr.parallel.state import init_model_parallel

    logs = []
    handler = logging.Handler()
    handler.emit = lambda record: logs.append(record.getMessage())
    logging.getLogger("megatron_rlvr").addHandler(handler)
    logging.getLogger("megatron_rlvr").setLevel(logging.INFO)

    pg = init_model_parallel(1, 1)
    arch = LlamaArch.from_pretrained(model_dir)
    model = build_llama(arch, transformer_config(arch), pg, pad_vocab_multiple=16)
    load_hf_into_model(model, read_hf_state(model_dir), arch, pg)
    ddp, optimizer = make_trainable(model, pg, OptimizerConfig(name="adam", lr=0.01),
                                    use_distributed_optimizer=True)
    layout = {"world": world}
    ckpt = Checkpointer(root, {"policy": ddp}, {"policy": optimizer}, layout, keep=2)

    def perturb(seed):
        with torch.no_grad():
            for param in ddp.parameters():
                param.add_(torch.randn(param.shape, generator=torch.Generator().manual_seed(seed)) * 0.01)

    # one real update, so the rank files hold Adam's moments and the distributed optimizer's shard
    from megatron_rlvr.models.forward import forward_backward, split_micro_batches

    tokens = torch.randint(1, arch.vocab_size, (2, 8), generator=torch.Generator().manual_seed(rank))
    mbs = split_micro_batches(tokens, 2, fields={"mask": torch.ones(2, 7)}, lengths=torch.tensor([8, 8]))
    ddp.zero_grad_buffer()
    optimizer.zero_grad()
    forward_backward(ddp, mbs, pg, valid_vocab_size=arch.vocab_size,
                     loss_fn=lambda logprobs, entropy, mb: (-(logprobs * mb.fields["mask"]).mean(), {}))
    optimizer.step()
    perturb(1)
    ckpt.save(1, {"loader": {}, "kl_controller": {}})
    at_step1 = _weights(ddp)
    perturb(2)
    ckpt.save(2, {"loader": {}, "kl_controller": {}})
    pristine = os.path.join(os.path.dirname(root), "pristine")
    if rank == 0:
        shutil.copytree(root, pristine)
    dist.barrier()

    def restore():
        if rank == 0:
            shutil.rmtree(root)
            shutil.copytree(pristine, root)
        dist.barrier()
        perturb(3)  # the live weights differ from both checkpoints before each load

    outcomes = {}
    for kind in KINDS:
        for how in ("truncate", "flip"):
            restore()
            if rank == 0:
                _damage(os.path.join(step_dir(root, 2), kind), how)
            dist.barrier()
            logs.clear()
            state, path = ckpt.load_latest()
            loaded = _weights(ddp)
            outcomes[f"{kind} {how}"] = {
                "step": state["step"], "path": path,
                "weights_are_step1": all(torch.equal(loaded[k], at_step1[k]) for k in at_step1),
                "damaged_dir": os.path.isdir(step_dir(root, 2) + ".damaged"),
                "report": [m for m in logs if "is damaged" in m],
            }

    # every checkpoint damaged: an error, not a fresh start
    restore()
    if rank == 0:
        for step in (1, 2):
            _damage(os.path.join(step_dir(root, step), "ranks/rank_00000.pt"), "flip")
    dist.barrier()
    try:
        ckpt.load_latest()
        outcomes["all damaged"] = "loaded"
    except RuntimeError as err:
        outcomes["all damaged"] = str(err)

    # a planted payload whose manifest entry was forged to match: weights_only refuses it
    restore()
    marker = os.path.join(os.path.dirname(root), f"pwned-{rank}")
    if rank == 0:
        from megatron_rlvr.checkpoint import MANIFEST, file_digest

        for r in range(world):
            target = os.path.join(step_dir(root, 2), f"ranks/rank_{r:05d}.pt")
            with open(target, "wb") as f:
                pickle.dump(_Planted(os.path.join(os.path.dirname(root), f"pwned-{r}")), f)
            manifest_path = os.path.join(step_dir(root, 2), MANIFEST)
            manifest = json.load(open(manifest_path))
            manifest["files"][f"ranks/rank_{r:05d}.pt"] = file_digest(target)
            json.dump(manifest, open(manifest_path, "w"))
    dist.barrier()
    try:
        ckpt.load_latest()
        outcomes["planted"] = "loaded"
    except Exception as err:  # noqa: BLE001 - the refusal's type is torch's UnpicklingError
        outcomes["planted"] = f"{type(err).__name__}: {err}"
    outcomes["planted ran"] = os.path.exists(marker)
    return outcomes


def test_damaged_checkpoints_fall_back_and_planted_pickles_are_refused(tmp_path):
    model_dir = tiny_model_dir(tmp_path)
    root = str(tmp_path / "run" / "checkpoints")
    results = run_workers(_worker, 2, model_dir, root, env=worker_env())
    for rank, outcomes in enumerate(results):
        for kind in KINDS:
            for how in ("truncate", "flip"):
                case = outcomes[f"{kind} {how}"]
                assert case["step"] == 1 and case["path"].endswith("step_000001"), (rank, kind, how, case)
                assert case["weights_are_step1"], (rank, kind, how)
                assert case["damaged_dir"], (rank, kind, how)
                if rank == 0:
                    report = " ".join(case["report"])
                    assert os.path.join("step_000002", kind) in report, (kind, how, report)
                    reason = "bytes, the manifest says" if how == "truncate" else "SHA-256 differs"
                    assert reason in report, (kind, how, report)
        assert "every checkpoint under" in outcomes["all damaged"] and "damaged" in outcomes["all damaged"]
        assert outcomes["planted"].startswith("UnpicklingError") and "Weights only load failed" in outcomes["planted"]
        assert not outcomes["planted ran"], f"rank {rank}: the planted pickle ran its code"
