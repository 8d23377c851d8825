"""The one process-group bring-up: the default group (``init_distributed``, which DeepSpeed adopts), megatron-core's
TP/PP/DP groups (``init_process_groups``), their collective timeouts, and teardown. Training, inference,
fine-tuning, the benchmarks and the test helpers all start their processes' groups here.

Works from the launcher's environment (torchrun, or srun through slurm_env) or, without one, as a group of one.
"""

from __future__ import annotations

import datetime
import math
import os
import random
import socket

from typing import TYPE_CHECKING

import torch
import torch.distributed as dist

if TYPE_CHECKING:  # megatron-core loads in seconds: the watchdog and the launcher need none of it
    from pretrain.parallel.dims import ParallelDims


def free_port(count: int = 1, host: str = "127.0.0.1") -> int:
    """A TCP port on ``host`` that is free now, with the ``count - 1`` ports after it free too (a rank's Prometheus
    exporter listens on port + LOCAL_RANK).

    Drawn at random from below the kernel's ephemeral range: a port from inside it (what binding port 0 gives) can
    be taken, before its user binds it, by any outgoing connection on the machine, and gloo opens hundreds of them
    (parallel test workers met EADDRINUSE that way). Below the range only another explicit bind can take it."""
    low, _ = _ephemeral_port_range()
    rng = random.Random()  # not the global generator: training seeds it, so every process would draw the same port
    for _ in range(200):
        base = rng.randrange(max(1024, low - 12000), low - count)
        if all(_bindable(host, base + i) for i in range(count)):
            return base
    raise RuntimeError(f"no {count} consecutive free ports on {host} below the ephemeral range")


def _bindable(host: str, port: int) -> bool:
    with socket.socket() as s:
        try:
            s.bind((host, port))
            return True
        except OSError:
            return False


def _ephemeral_port_range() -> tuple[int, int]:
    """The kernel's range for outgoing connections' local ports (Linux's default where /proc does not say)."""
    try:
        with open("/proc/sys/net/ipv4/ip_local_port_range") as f:
            low, high = f.read().split()
        return int(low), int(high)
    except (OSError, ValueError):
        return 32768, 60999


def init_distributed(backend: str, timeout_s: float | None = None, single_process: bool = False) -> None:
    """The default process group from the launcher's environment (RANK, WORLD_SIZE, MASTER_ADDR/PORT), or, when there
    is none or ``single_process`` is set, a one-process group of our own on a free port (the launcher's variables are
    left as they are, so no stale RANK or MASTER_PORT leaks into processes started later); then DeepSpeed adopts
    it. ``timeout_s``: its collective timeout (None: torch's default for the backend). Call
    ``pretrain.device.apply_cpu_shims()`` first on CPU."""
    kwargs = {"timeout": datetime.timedelta(seconds=timeout_s)} if timeout_s else {}
    if single_process or "RANK" not in os.environ:
        kwargs.update(init_method=f"tcp://127.0.0.1:{free_port()}", rank=0, world_size=1)
        os.environ.setdefault("LOCAL_RANK", "0")  # DeepSpeed's engine reads it (and only it) from the environment
    dist.init_process_group(backend=backend, **kwargs)
    import deepspeed  # after the device layer chose DeepSpeed's accelerator

    deepspeed.init_distributed(dist_backend=backend, auto_mpi_discovery=False)  # adopts the existing group


def init_process_groups(dims: ParallelDims, seed: int, timeout_s: float | None = None) -> None:
    """megatron-core's TP/PP/DP groups on the default process group, then its per-TP-rank RNG streams.
    ``timeout_s``: the groups' collective timeout (fault_tolerance.startup_collective_timeout_s); None: 30 min,
    megatron-core's default."""
    from megatron.core import parallel_state
    from megatron.core.tensor_parallel.random import model_parallel_cuda_manual_seed

    assert dist.is_initialized() and dist.get_world_size() == dims.world_size
    parallel_state.initialize_model_parallel(
        tensor_model_parallel_size=dims.tensor, pipeline_model_parallel_size=dims.pipeline,
        virtual_pipeline_model_parallel_size=dims.virtual_pipeline if dims.virtual_pipeline > 1 else None,
        distributed_timeout_minutes=math.ceil(timeout_s / 60) if timeout_s else 30)
    # Same seed on every rank for init of replicated weights; megatron-core offsets the TP stream per TP rank.
    torch.manual_seed(seed)
    model_parallel_cuda_manual_seed(seed)


def shutdown() -> None:
    """Tear down megatron-core's groups and the default group (without it gloo occasionally aborts at exit)."""
    from megatron.core import parallel_state

    parallel_state.destroy_model_parallel()
    if dist.is_initialized():
        dist.destroy_process_group()


def _group_timeout(group) -> datetime.timedelta | None:
    """The shortest collective timeout among a process group's backends, or None where torch does not say."""
    found = []
    for device in getattr(group, "_device_types", []):
        options = getattr(group._get_backend(device), "options", None)
        if getattr(options, "_timeout", None) is not None:
            found.append(options._timeout)
    return min(found) if found else None


def set_collective_timeouts(seconds: float, only_lower: bool = False) -> int:
    """Set the collective timeout of every process group this rank belongs to (the default group, megatron-core's
    and DeepSpeed's, whichever library created them) to ``seconds``; with ``only_lower`` never raise one. Returns
    how many groups changed. Uses torch's private ``_set_pg_timeout`` (torch 2.13); without it, nothing changes.
    """
    from torch.distributed import distributed_c10d as c10d

    set_timeout = getattr(c10d, "_set_pg_timeout", None)
    if set_timeout is None or not dist.is_initialized():
        return 0
    bound = datetime.timedelta(seconds=seconds)
    changed = 0
    for group in list(c10d._world.pg_map):
        current = _group_timeout(group)
        if current != bound and not (only_lower and current is not None and current <= bound):
            set_timeout(bound, group)
            changed += 1
    return changed


def tighten_collective_timeouts(seconds: float) -> int:
    """Lower every process group's collective timeout to ``seconds`` (never raise one): after the first step a
    collective stuck on a dead or hung peer should fail within the run's own bound (on NCCL its watchdog then
    aborts the communicator), not the startup bound that covered resume and warm-up."""
    return set_collective_timeouts(seconds, only_lower=True)
