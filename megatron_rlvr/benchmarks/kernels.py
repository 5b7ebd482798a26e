"""`megatron-rlvr bench kernels`: fused token log-probs (and the fused linear variant) against baselines.

For each `--tokens` size T (vocab V, hidden H, `--dtype`) it times forward and forward+backward (with a
per-token upstream gradient) and measures peak extra memory of:

- ours: `token_logprobs` (with and without entropy) on `[T, V]` logits;
- torch: fp32 upcast + `log_softmax` + `gather`, eager and under `torch.compile`;
- megatron-core `tensor_parallel.vocab_parallel_cross_entropy` on a 1-rank TP group;
- Liger-Kernel's cross entropy (reduction "none"), if importable;

and, from hidden states `[T, H]` and an output weight `[V, H]`: our `linear_token_logprobs`, torch
(matmul + the torch path above) and Liger's fused linear cross entropy, if importable.

Floors, from ceilings measured in the same run: the logits ops must at least read the logits once forward
(`T V b` bytes) and read them again and write their gradient backward (`3 T V b` for forward+backward),
at the bandwidth of a large device copy (bytes read + written over its time). The linear ops must at least
do their matmuls: `2 T V H` flops forward, `6 T V H` forward+backward, at the rate measured for the
forward matmul itself. Every baseline runs in its own try/except and is reported as skipped with the
reason when it cannot run. Liger's kernels compute the gradient during the forward, so their forward
column includes backward work, and they take only a scalar upstream gradient.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import statistics
import time
from dataclasses import asdict, dataclass, field
from typing import Callable

import torch

DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}
# Defaults per device: the target sizes on a GPU, a smoke-test size on CPU.
DEFAULT_SIZES = {"cuda": {"tokens": [16384, 4096], "vocab": 128256, "hidden": 4096, "iters": 10},
                 "cpu": {"tokens": [256], "vocab": 4096, "hidden": 256, "iters": 3}}


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--tokens", type=int, nargs="+", default=None,
                        help="token counts T to run (default: 16384 4096 on CUDA, 256 on CPU)")
    parser.add_argument("--vocab", type=int, default=None, help="vocab size V (default: 128256 on CUDA, 4096 on CPU)")
    parser.add_argument("--hidden", type=int, default=None,
                        help="hidden size H of the fused linear variant (default: 4096 on CUDA, 256 on CPU)")
    parser.add_argument("--dtype", choices=sorted(DTYPES), default="bf16", help="logits / hidden dtype")
    parser.add_argument("--iters", type=int, default=None, help="timed iterations, median reported (default: 10 / 3)")
    parser.add_argument("--warmup", type=int, default=2, help="untimed iterations before timing")
    parser.add_argument("--device", choices=["auto", "cuda", "cpu"], default="auto")
    parser.add_argument("--skip", nargs="*", default=[], metavar="NAME",
                        help="cases to leave out, by name or prefix (e.g. torch.compile liger linear)")
    parser.add_argument("--json", metavar="PATH", help="also write all results as JSON to PATH")


@dataclass
class Result:
    case: str
    kind: str  # "logits" or "linear"
    tokens: int
    fwd_ms: float | None = None
    fwdbwd_ms: float | None = None
    fwd_x_floor: float | None = None
    fwdbwd_x_floor: float | None = None
    fwd_rate: float | None = None  # GB/s (logits) or TFLOP/s (linear)
    fwdbwd_rate: float | None = None
    peak_mib: float | None = None
    max_abs_err: float | None = None  # log-probs vs the torch fp32 path
    skipped: str | None = None
    notes: list[str] = field(default_factory=list)


class Timer:
    """Median time of a callable: CUDA events on a GPU, perf_counter on CPU.

    On a GPU the iterations are queued back to back and synchronised once at the end, so host-side launch
    overhead overlaps device work as it does in a training step; `setup` (e.g. fresh input copies) runs
    between iterations, outside the timed events.
    """

    def __init__(self, device: torch.device, iters: int, warmup: int):
        self.device, self.iters, self.warmup = device, iters, warmup

    def __call__(self, fn: Callable[[], object], setup: Callable[[], None] | None = None) -> float:
        if self.device.type != "cuda":
            times = []
            for i in range(self.warmup + self.iters):
                if setup is not None:
                    setup()
                t0 = time.perf_counter()
                fn()
                if i >= self.warmup:
                    times.append((time.perf_counter() - t0) * 1e3)
            return statistics.median(times)
        for _ in range(self.warmup):
            if setup is not None:
                setup()
            fn()
        events = [(torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True))
                  for _ in range(self.iters)]
        for start, end in events:
            if setup is not None:
                setup()
            start.record()
            fn()
            end.record()
        torch.cuda.synchronize()
        return statistics.median(start.elapsed_time(end) for start, end in events)

    def peak_mib(self, fn: Callable[[], object], setup: Callable[[], None] | None = None) -> float | None:
        """Peak memory allocated by one call beyond what was allocated before it (None on CPU)."""
        if self.device.type != "cuda":
            return None
        if setup is not None:
            setup()
        torch.cuda.synchronize()
        base = torch.cuda.memory_allocated()
        torch.cuda.reset_peak_memory_stats()
        fn()
        torch.cuda.synchronize()
        return (torch.cuda.max_memory_allocated() - base) / 2**20


def measure_copy_gbps(timer: Timer, nbytes: int, device: torch.device) -> float:
    """Device copy bandwidth, (bytes read + bytes written) / time, on a buffer of up to 2 GiB."""
    n = max(min(nbytes, 2 * 2**30) // 4, 1)
    src = torch.empty(n, dtype=torch.float32, device=device).uniform_()
    dst = torch.empty_like(src)
    ms = timer(lambda: dst.copy_(src))
    return 2 * n * 4 / (ms * 1e-3) / 1e9


def torch_logprobs(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """The plain baseline: upcast to fp32, log_softmax over the vocab, gather the labels."""
    return torch.log_softmax(logits.float(), dim=-1).gather(-1, labels.unsqueeze(-1)).squeeze(-1)


@contextlib.contextmanager
def megatron_tp1(device: torch.device):
    """A 1-rank torch.distributed world and megatron-core parallel state, torn down afterwards."""
    import torch.distributed as dist
    from megatron.core import parallel_state

    from megatron_rlvr.testing.distributed import free_port

    created = not dist.is_initialized()
    if created:
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo",
                                init_method=f"tcp://127.0.0.1:{free_port()}", rank=0, world_size=1)
    parallel_state.initialize_model_parallel(1, 1)
    try:
        yield
    finally:
        parallel_state.destroy_model_parallel()
        if created:
            dist.destroy_process_group()


def _liger(name: str):
    from liger_kernel.transformers import functional

    fn = getattr(functional, name)

    def call(*args, **kwargs):
        out = fn(*args, reduction="none", **kwargs)
        return out[0] if isinstance(out, tuple) else out

    return call


class Bench:
    def __init__(self, args: argparse.Namespace, device: torch.device):
        defaults = DEFAULT_SIZES[device.type]
        self.device = device
        self.dtype = DTYPES[args.dtype]
        self.vocab = args.vocab or defaults["vocab"]
        self.hidden = args.hidden or defaults["hidden"]
        self.token_sizes = args.tokens or defaults["tokens"]
        self.skip = args.skip
        self.timer = Timer(device, args.iters or defaults["iters"], args.warmup)
        self.results: list[Result] = []
        itemsize = torch.empty((), dtype=self.dtype).element_size()
        self.copy_gbps = measure_copy_gbps(self.timer, max(self.token_sizes) * self.vocab * itemsize, device)
        self.matmul_tflops: dict[int, float] = {}

    def skipped(self, name: str) -> bool:
        return any(name == s or name.startswith(s) for s in self.skip)

    def run_case(self, name: str, kind: str, tokens: int, inputs: dict, forward: Callable,
                 reference: torch.Tensor, floor_fwd: float, floor_fwdbwd: float, rate_unit: float,
                 notes: tuple[str, ...] = (), fresh_inputs: bool = False) -> None:
        """Time `forward(**inputs)` and forward + backward with a per-token upstream gradient.

        `forward` returns the log-probs (compared with `reference`) or a tuple starting with them; backward
        runs from every output.

        `rate_unit` is the work of one forward (bytes or flops, backward counted as in the floors);
        `fresh_inputs` re-clones the float inputs before each call (for kernels that overwrite them).
        """
        result = Result(name, kind, tokens, notes=list(notes))
        self.results.append(result)
        if self.skipped(name) or self.skipped(kind):
            result.skipped = "--skip"
            return
        leaves = {k: v for k, v in inputs.items() if v.is_floating_point()}
        originals = {k: v.detach() for k, v in leaves.items()}
        current = dict(inputs)

        def reset(requires_grad: bool):
            """Fresh leaves (no accumulated .grad); new copies only for kernels that overwrite inputs."""
            for key, value in originals.items():
                tensor = value.clone() if fresh_inputs else value
                current[key] = tensor.detach().requires_grad_(requires_grad)

        def clear_grads():
            for key in originals:
                current[key].grad = None

        try:
            reset(False)
            with torch.no_grad():
                out = _as_tuple(forward(**current))
                result.max_abs_err = (out[0].float() - reference).abs().max().item()
            setup = (lambda: reset(False)) if fresh_inputs else None
            result.fwd_ms = self.timer(lambda: forward(**current), setup=setup)
        except Exception as err:  # noqa: BLE001 - a baseline that cannot run is reported, not fatal
            result.skipped = _reason(err)
            return
        try:
            grads = [torch.randn(o.shape, device=self.device, dtype=o.dtype) for o in out]
            fwdbwd = lambda: torch.autograd.backward(_as_tuple(forward(**current)), grads)  # noqa: E731
            reset(True)
            setup = (lambda: reset(True)) if fresh_inputs else clear_grads
            result.fwdbwd_ms = self.timer(fwdbwd, setup=setup)
            result.peak_mib = self.timer.peak_mib(fwdbwd, setup=setup)
        except Exception as err:  # noqa: BLE001
            result.notes.append(f"fwd+bwd skipped: {_reason(err)}")
        finally:
            current.clear()
        scale = 1e9 if kind == "logits" else 1e12
        result.fwd_x_floor = result.fwd_ms / floor_fwd
        result.fwd_rate = rate_unit / (result.fwd_ms * 1e-3) / scale
        if result.fwdbwd_ms is not None:
            result.fwdbwd_x_floor = result.fwdbwd_ms / floor_fwdbwd
            result.fwdbwd_rate = 3 * rate_unit / (result.fwdbwd_ms * 1e-3) / scale

    def logits_cases(self, tokens: int) -> None:
        from megatron_rlvr.kernels import token_logprobs
        from megatron_rlvr.kernels.backend import backend_name

        gen = torch.Generator(device=self.device).manual_seed(tokens)
        logits = (torch.randn(tokens, self.vocab, device=self.device, generator=gen) * 2).to(self.dtype)
        labels = torch.randint(0, self.vocab, (tokens,), device=self.device, generator=gen)
        with torch.no_grad():
            reference = torch_logprobs(logits, labels)
        nbytes = tokens * self.vocab * logits.element_size()
        floor_ms = nbytes / (self.copy_gbps * 1e9) * 1e3
        common = dict(kind="logits", tokens=tokens, reference=reference, floor_fwd=floor_ms,
                      floor_fwdbwd=3 * floor_ms, rate_unit=nbytes)
        ours = f"ours token_logprobs [{backend_name(logits)}]"
        inputs = {"logits": logits, "labels": labels}
        self.run_case(ours, forward=lambda logits, labels: token_logprobs(logits, labels), inputs=inputs, **common)
        self.run_case(ours + " +entropy", inputs=inputs, **common,
                      forward=lambda logits, labels: token_logprobs(logits, labels, return_entropy=True))
        self.run_case("torch fp32 log_softmax+gather", forward=torch_logprobs, inputs=inputs, **common)
        try:
            compiled = torch.compile(torch_logprobs)
        except Exception as err:  # noqa: BLE001
            compiled = err
        self.run_case("torch.compile(log_softmax+gather)", inputs=inputs, **common,
                      forward=compiled if callable(compiled) else _raiser(compiled))
        self.run_megatron(inputs, common)
        try:
            liger_ce = _liger("liger_cross_entropy")
        except Exception as err:  # noqa: BLE001
            liger_ce = _raiser(err)
        self.run_case("liger cross_entropy", inputs=inputs, fresh_inputs=True, **common,
                      notes=("computes dlogits in forward into its input; scalar upstream grad only",),
                      forward=lambda logits, labels: -liger_ce(logits, labels))

    def run_megatron(self, inputs: dict, common: dict) -> None:
        name = "megatron-core vocab_parallel_cross_entropy"
        if self.skipped(name):
            self.results.append(Result(name, "logits", common["tokens"], skipped="--skip"))
            return
        try:
            from megatron.core.tensor_parallel import vocab_parallel_cross_entropy
            stack = contextlib.ExitStack()
            stack.enter_context(megatron_tp1(self.device))
        except Exception as err:  # noqa: BLE001
            self.run_case(name, inputs=inputs, forward=_raiser(err), **common)
            return

        def forward(logits, labels):
            # It shifts fp32 logits in place: .float() copies bf16, clone() protects fp32 inputs.
            upcast = logits.float() if logits.dtype != torch.float32 else logits.clone()
            return -vocab_parallel_cross_entropy(upcast[:, None], labels[:, None])[:, 0]

        with stack:
            self.run_case(name, inputs=inputs, forward=forward, **common)

    def linear_cases(self, tokens: int) -> None:
        from megatron_rlvr.kernels import linear_token_logprobs

        gen = torch.Generator(device=self.device).manual_seed(tokens + 1)
        hidden = torch.randn(tokens, self.hidden, device=self.device, generator=gen).to(self.dtype)
        weight = (torch.randn(self.vocab, self.hidden, device=self.device, generator=gen)
                  * (2.0 / self.hidden**0.5)).to(self.dtype)
        labels = torch.randint(0, self.vocab, (tokens,), device=self.device, generator=gen)
        flops = 2 * tokens * self.vocab * self.hidden
        try:
            matmul_ms = self.timer(lambda: torch.mm(hidden, weight.t()))
        except Exception as err:  # noqa: BLE001
            self.results.append(Result("linear (matmul floor)", "linear", tokens, skipped=_reason(err)))
            return
        self.matmul_tflops[tokens] = flops / (matmul_ms * 1e-3) / 1e12
        with torch.no_grad():
            reference = torch_logprobs(torch.mm(hidden, weight.t()), labels)
        common = dict(kind="linear", tokens=tokens, reference=reference, floor_fwd=matmul_ms,
                      floor_fwdbwd=3 * matmul_ms, rate_unit=flops)
        inputs = {"hidden": hidden, "weight": weight, "labels": labels}
        self.run_case("ours linear_token_logprobs", inputs=inputs, **common,
                      forward=lambda hidden, weight, labels: linear_token_logprobs(hidden, weight, labels))
        self.run_case("torch matmul+fp32 log_softmax+gather", inputs=inputs, **common,
                      forward=lambda hidden, weight, labels: torch_logprobs(hidden @ weight.t(), labels))
        try:
            liger_flce = _liger("liger_fused_linear_cross_entropy")
        except Exception as err:  # noqa: BLE001
            liger_flce = _raiser(err)
        self.run_case("liger fused_linear_cross_entropy", inputs=inputs, **common,
                      notes=("computes grads in forward; scalar upstream grad only",),
                      forward=lambda hidden, weight, labels: -liger_flce(hidden, weight, labels))

    def run(self) -> None:
        for tokens in self.token_sizes:
            self.logits_cases(tokens)
            if not self.skipped("linear"):
                self.linear_cases(tokens)
            if self.device.type == "cuda":
                torch.cuda.empty_cache()


def _as_tuple(out) -> tuple:
    return out if isinstance(out, tuple) else (out,)


def _reason(err: Exception) -> str:
    message = str(err).splitlines()[0][:160] if str(err) else ""
    return f"{type(err).__name__}: {message}"


def _raiser(err: Exception) -> Callable:
    def raise_it(*_args, **_kwargs):
        raise err

    return raise_it


def _fmt(value: float | None, digits: int = 2) -> str:
    return "-" if value is None else f"{value:.{digits}f}"


def print_table(bench: Bench) -> None:
    print(f"device: {_device_name(bench.device)}; dtype {bench.dtype}; V={bench.vocab}, H={bench.hidden}; "
          f"copy bandwidth {bench.copy_gbps:.0f} GB/s (read+write)")
    print("logits floors: fwd = T*V*bytes / bandwidth, fwd+bwd = 3*T*V*bytes / bandwidth; "
          "linear floors: fwd = 2*T*V*H / matmul rate, fwd+bwd = 6*T*V*H / matmul rate")
    header = (f"{'case':<52} {'T':>6} {'fwd ms':>9} {'x floor':>7} {'rate':>8} {'f+b ms':>9} {'x floor':>7} "
              f"{'rate':>8} {'peak MiB':>9} {'err':>8}")
    for kind, unit in (("logits", "GB/s"), ("linear", "TFLOP/s")):
        rows = [r for r in bench.results if r.kind == kind]
        if not rows:
            continue
        rates = "" if kind == "logits" else "; matmul " + ", ".join(
            f"T={t}: {r:.0f} TFLOP/s" for t, r in bench.matmul_tflops.items())
        print(f"\n[{kind}] rate in {unit}{rates}")
        print(header)
        for r in rows:
            if r.skipped:
                print(f"{r.case:<52} {r.tokens:>6} skipped: {r.skipped}")
                continue
            print(f"{r.case:<52} {r.tokens:>6} {_fmt(r.fwd_ms, 3):>9} {_fmt(r.fwd_x_floor):>7} "
                  f"{_fmt(r.fwd_rate, 1):>8} {_fmt(r.fwdbwd_ms, 3):>9} {_fmt(r.fwdbwd_x_floor):>7} "
                  f"{_fmt(r.fwdbwd_rate, 1):>8} {_fmt(r.peak_mib, 0):>9} "
                  f"{'-' if r.max_abs_err is None else f'{r.max_abs_err:.1e}':>8}"
                  + (f"  ({'; '.join(r.notes)})" if r.notes else ""))


def _device_name(device: torch.device) -> str:
    return torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"


def run(args: argparse.Namespace) -> int:
    if args.device == "auto":
        device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    else:
        device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        print("bench kernels: --device cuda but no CUDA device is visible; use --device cpu")
        return 2
    bench = Bench(args, device)
    bench.run()
    print_table(bench)
    if args.json:
        payload = {
            "device": _device_name(device),
            "dtype": args.dtype,
            "vocab": bench.vocab,
            "hidden": bench.hidden,
            "copy_bandwidth_gbps": bench.copy_gbps,
            "matmul_tflops": bench.matmul_tflops,
            "torch": torch.__version__,
            "results": [asdict(r) for r in bench.results],
        }
        with open(args.json, "w") as f:
            json.dump(payload, f, indent=2)
        print(f"\nwrote {args.json}")
    return 0
