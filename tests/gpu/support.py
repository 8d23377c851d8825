"""Where the GPU tests run: on CUDA (scripts/gpu_check.sh on a GPU machine), or on CPU in that script's dry run.

On CPU machines (CI) they are skipped, like every test marked ``gpu``. ``scripts/gpu_check.sh --cpu-dry-run`` sets
PRETRAIN_GPU_CHECK_CPU=1, and then the tests that use :data:`cuda_or_dry_run` run on CPU at the same tiny sizes
and with the same assertions (bf16 there too, which CPU torch and DeepSpeed support): the check's orchestration
and the tests' own code are proven before a GPU is spent on them. Tests that only mean something on a GPU (the
Transformer Engine ones) keep a plain CUDA skip.
"""

from __future__ import annotations

import os
import re

import pytest
import torch

ON_CUDA = torch.cuda.is_available()
CPU_DRY_RUN = not ON_CUDA and os.environ.get("PRETRAIN_GPU_CHECK_CPU") == "1"
DEVICE = "cuda" if ON_CUDA else "cpu"

cuda_or_dry_run = pytest.mark.skipif(
    not (ON_CUDA or CPU_DRY_RUN),
    reason="needs a CUDA device (PRETRAIN_GPU_CHECK_CPU=1 runs it on CPU: scripts/gpu_check.sh --cpu-dry-run)")


def trained_on_device_in_bf16(stderr: str) -> bool:
    """The run's start line (logged on stderr) says ``device cuda:0 bfloat16`` (``device cpu bfloat16`` in the dry
    run)."""
    return re.search(rf"\bdevice {DEVICE}(:\d+)? bfloat16\b", stderr) is not None
