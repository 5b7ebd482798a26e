"""Training checkpoints: policy (and value) weights, optimizer state, RNG states, data position and step, written
atomically; resume from the latest complete one; export the policy as a HuggingFace directory.

Layout of `<output_dir>/checkpoints/`:

    step_000020/                  a complete checkpoint (only complete ones carry this name)
        policy/                   megatron-core dist_checkpointing shards (global shapes: any TP/PP can read them)
        value/                    the PPO value model, when there is one
        ranks/rank_00003.pt       per rank: optimizer state (+ the distributed optimizer's shard), RNG states
        trainer.json              step, prompt-loader position, KL controller, layout, the job config
        COMPLETE                  written last, after every rank's files are on disk
    step_000030.tmp-1a2b3c/       a checkpoint being written: never loaded, removed by the next run

Every rank writes into the `.tmp-*` directory; after a barrier rank 0 writes `trainer.json` and `COMPLETE`,
fsyncs, and renames the directory to its final name (an atomic rename on one filesystem). A process killed at
any point leaves either the previous complete checkpoint or the new one, never a half-written one that loads.

The optimizer and RNG files are per rank, so a resume must use the same TP x PP x DP layout (checked, with the
fix in the error); the weights alone reshard to any layout through `megatron-rlvr convert` or `export_hf`.
"""

from __future__ import annotations

import json
import logging
import os
import random
import re
import shutil
import uuid

import numpy as np
import torch
import torch.distributed as dist

logger = logging.getLogger(__name__)

COMPLETE = "COMPLETE"
TRAINER_STATE = "trainer.json"
_STEP_DIR = re.compile(r"^step_(\d+)$")


def step_dir(root: str, step: int) -> str:
    return os.path.join(root, f"step_{step:06d}")


def latest_checkpoint(root: str) -> str | None:
    """The complete checkpoint with the highest step under `root`, or None (directories without the COMPLETE
    marker, and `.tmp-*` ones, are ignored)."""
    if not os.path.isdir(root):
        return None
    best, best_step = None, -1
    for name in os.listdir(root):
        match = _STEP_DIR.match(name)
        path = os.path.join(root, name)
        if match and os.path.isfile(os.path.join(path, COMPLETE)) and int(match[1]) > best_step:
            best, best_step = path, int(match[1])
    return best


def remove_incomplete(root: str) -> list[str]:
    """Delete leftovers of interrupted saves (rank 0, before the first save of a run); returns what was removed."""
    removed = []
    if not os.path.isdir(root):
        return removed
    for name in os.listdir(root):
        path = os.path.join(root, name)
        if ".tmp-" in name or (_STEP_DIR.match(name) and not os.path.isfile(os.path.join(path, COMPLETE))):
            shutil.rmtree(path, ignore_errors=True)
            removed.append(path)
    return removed


def rng_state() -> dict:
    from megatron.core.tensor_parallel.random import get_cuda_rng_tracker

    state = {"python": random.getstate(), "numpy": np.random.get_state(), "torch": torch.get_rng_state(),
             "tracker": get_cuda_rng_tracker().get_states()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state()
    return state


def set_rng_state(state: dict) -> None:
    from megatron.core.tensor_parallel.random import get_cuda_rng_tracker

    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])
    get_cuda_rng_tracker().set_states(state["tracker"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state(state["cuda"])


def _optimizers(optimizer) -> list:
    """The optimizers inside megatron-core's ChainedOptimizer (or the optimizer itself)."""
    return list(getattr(optimizer, "chained_optimizers", [optimizer]))


def optimizer_state(optimizer) -> dict:
    """This rank's optimizer state; the distributed optimizer's parameter shard is kept in its own entry, since
    megatron-core leaves it out of `state_dict()`."""
    state = {"state_dict": optimizer.state_dict()}
    shards = [_param_shard(opt) for opt in _optimizers(optimizer) if hasattr(opt, "get_parameter_state_dp_reshardable")]
    if shards:
        state["param_shards"] = shards
    return state


def _param_shard(opt) -> dict:
    """The distributed optimizer's own shard (fp32 main weights, Adam moments) in its bucket layout.

    megatron-core 0.16's `get_parameter_state_dp_reshardable` lists only real parameters and writes no
    `padding` flag, but `load_parameter_state_from_dp_reshardable` filters every element on that flag
    (KeyError 'padding' on resume): each element is marked as a real parameter here."""
    shard = opt.get_parameter_state_dp_reshardable()
    for key, per_dtype in shard.items():
        if isinstance(key, int):
            for buckets in per_dtype.values():
                for bucket in buckets:
                    for element in bucket:
                        element.setdefault("padding", False)
    return shard


def load_optimizer_state(optimizer, state: dict) -> None:
    optimizer.load_state_dict(state["state_dict"])
    distributed = [opt for opt in _optimizers(optimizer) if hasattr(opt, "load_parameter_state_from_dp_reshardable")]
    for opt, shard in zip(distributed, state.get("param_shards", [])):
        # megatron copies into views of the fp32 main weights, leaves that require grad: outside autograd
        with torch.no_grad():
            opt.load_parameter_state_from_dp_reshardable(shard)
    # megatron-core 0.16's DistributedOptimizer.load_state_dict gives every parameter the SAME `step` tensor
    # (torch Adam without apex/TE); torch's Adam then adds 1 to it once per parameter per step, and the bias
    # correction of every later step is wrong. One step tensor per parameter, as torch keeps them:
    for opt in _optimizers(optimizer):
        for param_state in getattr(getattr(opt, "optimizer", None), "state", {}).values():
            if isinstance(param_state.get("step"), torch.Tensor):
                param_state["step"] = param_state["step"].clone()


class Checkpointer:
    """Saves and restores everything a resumed run needs. Collective: every rank calls `save` / `load`.

    `models`: name -> model (DDP-wrapped or not), e.g. {"policy": ddp, "value": value_ddp}; `optimizers`: name ->
    megatron-core optimizer, same names. `layout`: the parallel layout, checked on resume.
    """

    def __init__(self, root: str, models: dict, optimizers: dict, layout: dict, keep: int = 2):
        self.root = root
        self.models = models
        self.optimizers = optimizers
        self.layout = layout
        self.keep = keep
        self.rank = dist.get_rank()

    def _rank_file(self, directory: str) -> str:
        return os.path.join(directory, "ranks", f"rank_{self.rank:05d}.pt")

    def save(self, step: int, trainer_state: dict) -> str:
        """Write checkpoint `step` atomically; returns its final path."""
        from megatron_rlvr.models.convert import save_model_checkpoint

        final = step_dir(self.root, step)
        token = [uuid.uuid4().hex[:8] if self.rank == 0 else None]
        dist.broadcast_object_list(token, src=0)
        tmp = f"{final}.tmp-{token[0]}"
        if self.rank == 0:
            os.makedirs(os.path.join(tmp, "ranks"), exist_ok=True)
        dist.barrier()
        for name, model in self.models.items():
            save_model_checkpoint(model, os.path.join(tmp, name))
        torch.save({"optimizers": {name: optimizer_state(opt) for name, opt in self.optimizers.items()},
                    "rng": rng_state(), "layout": self.layout}, self._rank_file(tmp))
        dist.barrier()
        if self.rank == 0:
            state = dict(trainer_state, step=step, layout=self.layout)
            _write_synced(os.path.join(tmp, TRAINER_STATE), json.dumps(state, indent=2, default=str))
            _write_synced(os.path.join(tmp, COMPLETE), f"step {step}\n")
            if os.path.isdir(final):  # a complete checkpoint of this step from a run that died after it
                shutil.rmtree(final)
            os.rename(tmp, final)
            _fsync_dir(self.root)
            self._prune()
        dist.barrier()
        return final

    def _prune(self) -> None:
        complete = sorted(
            (int(m[1]), os.path.join(self.root, n)) for n in os.listdir(self.root) if (m := _STEP_DIR.match(n))
            and os.path.isfile(os.path.join(self.root, n, COMPLETE))
        )
        for _, path in complete[: max(len(complete) - self.keep, 0)]:
            shutil.rmtree(path, ignore_errors=True)

    def load(self, directory: str) -> dict:
        """Restore models, optimizers and RNG from `directory`; returns the trainer state (step, loader, ...)."""
        from megatron_rlvr.models.convert import load_model_checkpoint

        with open(os.path.join(directory, TRAINER_STATE)) as f:
            state = json.load(f)
        saved = state["layout"]
        if saved != self.layout:
            raise RuntimeError(
                f"checkpoint {directory} was written with layout {saved}, this run has {self.layout}: optimizer "
                "and RNG state are per rank, so resume with the same world size and parallel settings (or start "
                "a new output_dir from the exported weights)"
            )
        for name, model in self.models.items():
            load_model_checkpoint(model, os.path.join(directory, name))
        rank_state = torch.load(self._rank_file(directory), weights_only=False)
        for name, opt in self.optimizers.items():
            load_optimizer_state(opt, rank_state["optimizers"][name])
        set_rng_state(rank_state["rng"])
        dist.barrier()
        return state


def _write_synced(path: str, text: str) -> None:
    with open(path, "w") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())


def _fsync_dir(path: str) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def export_hf(model, arch, pg, tokenizer_dir: str, directory: str) -> None:
    """Write the policy as a HuggingFace directory (config, safetensors, tokenizer). Collective over the world
    (ranks without the model pass `model=None`): TP shards are gathered and PP stages sent to global rank 0,
    which writes.

    The write goes to a `.tmp-*` sibling renamed into place, like checkpoints.
    """
    from safetensors.torch import save_file

    from megatron_rlvr.models.convert import TOKENIZER_FILES
    from megatron_rlvr.models.weights import full_state_to_hf, gather_full_state

    full = {}
    if model is not None:  # the rollout ranks of the split layout hold no part of the policy
        full = gather_full_state(model, arch, pg)
        if pg.tp.rank() != 0 or pg.dp.rank() != 0:
            full = {}
    gathered = [None] * dist.get_world_size()
    dist.all_gather_object(gathered, full)
    if dist.get_rank() == 0:
        merged = {k: v for part in gathered for k, v in part.items()}
        hf = full_state_to_hf(merged, arch)
        tmp = f"{directory}.tmp-{uuid.uuid4().hex[:8]}"
        os.makedirs(tmp)
        save_file({k: v.contiguous() for k, v in hf.items()}, os.path.join(tmp, "model.safetensors"),
                  metadata={"format": "pt"})
        shutil.copy2(os.path.join(tokenizer_dir, "config.json"), os.path.join(tmp, "config.json"))
        for name in TOKENIZER_FILES:
            if os.path.isfile(os.path.join(tokenizer_dir, name)):
                shutil.copy2(os.path.join(tokenizer_dir, name), os.path.join(tmp, name))
        if os.path.isdir(directory):
            shutil.rmtree(directory)
        os.rename(tmp, directory)
    dist.barrier()
