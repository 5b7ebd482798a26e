"""Training checkpoints: policy (and value) weights, optimizer state, RNG states, data position and step, written
atomically, with a manifest of sizes and checksums; resume from the newest complete checkpoint that checks out.
The policy's HuggingFace export is `megatron_rlvr.hf_export.export_hf` (re-exported here).

Layout of `<output_dir>/checkpoints/`:

    step_000020/                  a complete checkpoint (only complete ones carry this name)
        policy/                   megatron-core dist_checkpointing shards (global shapes: any TP/PP can read them)
        value/                    the PPO value model, when there is one
        ranks/rank_00003.pt       per rank: optimizer state (+ the distributed optimizer's shard), RNG states
        trainer.json              step, prompt-loader position, KL controller, layout, the job config
        MANIFEST.json             every file above with its size and SHA-256
        COMPLETE                  written last, after every rank's files are on disk
    step_000030.tmp-1a2b3c/       a checkpoint being written: never loaded, removed by the next run
    step_000010.damaged/          a checkpoint that failed its manifest check on resume, kept for inspection

Every rank writes into the `.tmp-*` directory; after a barrier the ranks checksum the files (each a share),
rank 0 writes `trainer.json`, `MANIFEST.json` and `COMPLETE`, fsyncs, and renames the directory to its final name
(an atomic rename on one filesystem). A process killed at any point leaves either the previous complete
checkpoint or the new one, never a half-written one that loads.

On resume (`load_latest`) the newest complete checkpoint is checked against its manifest first (every rank a
share of the files): a file missing, of another size or another checksum (truncated, bit-flipped, replaced) is
reported with its path and reason, the checkpoint is renamed `*.damaged`, and the previous complete one is
tried. Rank files are read with `torch.load(weights_only=True)`: a pickle planted in the directory cannot run
code (the RNG states are stored as plain numbers and tensors for that).

The optimizer and RNG files are per rank, so a resume must use the same TP x PP x DP layout (checked, with the
fix in the error); the weights alone reshard to any layout through `megatron-rlvr convert` or `export_hf`.
"""

from __future__ import annotations

import hashlib
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

from megatron_rlvr.hf_export import export_hf  # noqa: F401 - the policy's HF export, streamed (hf_export.py)

logger = logging.getLogger(__name__)

COMPLETE = "COMPLETE"
TRAINER_STATE = "trainer.json"
MANIFEST = "MANIFEST.json"
DAMAGED_SUFFIX = ".damaged"
_HASH_CHUNK = 16 << 20
_STEP_DIR = re.compile(r"^step_(\d+)$")


def step_dir(root: str, step: int) -> str:
    return os.path.join(root, f"step_{step:06d}")


def complete_checkpoints(root: str) -> list[str]:
    """The complete checkpoints under `root`, newest first (directories without the COMPLETE marker, `.tmp-*`
    and `.damaged` ones are ignored)."""
    if not os.path.isdir(root):
        return []
    found = [(int(m[1]), os.path.join(root, name)) for name in os.listdir(root) if (m := _STEP_DIR.match(name))
             and os.path.isfile(os.path.join(root, name, COMPLETE))]
    return [path for _, path in sorted(found, reverse=True)]


def latest_checkpoint(root: str) -> str | None:
    """The complete checkpoint with the highest step under `root`, or None."""
    found = complete_checkpoints(root)
    return found[0] if found else None


def file_digest(path: str) -> dict:
    """{"bytes", "sha256"} of one file, read in chunks (memory stays at one chunk)."""
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(_HASH_CHUNK):
            digest.update(chunk)
    return {"bytes": os.path.getsize(path), "sha256": digest.hexdigest()}


def _checkpoint_files(directory: str) -> list[str]:
    """Every file of a checkpoint directory (relative paths, sorted), except the manifest and the marker."""
    out = []
    for parent, _, names in os.walk(directory):
        for name in names:
            rel = os.path.relpath(os.path.join(parent, name), directory)
            if rel not in (MANIFEST, COMPLETE):
                out.append(rel)
    return sorted(out)


def _share(items: list, rank: int, world: int) -> list:
    return items[rank::world]


def file_problem(directory: str, rel: str, expected: dict) -> str | None:
    """Why `rel` does not match its manifest entry, or None."""
    path = os.path.join(directory, rel)
    if not os.path.isfile(path):
        return f"{path}: missing"
    size = os.path.getsize(path)
    if size != expected["bytes"]:
        return f"{path}: {size} bytes, the manifest says {expected['bytes']} (truncated or overwritten)"
    if file_digest(path)["sha256"] != expected["sha256"]:
        return f"{path}: SHA-256 differs from the manifest (the file's bytes changed: a flipped bit, a replaced file)"
    return None


def checkpoint_problems(directory: str) -> list[str]:
    """Collective over the world: what is wrong with `directory` against its manifest (empty: it checks out).
    Every rank checks a share of the files; every rank gets the whole list."""
    rank, world = dist.get_rank(), dist.get_world_size()
    box = [None]
    if rank == 0:
        try:
            with open(os.path.join(directory, MANIFEST)) as f:
                box[0] = json.load(f)["files"]
        except FileNotFoundError:
            box[0] = {}
            logger.warning("checkpoint %s has no %s (written by an older version): loaded unchecked", directory,
                           MANIFEST)
        except (OSError, ValueError, KeyError) as err:
            box[0] = f"{os.path.join(directory, MANIFEST)}: unreadable ({type(err).__name__}: {err})"
    dist.broadcast_object_list(box, src=0)
    if isinstance(box[0], str):
        return [box[0]]
    manifest = box[0]
    mine = [problem for rel in _share(sorted(manifest), rank, world)
            if (problem := file_problem(directory, rel, manifest[rel])) is not None]
    gathered = [None] * world
    dist.all_gather_object(gathered, mine)
    return [problem for part in gathered for problem in part]


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
    """Every RNG's state in types `torch.load(weights_only=True)` reads (numpy's as plain numbers)."""
    from megatron.core.tensor_parallel.random import get_cuda_rng_tracker

    name, keys, pos, has_gauss, cached = np.random.get_state()
    state = {"python": random.getstate(),
             "numpy": {"name": name, "keys": keys.tolist(), "pos": int(pos), "has_gauss": int(has_gauss),
                       "cached_gaussian": float(cached)},
             "torch": torch.get_rng_state(), "tracker": get_cuda_rng_tracker().get_states()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state()
    return state


def set_rng_state(state: dict) -> None:
    from megatron.core.tensor_parallel.random import get_cuda_rng_tracker

    random.setstate(state["python"])
    numpy_state = state["numpy"]
    np.random.set_state((numpy_state["name"], np.asarray(numpy_state["keys"], dtype=np.uint32), numpy_state["pos"],
                         numpy_state["has_gauss"], numpy_state["cached_gaussian"]))
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
        _write_results_in_process()

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
        digests = self._digest_files(tmp)
        if self.rank == 0:
            state = dict(trainer_state, step=step, layout=self.layout)
            _write_synced(os.path.join(tmp, TRAINER_STATE), json.dumps(state, indent=2, default=str))
            digests[TRAINER_STATE] = file_digest(os.path.join(tmp, TRAINER_STATE))
            _write_synced(os.path.join(tmp, MANIFEST), json.dumps({"step": step, "files": digests}, indent=1))
            _write_synced(os.path.join(tmp, COMPLETE), f"step {step}\n")
            if os.path.isdir(final):  # a complete checkpoint of this step from a run that died after it
                shutil.rmtree(final)
            os.rename(tmp, final)
            _fsync_dir(self.root)
            self._prune()
        dist.barrier()
        return final

    def _digest_files(self, directory: str) -> dict:
        """Sizes and checksums of every file written so far (each rank hashes a share); rank 0 gets them all."""
        names = [_checkpoint_files(directory) if self.rank == 0 else None]
        dist.broadcast_object_list(names, src=0)
        world = dist.get_world_size()
        mine = {rel: file_digest(os.path.join(directory, rel)) for rel in _share(names[0], self.rank, world)}
        gathered = [None] * world if self.rank == 0 else None
        dist.gather_object(mine, gathered, dst=0)
        return {k: v for part in gathered for k, v in part.items()} if self.rank == 0 else {}

    def load_latest(self) -> tuple[dict | None, str | None]:
        """Restore the newest complete checkpoint that checks out against its manifest; (trainer state, path),
        or (None, None) when there is none. A damaged one is reported, renamed `*.damaged` and the previous one
        tried; when every checkpoint is damaged the run stops rather than silently starting over."""
        box = [complete_checkpoints(self.root) if self.rank == 0 else None]
        dist.broadcast_object_list(box, src=0)
        candidates = box[0]
        damaged = []
        for directory in candidates:
            problems = checkpoint_problems(directory)
            if not problems:
                state = self.load(directory)
                if damaged and self.rank == 0:
                    logger.warning("resumed from %s, the newest complete checkpoint that checks out", directory)
                return state, directory
            damaged.append(directory)
            if self.rank == 0:
                shown = "; ".join(problems[:5]) + (f"; and {len(problems) - 5} more" if len(problems) > 5 else "")
                logger.error("checkpoint %s is damaged, not loaded: %s. It is renamed %s; trying the previous "
                             "complete checkpoint", directory, shown, directory + DAMAGED_SUFFIX)
                os.rename(directory, _free_name(directory + DAMAGED_SUFFIX))
            dist.barrier()
        if damaged:
            raise RuntimeError(f"every checkpoint under {self.root} is damaged ({', '.join(damaged)}, renamed "
                               f"*{DAMAGED_SUFFIX}; reasons logged above): nothing to resume from. Move them away to "
                               "start the run anew, or restore a good copy")
        return None, None

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
        rank_state = torch.load(self._rank_file(directory), weights_only=True)
        for name, opt in self.optimizers.items():
            load_optimizer_state(opt, rank_state["optimizers"][name])
        set_rng_state(rank_state["rng"])
        dist.barrier()
        return state


def _write_results_in_process() -> None:
    """Keep megatron-core's checkpoint writer from starting a `multiprocessing.Manager` server.

    Its file writer hands results back through a queue that it creates, on first use, in a spawned Manager
    process (megatron.core.dist_checkpointing.strategies.filesystem_async); that process (and the resource
    tracker it brings) outlives a rank killed with SIGKILL, adopted by init, since torchrun only signals the
    process groups of ranks still alive. Our saves are synchronous: the writer puts and reads its results in
    this process, so a plain in-process queue serves, and no such process is ever started."""
    import queue

    from megatron.core.dist_checkpointing.strategies import filesystem_async

    if filesystem_async._results_queue is None:
        filesystem_async._results_queue = queue.Queue()


def _free_name(path: str) -> str:
    """`path`, or `path-2`, `path-3`, ... whichever does not exist yet."""
    candidate, n = path, 1
    while os.path.exists(candidate):
        n += 1
        candidate = f"{path}-{n}"
    return candidate


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
