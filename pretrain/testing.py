"""Test helpers that ship with the package: multi-process runs on gloo, as OLMo-core's run_distributed_test."""

from __future__ import annotations

import os
import queue
import time
import traceback
from typing import Any, Callable

import torch.multiprocessing as mp

from pretrain.parallel.env import free_port, init_distributed


def _worker(rank: int, world_size: int, port: int, backend: str, fn: Callable, args: tuple, results) -> None:
    import torch
    import torch.distributed as dist

    from pretrain import device

    if world_size > 1 and "OMP_NUM_THREADS" not in os.environ:
        torch.set_num_threads(1)  # as torchrun does for several local processes: no oversubscribed cores
    os.environ.update(RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE=str(world_size),
                      MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    try:
        device.apply_cpu_shims()
        init_distributed(backend)  # the bring-up `pretrain train` uses (DeepSpeed adopts the group)
        results.put((rank, True, fn(*args)))
    except BaseException:  # report every failure, including SystemExit from CLI code, to the parent
        results.put((rank, False, traceback.format_exc()))
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()


def run_distributed(fn: Callable, world_size: int, backend: str = "gloo", args: tuple = (),
                    timeout_s: float = 600) -> list[Any]:
    """Run ``fn(*args)`` on ``world_size`` spawned processes sharing one process group.

    Each process gets RANK/LOCAL_RANK/WORLD_SIZE/MASTER_* set, the CPU shims applied and the default group
    initialised by pretrain.parallel.env.init_distributed, as in training. Returns the per-rank return values
    (rank order); raises with the failing rank's traceback.
    ``fn`` must be importable by name (module level), since processes are spawned.
    """
    ctx = mp.get_context("spawn")
    results = ctx.Queue()
    port = free_port()
    procs = [ctx.Process(target=_worker, args=(r, world_size, port, backend, fn, args, results))
             for r in range(world_size)]
    for p in procs:
        p.start()
    outcomes: dict[int, tuple[bool, Any]] = {}
    deadline = time.monotonic() + timeout_s
    # Read before joining: a child blocks on exit until the parent drains what it put in the queue.
    while len(outcomes) < world_size and time.monotonic() < deadline:
        try:
            rank, ok, value = results.get(timeout=1.0)
            outcomes[rank] = (ok, value)
        except queue.Empty:
            if not any(p.is_alive() for p in procs) and results.empty():
                break  # every process is gone; whoever did not report crashed
            if any(not ok for ok, _ in outcomes.values()):
                break  # a rank failed; the others may be stuck in a collective waiting for it
    for p in procs:
        p.join(1.0)
        if p.is_alive():
            p.kill()
    failed = {r: v for r, (ok, v) in outcomes.items() if not ok}
    if failed:
        rank = min(failed)
        raise RuntimeError(f"rank {rank} of {world_size} failed:\n{failed[rank]}")
    missing = [r for r in range(world_size) if r not in outcomes]
    if missing:
        raise RuntimeError(f"ranks {missing} of {world_size} returned nothing (crashed or timed out "
                           f"after {timeout_s} s)")
    return [outcomes[r][1] for r in range(world_size)]
