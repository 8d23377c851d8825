"""Unit-test fixtures: a one-process gloo group with megatron-core's parallel state, for tests that build models."""

from __future__ import annotations

import os
import socket

import pytest


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def mcore_world1():
    """World of one (rank 0, gloo), TP=PP=1 megatron-core groups, CPU shims applied, RNG streams seeded with 0.

    Module-scoped: each test module that builds megatron-core models gets its own group and tears it down, so the
    modules do not depend on each other's order. If some other fixture already owns a process group, reuse it.
    """
    import torch
    import torch.distributed as dist
    from megatron.core import parallel_state
    from megatron.core.tensor_parallel.random import model_parallel_cuda_manual_seed

    from pretrain import device

    device.apply_cpu_shims()
    owned = not dist.is_initialized()
    if owned:
        os.environ["MASTER_ADDR"] = "127.0.0.1"
        os.environ["MASTER_PORT"] = str(_free_port())
        dist.init_process_group("gloo", rank=0, world_size=1)
    assert dist.get_world_size() == 1, "these unit tests expect a world of one process"
    parallel_state.initialize_model_parallel(1, 1)
    torch.manual_seed(0)
    model_parallel_cuda_manual_seed(0)
    yield
    parallel_state.destroy_model_parallel()
    if owned:
        dist.destroy_process_group()
