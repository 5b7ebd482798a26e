"""Device and collective-backend choice, and the CPU compatibility layer for megatron-core.

Every device difference of the engine lives here, behind one small interface (`Platform`), in the manner of
vLLM's `vllm/platforms`: the rest of the engine asks `current_platform()` for its device, its collective backend
and its synchronisation, and never branches on CUDA itself.

megatron-core assumes CUDA in a handful of places: `torch.cuda.current_device()` passed as a device, tensor
factories with `device="cuda"`, `Tensor.cuda()`, and the CUDA RNG-state calls of its RNG tracker. On a machine
without a GPU (tests, CPU runs) `CpuPlatform.activate()` redirects exactly those, once, for the whole process:
a `TorchFunctionMode` maps CUDA device arguments to the CPU, and the RNG tracker is pointed at the CPU generator.
Nothing is redirected when a GPU is present.
"""

from __future__ import annotations

import functools
import os

import torch
from torch.overrides import TorchFunctionMode


class Platform:
    """What the engine needs to know about the device it runs on."""

    name: str = "abstract"
    device_type: str = "cpu"
    dist_backend: str = "gloo"

    def device(self, local_rank: int | None = None) -> torch.device:
        raise NotImplementedError

    def set_device(self, local_rank: int) -> None:
        """Bind this process to its device (before any process group or model is built)."""

    def activate(self) -> None:
        """Make megatron-core usable on this device; idempotent."""

    def synchronize(self) -> None:
        """Wait for queued device work (for timing)."""

    def max_memory_allocated(self) -> int:
        return 0

    def reset_peak_memory(self) -> None:
        """Start a new peak-memory window."""

    def empty_cache(self) -> None:
        """Return freed blocks held by the device's caching allocator (after a KV cache is dropped)."""

    def varlen_attention(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, cu_seqlens: torch.Tensor,
                         max_seqlen: int, *, scale: float, dropout_p: float = 0.0) -> torch.Tensor:
        """Causal attention within each of the sequences packed back to back: q `[T, H, d]`, k and v `[T, G, d]`
        (G divides H: grouped-query attention), `cu_seqlens` `[N + 1]` their starts and the total T -> `[T, H, d]`.

        This exact path gathers the sequences into a right-padded `[N, max_seqlen]` batch and runs SDPA once with a
        causal mask: a query never sees the padding after its own sequence's end, so no mask beyond the causal one
        is needed and no `[T, T]` mask is ever built; the padded positions' outputs are dropped. A device with a
        variable-length kernel overrides it."""
        starts = cu_seqlens[:-1].to(torch.long)
        lengths = cu_seqlens[1:].to(torch.long) - starts
        positions = torch.arange(int(max_seqlen), device=q.device)
        valid = positions.unsqueeze(0) < lengths.to(q.device).unsqueeze(1)  # [N, L]
        index = torch.where(valid, starts.to(q.device).unsqueeze(1) + positions, 0)
        qs, ks, vs = (x[index].permute(0, 2, 1, 3) for x in (q, k, v))  # [N, heads, L, d]
        context = torch.nn.functional.scaled_dot_product_attention(
            qs, ks, vs, dropout_p=dropout_p, is_causal=True, scale=scale, enable_gqa=q.shape[1] != k.shape[1])
        # sequence by sequence, position by position: the packed order
        return context.permute(0, 2, 1, 3)[valid]


class CudaPlatform(Platform):
    name = "cuda"
    device_type = "cuda"
    dist_backend = "nccl"

    def device(self, local_rank: int | None = None) -> torch.device:
        if local_rank is None:
            return torch.device("cuda", torch.cuda.current_device())
        return torch.device("cuda", local_rank)

    def set_device(self, local_rank: int) -> None:
        torch.cuda.set_device(local_rank)

    def synchronize(self) -> None:
        torch.cuda.synchronize()

    def max_memory_allocated(self) -> int:
        return torch.cuda.max_memory_allocated()

    def reset_peak_memory(self) -> None:
        torch.cuda.reset_peak_memory_stats()

    def empty_cache(self) -> None:
        torch.cuda.empty_cache()

    def varlen_attention(self, q, k, v, cu_seqlens, max_seqlen, *, scale, dropout_p=0.0):
        """flash-attn's varlen kernel where it is installed, else torch's own (`torch.nn.attention.varlen`, flash
        attention in torch); both take fp16/bf16 only, so fp32 uses the exact gathered-batch path."""
        kernel = _cuda_varlen_kernel()
        if kernel is None or q.dtype not in (torch.float16, torch.bfloat16):
            return super().varlen_attention(q, k, v, cu_seqlens, max_seqlen, scale=scale, dropout_p=dropout_p)
        cu = cu_seqlens.to(torch.int32)
        return kernel(q, k, v, cu, max_seqlen, scale, dropout_p)


@functools.lru_cache(maxsize=None)
def _cuda_varlen_kernel():
    """`(q, k, v, cu_seqlens_int32, max_seqlen, scale, dropout_p) -> out`, or None when neither kernel exists."""
    try:
        from flash_attn import flash_attn_varlen_func

        return lambda q, k, v, cu, n, scale, p: flash_attn_varlen_func(
            q, k, v, cu, cu, n, n, dropout_p=p, softmax_scale=scale, causal=True)
    except ImportError:
        pass
    try:
        from torch.nn.attention.varlen import varlen_attn
    except ImportError:
        return None

    def torch_varlen(q, k, v, cu, n, scale, p):
        if p:
            raise ValueError("torch's varlen attention has no dropout; set attention_dropout to 0")
        return varlen_attn(q, k, v, cu, cu, n, n, scale=scale, window_size=(-1, 0), enable_gqa=q.shape[1] != k.shape[1])

    return torch_varlen


def _is_cuda_device(device) -> bool:
    if isinstance(device, torch.device):
        return device.type == "cuda"
    if isinstance(device, str):
        return device.startswith("cuda")
    # megatron-core passes `torch.cuda.current_device()`, an int, as a device
    return isinstance(device, int) and not isinstance(device, bool)


class _CudaToCpuMode(TorchFunctionMode):
    """Rewrites CUDA device arguments of torch calls to the CPU (active only on CpuPlatform)."""

    _TO_METHODS = (torch.Tensor.to, torch.Tensor.cuda)

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = dict(kwargs or {})
        if func is torch.Tensor.cuda:
            return args[0]
        if func is torch.Tensor.type and len(args) == 1 and not kwargs:
            # megatron-core's distributed optimizer dispatches on 'torch.cuda.FloatTensor'-style names
            return func(*args).replace("torch.", "torch.cuda.", 1)
        if "device" in kwargs and _is_cuda_device(kwargs["device"]):
            kwargs["device"] = "cpu"
        if func is torch.Tensor.to and len(args) > 1 and _is_cuda_device(args[1]):
            args = (args[0], "cpu", *args[2:])
        return func(*args, **kwargs)


class CpuPlatform(Platform):
    name = "cpu"
    device_type = "cpu"
    dist_backend = "gloo"
    _mode: _CudaToCpuMode | None = None

    def device(self, local_rank: int | None = None) -> torch.device:
        return torch.device("cpu")

    def activate(self) -> None:
        if CpuPlatform._mode is not None:
            return
        # A mode entered and never exited stays on the (thread-local) mode stack for the process's lifetime.
        CpuPlatform._mode = _CudaToCpuMode()
        CpuPlatform._mode.__enter__()
        # megatron-core passes `torch.cuda.current_device()` as a device, also inside autograd backward
        # functions, where torch-function modes are not active: answer the CPU itself
        torch.cuda.current_device = lambda: "cpu"
        torch.cuda.synchronize = lambda device=None: None  # p2p shape exchange of the pipeline schedule
        # megatron-core's RNG tracker keeps per-region CUDA generator states; on CPU the CPU generator plays
        # that role, so forking a region (dropout under TP) swaps CPU generator states exactly as on a GPU.
        torch.cuda.get_rng_state = lambda device="cuda": torch.get_rng_state()
        torch.cuda.manual_seed = lambda seed: torch.default_generator.manual_seed(int(seed))
        from megatron.core.tensor_parallel import random as mcore_random

        mcore_random._get_cuda_rng_state = lambda *a, **k: torch.get_rng_state()
        mcore_random._set_cuda_rng_state = lambda state, *a, **k: torch.set_rng_state(state)

    def max_memory_allocated(self) -> int:
        import resource

        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


@functools.lru_cache(maxsize=1)
def current_platform() -> Platform:
    """CUDA when a GPU is visible (and MEGATRON_RLVR_DEVICE is not `cpu`), else the CPU."""
    forced = os.environ.get("MEGATRON_RLVR_DEVICE", "").lower()
    if forced not in ("", "cpu", "cuda"):
        raise ValueError(f"MEGATRON_RLVR_DEVICE={forced!r}: expected 'cpu' or 'cuda'")
    if forced == "cuda" or (forced == "" and torch.cuda.is_available()):
        return CudaPlatform()
    return CpuPlatform()
