"""`megatron-rlvr bench partition`: balanced partitioning of a rollout batch, C++ against Python.

One run draws a synthetic rollout batch (long-tailed lengths: lognormal, capped at the response budget),
splits it over data-parallel ranks with each method and backend, and prints beside each other: the wall time
of the C++ extension and of the pure-Python twin (median of --repeats), whether both returned the same
partition, and the balance reached (max rank tokens / mean rank tokens) next to naive round robin.
"""

from __future__ import annotations

import argparse
import json
import random
import statistics
import time

from megatron_rlvr.data import partition as P


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--sequences", type=int, default=65536, help="rollout batch size (default 65536)")
    parser.add_argument("--ranks", type=int, default=240, help="data-parallel ranks (parts, default 240)")
    parser.add_argument("--max-len", type=int, default=4096, help="length cap in tokens (default 4096)")
    parser.add_argument("--quadratic", type=float, default=0.0,
                        help="attention term of the cost model w = n + q n^2 (default 0: tokens)")
    parser.add_argument("--equal-size", action="store_true",
                        help="same number of sequences per rank (the batch is cut to a multiple of --ranks)")
    parser.add_argument("--methods", default="kk,greedy", help="comma-separated methods (default kk,greedy)")
    parser.add_argument("--repeats", type=int, default=3, help="timed repeats per backend (default 3)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--json", action="store_true", help="print one JSON object instead of a table")


def _rollout_lengths(count: int, cap: int, seed: int) -> list[int]:
    rng = random.Random(seed)
    return [min(cap, max(1, int(rng.lognormvariate(6.3, 0.9)))) for _ in range(count)]


def _time(fn, repeats: int):
    times, result = [], None
    for _ in range(repeats):
        start = time.perf_counter()
        result = fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times), result


def run(args: argparse.Namespace) -> int:
    count = args.sequences - (args.sequences % args.ranks if args.equal_size else 0)
    lengths = _rollout_lengths(count, args.max_len, args.seed)
    work = P.sequence_work(lengths, args.quadratic)
    baseline = P.imbalance(work, P.round_robin(count, args.ranks))
    rows = []
    for method in [m.strip() for m in args.methods.split(",") if m.strip()]:
        row = {"method": method}
        results = {}
        for backend in ("cpp", "python"):
            if backend == "cpp" and not P.cpp_available():
                row["cpp_s"] = None
                continue
            seconds, parts = _time(
                lambda: P.partition(work, args.ranks, method=method, equal_size=args.equal_size, backend=backend),
                args.repeats,
            )
            row[f"{backend}_s"] = seconds
            results[backend] = parts
        row["speedup"] = row["python_s"] / row["cpp_s"] if row.get("cpp_s") else None
        row["identical"] = results["cpp"] == results["python"] if "cpp" in results else None
        row["max_over_mean"] = P.imbalance(work, results["python"])
        rows.append(row)
    report = {
        "sequences": count, "ranks": args.ranks, "equal_size": args.equal_size, "quadratic": args.quadratic,
        "mean_len": sum(lengths) / count, "max_len": max(lengths), "round_robin_max_over_mean": baseline,
        "cpp_built": P.cpp_available(), "methods": rows,
    }
    if args.json:
        print(json.dumps(report, indent=2))
        return 0
    print(f"partition {count} sequences (mean {report['mean_len']:.0f}, max {report['max_len']} tokens) over "
          f"{args.ranks} ranks, equal_size={args.equal_size}, cost = n + {args.quadratic:g} n^2, "
          f"median of {args.repeats}")
    print(f"{'method':<8} {'C++ s':>9} {'Python s':>9} {'speedup':>8} {'same':>5} {'max/mean':>9} "
          f"{'round robin':>12}")
    for row in rows:
        cpp = f"{row['cpp_s']:.4f}" if row.get("cpp_s") is not None else "not built"
        speedup = f"{row['speedup']:.1f}x" if row["speedup"] else "-"
        same = {True: "yes", False: "NO", None: "-"}[row["identical"]]
        print(f"{row['method']:<8} {cpp:>9} {row['python_s']:>9.4f} {speedup:>8} {same:>5} "
              f"{row['max_over_mean']:>9.5f} {baseline:>12.5f}")
    return 0 if all(row["identical"] is not False for row in rows) else 1
