"""The multi-process test helper itself: ranks, a real gloo collective, and failures surfacing with tracebacks."""

from __future__ import annotations

import pytest
import torch
import torch.distributed as dist

from pretrain.testing import run_distributed


def _all_reduce_rank() -> tuple[int, int, float]:
    t = torch.tensor([float(dist.get_rank() + 1)])
    dist.all_reduce(t)
    return dist.get_rank(), dist.get_world_size(), t.item()


def _fail_on_rank_one() -> None:
    if dist.get_rank() == 1:
        raise ValueError("boom on rank one")


def test_ranks_and_collective():
    assert run_distributed(_all_reduce_rank, world_size=3) == [(0, 3, 6.0), (1, 3, 6.0), (2, 3, 6.0)]


def test_failure_names_rank_and_error():
    with pytest.raises(RuntimeError, match=r"(?s)rank 1 of 2 failed.*boom on rank one"):
        run_distributed(_fail_on_rank_one, world_size=2, timeout_s=60)
