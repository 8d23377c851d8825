"""The one bf16 training run the GPU tests share: the training test judges it, the export test exports it."""

from __future__ import annotations

from pathlib import Path

import pytest

from tests.conftest import TINY_CONFIG, data_overrides, run_cli
from tests.gpu.support import trained_on_device_in_bf16

BF16_STEPS = 40


@pytest.fixture(scope="session")
def bf16_run(shakespeare, tmp_path_factory) -> Path:
    """The run directory of gpt_tiny trained BF16_STEPS steps in bf16 on this device (its start line says so),
    every step logged, its checkpoint at the end."""
    run_dir = tmp_path_factory.mktemp("bf16") / "run"
    trained = run_cli("train", str(TINY_CONFIG), f"--train.steps={BF16_STEPS}", "--train.log_every=1",
                      "--train.precision=bf16", f"--checkpoint.every_steps={BF16_STEPS}",
                      *data_overrides(shakespeare, run_dir))
    assert trained.returncode == 0, trained.stdout[-2000:] + trained.stderr[-3000:]
    assert trained_on_device_in_bf16(trained.stderr), trained.stderr[-2000:]
    return run_dir
