"""The one place that decides whether the Triton kernels or their plain-torch twins run.

Triton runs when it is importable and either the tensor is on a GPU or `TRITON_INTERPRET=1` is set (then
CPU tensors go through Triton's interpreter; the variable must be set before anything imports the
kernels). Otherwise the plain-torch twins in `torch_rows.py` run. `MEGATRON_RLVR_KERNELS=torch` forces the
twins (for benchmarks and bisecting); `MEGATRON_RLVR_KERNELS=triton` turns "Triton cannot run" into an
error instead of a silent fallback.
"""

from __future__ import annotations

import functools
import importlib.util
import os
from types import ModuleType

import torch

_CHOICES = ("auto", "triton", "torch")


@functools.lru_cache(maxsize=None)
def triton_importable() -> bool:
    return importlib.util.find_spec("triton") is not None


def _choice() -> str:
    choice = os.environ.get("MEGATRON_RLVR_KERNELS", "auto").lower()
    if choice not in _CHOICES:
        raise ValueError(f"MEGATRON_RLVR_KERNELS={choice!r} is not one of {', '.join(_CHOICES)}")
    return choice


def use_triton(tensor: torch.Tensor) -> bool:
    """Whether the Triton kernels run for `tensor` (see the module docstring)."""
    choice = _choice()
    if choice == "torch":
        return False
    interpret = os.environ.get("TRITON_INTERPRET") == "1"
    runnable = triton_importable() and (tensor.is_cuda or interpret)
    if choice == "triton" and not runnable:
        raise RuntimeError(
            f"MEGATRON_RLVR_KERNELS=triton, but Triton cannot run on a {tensor.device.type} tensor "
            f"(triton importable: {triton_importable()}, TRITON_INTERPRET={os.environ.get('TRITON_INTERPRET')!r}); "
            "move the tensor to a GPU, set TRITON_INTERPRET=1 before importing the kernels, or unset "
            "MEGATRON_RLVR_KERNELS"
        )
    return runnable


def backend_name(tensor: torch.Tensor) -> str:
    """'triton', 'triton-interpreter' or 'torch': what runs for `tensor`, for logs and benchmark tables."""
    if not use_triton(tensor):
        return "torch"
    return "triton" if tensor.is_cuda and os.environ.get("TRITON_INTERPRET") != "1" else "triton-interpreter"


def row_ops(tensor: torch.Tensor) -> ModuleType:
    """The module providing `row_stats` and `logits_grad` for `tensor`: `triton_rows` or `torch_rows`."""
    if use_triton(tensor):
        from . import triton_rows

        return triton_rows
    from . import torch_rows

    return torch_rows
