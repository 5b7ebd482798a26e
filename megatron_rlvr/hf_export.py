"""The policy as a HuggingFace directory, streamed tensor by tensor from the ranks that own it to one writer.

Memory stays bounded at any scale (the 405B example: TP 8 x PP 10): no rank ever holds more than one full tensor
beyond its own shards.

1. Every PP stage's sender (TP rank 0 of data-parallel replica 0) lists its HF tensors (names, shapes, dtypes)
   from meta tensors; the lists are gathered on global rank 0, which lays out the safetensors shards
   (`max_shard_bytes` each, an index file when there is more than one) and writes their headers.
2. Stage by stage, each parameter's TP shards are all-gathered inside the stage's TP group into one full
   tensor, cut into its HF tensors, and the sender sends them to rank 0 (point to point), which writes each at
   its offset in its shard file. Data-parallel replicas other than 0 take no part.

The directory is written as `<dir>.tmp-*` and renamed into place, like checkpoints; config and tokenizer files
come from `tokenizer_dir` (the run's `model.path`).
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import struct
import uuid

import torch
import torch.distributed as dist

logger = logging.getLogger(__name__)

DEFAULT_MAX_SHARD_BYTES = 5 * 2**30  # transformers' own default shard size
SINGLE_FILE = "model.safetensors"
INDEX_FILE = "model.safetensors.index.json"
_DTYPES = {torch.float32: "F32", torch.bfloat16: "BF16", torch.float16: "F16", torch.float64: "F64",
           torch.int64: "I64", torch.int32: "I32", torch.int16: "I16", torch.int8: "I8", torch.uint8: "U8",
           torch.bool: "BOOL"}


class ShardedSafetensorsWriter:
    """Safetensors shard files laid out up front from `(name, shape, dtype)` entries, then filled one tensor at a
    time in any order: memory is one tensor, whatever the model's size."""

    def __init__(self, directory: str, entries: list[tuple[str, tuple, torch.dtype]], max_shard_bytes: int):
        self.directory = directory
        shards: list[list[tuple[str, tuple, torch.dtype, int]]] = [[]]
        size = 0
        for name, shape, dtype in entries:
            nbytes = _nbytes(shape, dtype)
            if shards[-1] and size + nbytes > max_shard_bytes:
                shards.append([])
                size = 0
            shards[-1].append((name, tuple(shape), dtype, nbytes))
            size += nbytes
        count = len(shards)
        self.files = [SINGLE_FILE] if count == 1 else [f"model-{i + 1:05d}-of-{count:05d}.safetensors"
                                                         for i in range(count)]
        self.where: dict[str, tuple[str, int, int]] = {}  # name -> (file, byte offset, bytes)
        self.total_bytes = 0
        for file, shard in zip(self.files, shards):
            header, offset = {"__metadata__": {"format": "pt"}}, 0
            for name, shape, dtype, nbytes in shard:
                header[name] = {"dtype": _DTYPES[dtype], "shape": list(shape), "data_offsets": [offset, offset + nbytes]}
                offset += nbytes
            raw = json.dumps(header, separators=(",", ":")).encode()
            raw += b" " * (-len(raw) % 8)  # the data starts 8-byte aligned, as safetensors itself writes it
            start = 8 + len(raw)
            with open(os.path.join(directory, file), "wb") as f:
                f.write(struct.pack("<Q", len(raw)) + raw)
                f.truncate(start + offset)
            for name, _, _, nbytes in shard:
                begin = header[name]["data_offsets"][0]
                self.where[name] = (file, start + begin, nbytes)
            self.total_bytes += offset
        self._pending = set(self.where)

    def write(self, name: str, tensor: torch.Tensor) -> None:
        file, offset, nbytes = self.where[name]
        data = _as_bytes(tensor).numpy()
        if data.nbytes != nbytes:
            raise RuntimeError(f"HF export: {name} has {data.nbytes} bytes, its layout says {nbytes}; this is a bug")
        with open(os.path.join(self.directory, file), "r+b") as f:
            f.seek(offset)
            f.write(memoryview(data))
        self._pending.discard(name)

    def close(self) -> None:
        if self._pending:
            raise RuntimeError(f"HF export: {len(self._pending)} tensor(s) never arrived, e.g. "
                               f"{sorted(self._pending)[0]}; this is a bug")
        for file in self.files:
            with open(os.path.join(self.directory, file), "r+b") as f:
                os.fsync(f.fileno())
        if len(self.files) > 1:
            index = {"metadata": {"total_size": self.total_bytes},
                     "weight_map": {name: where[0] for name, where in self.where.items()}}
            with open(os.path.join(self.directory, INDEX_FILE), "w") as f:
                json.dump(index, f, indent=2)


def _as_bytes(tensor: torch.Tensor) -> torch.Tensor:
    """The tensor's bytes as a flat uint8 tensor (a view where it is contiguous already)."""
    return tensor.detach().cpu().contiguous().reshape(-1).view(torch.uint8)


def _nbytes(shape, dtype: torch.dtype) -> int:
    count = 1
    for n in shape:
        count *= int(n)
    return count * torch.empty((), dtype=dtype).element_size()


def _hf_tensors(model, arch, pg, *, meta: bool):
    """(HF name, tensor) of this PP stage, one megatron parameter at a time (collective over the TP group)."""
    from megatron_rlvr.models.hf_mapping import mcore_full_to_hf
    from megatron_rlvr.models.weights import iter_full_params

    for name, full in iter_full_params(model, arch, pg, meta=meta):
        yield from mcore_full_to_hf(name, full, arch).items()


def export_hf(model, arch, pg, tokenizer_dir: str, directory: str, *,
              max_shard_bytes: int = DEFAULT_MAX_SHARD_BYTES) -> None:
    """Write the policy as a HuggingFace directory (config, safetensors shards, tokenizer). Collective over the
    world: ranks without the model (the rollout ranks of the split layout) pass `model=None`."""
    from megatron_rlvr.models.convert import TOKENIZER_FILES

    rank, world = dist.get_rank(), dist.get_world_size()
    owner = model is not None and pg.dp.rank() == 0
    sender = owner and pg.tp.rank() == 0
    entries = [(name, tuple(t.shape), t.dtype) for name, t in _hf_tensors(model, arch, pg, meta=True)] if sender else []
    listed = [None] * world if rank == 0 else None
    dist.gather_object((pg.pp.rank() if sender else -1, entries), listed, dst=0)

    writer = tmp = None
    if rank == 0:
        tmp = f"{directory}.tmp-{uuid.uuid4().hex[:8]}"
        os.makedirs(tmp)
        senders = sorted((stage, src) for src, (stage, _) in enumerate(listed) if stage >= 0)
        writer = ShardedSafetensorsWriter(tmp, [e for _, src in senders for e in listed[src][1]], max_shard_bytes)
        logger.info("exporting the policy to %s: %d tensors, %.1f MB in %d file(s)", directory, len(writer.where),
                    writer.total_bytes / 1e6, len(writer.files))

    if owner:  # this stage's TP group gathers each tensor in turn; its sender passes it on
        for name, tensor in _hf_tensors(model, arch, pg, meta=False):
            if not sender:
                continue
            if rank == 0:
                writer.write(name, tensor)
            else:
                dist.send(_as_bytes(tensor), dst=0)
    if rank == 0:
        for _, src in senders:
            if src == 0:
                continue
            for name, shape, dtype in listed[src][1]:
                buffer = torch.empty(_nbytes(shape, dtype), dtype=torch.uint8)
                dist.recv(buffer, src=src)
                writer.write(name, buffer.view(dtype).view(shape))
        writer.close()
        shutil.copy2(os.path.join(tokenizer_dir, "config.json"), os.path.join(tmp, "config.json"))
        for name in TOKENIZER_FILES:
            if os.path.isfile(os.path.join(tokenizer_dir, name)):
                shutil.copy2(os.path.join(tokenizer_dir, name), os.path.join(tmp, name))
        if os.path.isdir(directory):
            shutil.rmtree(directory)
        os.rename(tmp, directory)
        logger.info("wrote %s (loads with transformers' from_pretrained and vLLM)", directory)
    dist.barrier()
