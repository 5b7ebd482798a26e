"""Buckets: a rank's parameters cut into flat, contiguous transfer units of at most `bucket_bytes`.

A bucket lists `(name, shape)` entries of one dtype; `pack` concatenates the tensors into one flat buffer (one
collective per bucket instead of one per tensor), `unpack` returns views of a received buffer. A large tensor
(a quarter bucket or more) travels alone and unpacked. The plan is a pure function of the names and shapes, so every rank that
knows them (the sender's metadata is broadcast once) cuts the same buckets.
"""

from __future__ import annotations

import dataclasses
import math

import torch

DTYPES = {str(d): d for d in (torch.float32, torch.bfloat16, torch.float16)}


@dataclasses.dataclass(frozen=True)
class TensorMeta:
    name: str
    """megatron global parameter name"""
    shape: tuple[int, ...]
    dtype: str

    @property
    def numel(self) -> int:
        return math.prod(self.shape)

    @property
    def nbytes(self) -> int:
        return self.numel * DTYPES[self.dtype].itemsize


@dataclasses.dataclass(frozen=True)
class Bucket:
    entries: tuple[TensorMeta, ...]

    @property
    def dtype(self) -> torch.dtype:
        return DTYPES[self.entries[0].dtype]

    @property
    def numel(self) -> int:
        return sum(e.numel for e in self.entries)

    @property
    def nbytes(self) -> int:
        return sum(e.nbytes for e in self.entries)


def plan_buckets(metas: list[TensorMeta], bucket_bytes: int, alone_bytes: int | None = None) -> list[Bucket]:
    """Greedy in order: start a new bucket when the next tensor would overflow it or changes dtype.

    A tensor of at least `alone_bytes` (default: a quarter bucket) gets a bucket of its own, which the sender
    broadcasts straight from the parameter: packing it would copy many bytes to save few collectives.
    """
    if bucket_bytes < 1:
        raise ValueError(f"bucket size must be positive, got {bucket_bytes} bytes")
    alone_bytes = max(1, bucket_bytes // 4) if alone_bytes is None else alone_bytes
    buckets: list[Bucket] = []
    current: list[TensorMeta] = []
    size = 0
    for meta in metas:
        if meta.nbytes >= alone_bytes:
            if current:
                buckets.append(Bucket(tuple(current)))
                current, size = [], 0
            buckets.append(Bucket((meta,)))
            continue
        if current and (size + meta.nbytes > bucket_bytes or meta.dtype != current[0].dtype):
            buckets.append(Bucket(tuple(current)))
            current, size = [], 0
        current.append(meta)
        size += meta.nbytes
    if current:
        buckets.append(Bucket(tuple(current)))
    return buckets


def pack(bucket: Bucket, tensors: dict[str, torch.Tensor], out: torch.Tensor) -> torch.Tensor:
    """The bucket as one flat tensor: the lone tensor itself when it is contiguous (no copy), else its tensors
    copied in order into the front of the flat buffer `out`."""
    if len(bucket.entries) == 1:
        only = tensors[bucket.entries[0].name].detach()
        if only.is_contiguous():
            return only.view(-1)
    flat = out[: bucket.numel]
    offset = 0
    for entry in bucket.entries:
        flat[offset : offset + entry.numel].copy_(tensors[entry.name].detach().reshape(-1))
        offset += entry.numel
    return flat


def unpack(bucket: Bucket, flat: torch.Tensor) -> dict[str, torch.Tensor]:
    """Views into `flat`, one per bucket entry, shaped as the entry."""
    out = {}
    offset = 0
    for entry in bucket.entries:
        out[entry.name] = flat[offset : offset + entry.numel].view(entry.shape)
        offset += entry.numel
    return out
