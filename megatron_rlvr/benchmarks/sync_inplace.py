"""`megatron-rlvr bench sync-inplace`: the colocated in-place weight sync on one device, against a device copy.

No vLLM needed: the destination is a set of tensors shaped and laid out exactly as vLLM's parameters on rollout TP
rank j (`sync.vllm_layout.vllm_parameter_shapes`: fused `qkv_proj` and `gate_up_proj`, padded vocab tables),
allocated once as vLLM allocates its own; the source is a megatron GPTModel built on the device by `build_llama`
(training TP 1). Timed in the same run, median of --repeats, the three interleaved in every repeat:

- device copy: `copy_` of one flat buffer into another of the same bytes: what this device sustains for a copy.
- in-place: the colocated "inplace" path of `sync.weight_sync.WeightSync` (`sync.vllm_layout.InplaceCopy`): one
  strided copy per region, megatron's layout straight into vLLM's.
- old path: `sync.transfer.to_hf` (HF-named tensors; the QKV reorder is a copy) then, per HF tensor, the
  narrow-and-copy vLLM's weight loaders do into the fused parameters (`loader_copy`; the layer rebuilding and
  post-processing of vLLM's layer-wise reload are not counted).

GB/s = bytes written into vLLM's parameters / seconds. A copy reads and writes every byte, so its memory traffic
is twice that: half the physical HBM bandwidth (NVML: memory clock x bus width, printed for context) bounds it.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import time
from typing import Mapping

import torch

_FUSED = {"q_proj": ("qkv_proj", 0), "k_proj": ("qkv_proj", 1), "v_proj": ("qkv_proj", 2),
          "gate_proj": ("gate_up_proj", 0), "up_proj": ("gate_up_proj", 1)}
"""HF projection -> (vLLM's fused parameter, position in it): vLLM's `stacked_params_mapping` for Llama"""


def add_arguments(parser: argparse.ArgumentParser) -> None:
    from megatron_rlvr.benchmarks.train import SIZES

    parser.add_argument("--size", choices=sorted(SIZES), default=None,
                        help="Llama shape (default: 8b on a GPU, tiny on CPU)")
    parser.add_argument("--dtype", choices=("bf16", "fp32"), default=None, help="default: bf16 on GPU, fp32 on CPU")
    parser.add_argument("--rollout-tp", type=int, default=1, help="vLLM tensor-parallel size of the destination")
    parser.add_argument("--rollout-rank", type=int, default=0, help="which vLLM TP rank's parameters to fill")
    parser.add_argument("--repeats", type=int, default=10)
    parser.add_argument("--json", action="store_true", help="print one JSON object instead of a table")


def vllm_destinations(arch, rollout_tp: int, dtype: torch.dtype, device) -> dict[str, torch.Tensor]:
    """Tensors shaped as vLLM's parameters on one rollout rank, allocated once (contents undefined)."""
    from megatron_rlvr.sync.vllm_layout import vllm_parameter_shapes

    return {name: torch.empty(shape, dtype=dtype, device=device)
            for name, shape in vllm_parameter_shapes(arch, rollout_tp).items()}


def loader_copy(destinations: Mapping[str, torch.Tensor], hf_name: str, tensor: torch.Tensor, arch,
                rollout_tp: int, rank: int) -> None:
    """What vLLM's weight loaders do with one full HF tensor on rollout rank `rank`: narrow to the rank's slice
    and copy it into its place (q / k / v or gate / up inside the fused parameter; vocab rows, padding zeroed)."""
    from megatron_rlvr.sync.vllm_layout import vllm_vocab_rows

    r, j, d = rollout_tp, rank, arch.head_dim
    prefix, _, leaf = hf_name.rpartition(".weight")[0].rpartition(".")
    if leaf in _FUSED:
        fused, part = _FUSED[leaf]
        dst = destinations[f"{prefix}.{fused}.weight"]
        if fused == "gate_up_proj":
            rows = arch.ffn_hidden_size // r
            dst.narrow(0, part * rows, rows).copy_(tensor.narrow(0, j * rows, rows))
            return
        q_rows, kv_rows = arch.num_heads // r * d, max(1, arch.num_kv_heads // r) * d
        if part == 0:
            dst.narrow(0, 0, q_rows).copy_(tensor.narrow(0, j * q_rows, q_rows))
        else:  # KV heads are replicated on rollout_tp / num_kv_heads ranks when there are fewer than ranks
            shard = j // max(1, r // arch.num_kv_heads)
            dst.narrow(0, q_rows + (part - 1) * kv_rows, kv_rows).copy_(tensor.narrow(0, shard * kv_rows, kv_rows))
        return
    dst = destinations[hf_name]
    if leaf in ("o_proj", "down_proj"):
        cols = dst.shape[1]
        dst.copy_(tensor.narrow(1, j * cols, cols))
    elif hf_name in ("model.embed_tokens.weight", "lm_head.weight"):
        lo = j * vllm_vocab_rows(arch, r)
        real = max(0, min(dst.shape[0], arch.vocab_size - lo))
        dst[:real].copy_(tensor[lo : lo + real])
        dst[real:].zero_()
    else:
        dst.copy_(tensor)


def fill_inplace(copy, model, arch, pg, destinations: Mapping[str, torch.Tensor]) -> None:
    """The in-place sync as `WeightSync.push` runs it (`copy`: an `InplaceCopy` of the plan for this rank)."""
    from megatron_rlvr.sync.transfer import local_shards

    rank = pg.tp.rank()
    copy(lambda: destinations, lambda: {name: {rank: t} for name, t in local_shards(model, arch, pg).items()})


def fill_old_path(model, arch, pg, destinations: Mapping[str, torch.Tensor], rollout_tp: int, rank: int) -> None:
    """megatron -> HF tensors (`to_hf`) -> vLLM's loader-style narrow/copy; training TP 1."""
    from megatron_rlvr.sync.transfer import local_shards, to_hf

    for name, tensor in local_shards(model, arch, pg).items():
        for hf_name, hf in to_hf(name, [tensor], arch).items():
            loader_copy(destinations, hf_name, hf, arch, rollout_tp, rank)


def hbm_bytes_per_s() -> float | None:
    """Physical memory bandwidth of the current GPU, read + write (2 x memory clock x bus width), from NVML."""
    try:
        import pynvml

        pynvml.nvmlInit()
        handle = pynvml.nvmlDeviceGetHandleByIndex(torch.cuda.current_device())
        bus_bits = pynvml.nvmlDeviceGetMemoryBusWidth(handle)
        clock_mhz = pynvml.nvmlDeviceGetMaxClockInfo(handle, pynvml.NVML_CLOCK_MEM)
    except Exception:  # noqa: BLE001 - no NVML (CPU, or a driver without it): the figure is context only
        return None
    return 2 * clock_mhz * 1e6 * bus_bits / 8


def build_source(arch, dtype: torch.dtype, pg) -> torch.nn.Module:
    """The trainer's policy at training TP 1 on this platform's device, randomly initialised."""
    from megatron_rlvr.models.llama import build_llama, transformer_config

    return build_llama(arch, transformer_config(arch, tp=1, params_dtype=dtype), pg, pad_vocab_multiple=128)


def measure(model, arch, pg, *, rollout_tp: int, rollout_rank: int, repeats: int) -> dict:
    """Allocate the destination and time the three copies from `model` (module docstring); returns the report."""
    from megatron_rlvr.platform import current_platform
    from megatron_rlvr.sync.vllm_layout import InplaceCopy, plan_inplace

    platform = current_platform()
    device = platform.device()
    dtype = next(model.parameters()).dtype
    destinations = vllm_destinations(arch, rollout_tp, dtype, device)
    copy = InplaceCopy(plan_inplace(arch, train_tp=1, train_vocab=model.vocab_size, rollout_tp=rollout_tp,
                                    rollout_rank=rollout_rank))
    nbytes = copy.nbytes(destinations)
    flat_src = torch.ones(nbytes // dtype.itemsize, dtype=dtype, device=device)
    flat_dst = torch.empty_like(flat_src)
    runs = {
        "device_copy": lambda: flat_dst.copy_(flat_src),
        "inplace": lambda: fill_inplace(copy, model, arch, pg, destinations),
        "old_path": lambda: fill_old_path(model, arch, pg, destinations, rollout_tp, rollout_rank),
    }
    times: dict[str, list[float]] = {key: [] for key in runs}
    for repeat in range(repeats + 1):  # the first round warms up (allocator, bound views) and is not counted
        for key, fn in runs.items():
            platform.synchronize()
            start = time.perf_counter()
            fn()
            platform.synchronize()
            if repeat:
                times[key].append(time.perf_counter() - start)
    seconds = {key: statistics.median(values) for key, values in times.items()}
    rate = {key: nbytes / s / 1e9 for key, s in seconds.items()}
    hbm = hbm_bytes_per_s() if device.type == "cuda" else None
    return {
        "params": arch.num_parameters(), "dtype": str(dtype).replace("torch.", ""), "rollout_tp": rollout_tp,
        "rollout_rank": rollout_rank, "bytes": nbytes, "copies": len(copy.regions), "repeats": repeats,
        "seconds": seconds, "GB/s": rate,
        "inplace_over_device_copy": rate["inplace"] / rate["device_copy"],
        "old_path_over_device_copy": rate["old_path"] / rate["device_copy"],
        "hbm_GB/s": hbm / 1e9 if hbm else None,
        "device": torch.cuda.get_device_name() if device.type == "cuda" else "cpu",
    }


def run(args: argparse.Namespace) -> int:
    from megatron_rlvr.benchmarks.train import SIZES
    from megatron_rlvr.models.llama import LlamaArch
    from megatron_rlvr.parallel.state import init_distributed, init_model_parallel
    from megatron_rlvr.platform import current_platform

    for key, value in (("MASTER_ADDR", "127.0.0.1"), ("MASTER_PORT", "29562"), ("RANK", "0"), ("WORLD_SIZE", "1")):
        os.environ.setdefault(key, value)
    init_distributed()
    on_gpu = current_platform().device_type == "cuda"
    size = args.size or ("8b" if on_gpu else "tiny")
    dtype = {"bf16": torch.bfloat16, "fp32": torch.float32}[args.dtype or ("bf16" if on_gpu else "fp32")]
    hidden, layers, heads, kv, ffn, vocab = SIZES[size]
    arch = LlamaArch(vocab_size=vocab, hidden_size=hidden, num_layers=layers, num_heads=heads, num_kv_heads=kv,
                     ffn_hidden_size=ffn, head_dim=hidden // heads)
    pg = init_model_parallel(1, 1)
    report = {"size": size, **measure(build_source(arch, dtype, pg), arch, pg, rollout_tp=args.rollout_tp,
                                      rollout_rank=args.rollout_rank, repeats=args.repeats)}
    if args.json:
        print(json.dumps(report, indent=2))
        return 0
    print(f"sync-inplace: Llama {size} ({report['params'] / 1e9:.2f}B params, {report['dtype']}), training TP 1 -> "
          f"vLLM TP {args.rollout_tp} rank {args.rollout_rank}: {report['bytes'] / 1e9:.2f} GB into vLLM's layout "
          f"in {report['copies']} copies, median of {args.repeats} ({report['device']})")
    print(f"{'':<12} {'seconds':>9} {'GB/s':>8} {'x device copy':>14}")
    for key in ("device_copy", "inplace", "old_path"):
        print(f"{key:<12} {report['seconds'][key]:>9.5f} {report['GB/s'][key]:>8.1f} "
              f"{report['GB/s'][key] / report['GB/s']['device_copy']:>14.3f}")
    if report["hbm_GB/s"]:
        print(f"HBM (NVML, read + write): {report['hbm_GB/s']:.0f} GB/s, so a copy is bound by "
              f"{report['hbm_GB/s'] / 2:.0f} GB/s")
    return 0
