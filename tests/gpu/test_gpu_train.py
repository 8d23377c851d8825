"""CUDA path: the same CLI in bf16 with NCCL. Skipped on CPU machines (CI); run where a GPU is present."""

from __future__ import annotations

import pytest
import torch

from tests.conftest import TINY_CONFIG, data_overrides, read_metrics, run_cli

pytestmark = [pytest.mark.gpu,
              pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")]


def test_gpu_bf16_training_learns(shakespeare, tmp_path):
    result = run_cli("train", str(TINY_CONFIG), "--train.steps=40", "--train.log_every=1",
                     "--checkpoint.every_steps=0", *data_overrides(shakespeare, tmp_path))
    assert result.returncode == 0, result.stderr[-3000:]
    assert "device cuda" in result.stdout and "bfloat16" in result.stdout
    metrics = read_metrics(tmp_path)
    assert metrics[40]["loss"] < metrics[1]["loss"] - 1.0
