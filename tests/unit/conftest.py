"""Unit-test fixtures: a one-process gloo group with megatron-core's parallel state, for tests that build models."""

from __future__ import annotations


import pytest


@pytest.fixture(scope="module")
def mcore_world1():
    """World of one (rank 0, gloo), TP=PP=1 megatron-core groups, CPU shims applied, RNG streams seeded with 0.

    Module-scoped: each test module that builds megatron-core models gets its own group and tears it down, so the
    modules do not depend on each other's order. If some other fixture already owns a process group, reuse it.
    """
    import torch.distributed as dist
    from megatron.core import parallel_state

    from pretrain import device
    from pretrain.parallel import env
    from pretrain.parallel.dims import ParallelDims

    device.apply_cpu_shims()
    owned = not dist.is_initialized()
    if owned:
        env.init_distributed("gloo", single_process=True)
    assert dist.get_world_size() == 1, "these unit tests expect a world of one process"
    env.init_process_groups(ParallelDims(world_size=1), seed=0)
    yield
    parallel_state.destroy_model_parallel()
    if owned:
        dist.destroy_process_group()
