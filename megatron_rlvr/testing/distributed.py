"""Run a function on N real processes joined in one gloo `torch.distributed` world.

Used by the multi-rank tests: `run_workers(fn, world_size, *args)` spawns `world_size` processes, each of
which initialises the process group from the usual torchrun environment variables, calls
`fn(rank, world_size, *args)` and sends back its return value. A failure on any rank kills the others and
re-raises with that rank's traceback, so a hung collective never stalls the suite past `timeout`.
"""

from __future__ import annotations

import os
import pickle
import socket
import traceback
from typing import Any, Callable

import torch.multiprocessing as mp


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _worker(fn, rank, world_size, port, env, args, queue):
    os.environ.update(env)
    os.environ.update(
        MASTER_ADDR="127.0.0.1",
        MASTER_PORT=str(port),
        RANK=str(rank),
        LOCAL_RANK=str(rank),
        WORLD_SIZE=str(world_size),
        LOCAL_WORLD_SIZE=str(world_size),
    )
    import torch
    import torch.distributed as dist

    torch.set_num_threads(1)
    try:
        dist.init_process_group("gloo", rank=rank, world_size=world_size)
        result = fn(rank, world_size, *args)
        # plain pickle copies tensors by value; the queue's own pickler would share their memory, which
        # vanishes when this process exits before the parent has read it
        queue.put((rank, True, pickle.dumps(result)))
    except BaseException:  # noqa: BLE001 - the traceback travels to the parent
        queue.put((rank, False, traceback.format_exc()))
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()


def run_workers(
    fn: Callable[..., Any],
    world_size: int,
    *args: Any,
    timeout: float = 600.0,
    env: dict[str, str] | None = None,
) -> list[Any]:
    """Run `fn(rank, world_size, *args)` on `world_size` spawned processes; return results ordered by rank.

    `fn` must be importable at module level (spawn pickles it by name). `env` is added to each child's
    environment before anything is imported there.
    """
    ctx = mp.get_context("spawn")
    queue = ctx.Queue()
    port = free_port()
    procs = [
        ctx.Process(target=_worker, args=(fn, rank, world_size, port, dict(env or {}), args, queue))
        for rank in range(world_size)
    ]
    for proc in procs:
        proc.start()
    results: dict[int, Any] = {}
    try:
        for _ in range(world_size):
            try:
                rank, ok, payload = queue.get(timeout=timeout)
            except Exception as err:  # queue.Empty
                raise TimeoutError(
                    f"{fn.__name__}: ranks {sorted(set(range(world_size)) - set(results))} did not finish "
                    f"within {timeout:.0f} s (a hung collective?)"
                ) from err
            if not ok:
                raise RuntimeError(f"{fn.__name__} failed on rank {rank}:\n{payload}")
            results[rank] = pickle.loads(payload)
    finally:
        for proc in procs:
            proc.join(timeout=30 if len(results) == world_size else 1)
            if proc.is_alive():
                proc.kill()
                proc.join()
    return [results[rank] for rank in range(world_size)]
