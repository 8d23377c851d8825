"""`pretrain train` with damaged or unfitting checkpoints: automatic resume falls back, explicit loads refuse."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest

from tests.conftest import TINY_CONFIG, data_overrides, run_cli, train_tiny

RUN_ARGS = ["--train.steps=4", "--train.log_every=1", "--checkpoint.every_steps=2", "--checkpoint.keep_last=0"]


@pytest.fixture(scope="module")
def saved_run(shakespeare, tmp_path_factory) -> Path:
    """gpt_tiny for 4 steps with checkpoints at steps 2 and 4."""
    return train_tiny(shakespeare, tmp_path_factory.mktemp("saved"), *RUN_ARGS)


def _copy(run_dir: Path, tmp_path: Path) -> Path:
    return Path(shutil.copytree(run_dir, tmp_path / "run"))


def _flip_byte(file: Path) -> None:
    data = bytearray(file.read_bytes())
    data[len(data) // 2] ^= 0xFF
    file.write_bytes(bytes(data))


def test_auto_resume_skips_a_truncated_checkpoint(shakespeare, saved_run, tmp_path):
    run_dir = _copy(saved_run, tmp_path)
    shard = run_dir / "checkpoints" / "step_4" / "mp_rank_00_model_states.pt"
    shard.write_bytes(shard.read_bytes()[: shard.stat().st_size // 2])
    result = run_cli("train", str(TINY_CONFIG), *RUN_ARGS, "--train.steps=5",
                     *data_overrides(shakespeare, run_dir))
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    warning = next(line for line in result.stdout.splitlines() if line.startswith("warning: skipping checkpoint"))
    assert "step_4" in warning and "truncated" in warning, warning
    assert f"resumed from {run_dir / 'checkpoints' / 'step_2'} at step 2" in result.stdout


@pytest.mark.parametrize("damage, message", [
    (lambda ckpt: _flip_byte(ckpt / "mp_rank_00_model_states.pt"), "sha256 does not match"),
    (lambda ckpt: (ckpt / "COMMITTED").unlink(), "not a complete checkpoint"),
])
def test_explicit_load_of_a_damaged_checkpoint_is_refused(shakespeare, saved_run, tmp_path, damage, message):
    run_dir = _copy(saved_run, tmp_path)
    checkpoint = run_dir / "checkpoints" / "step_4"
    damage(checkpoint)
    result = run_cli("train", str(TINY_CONFIG), *RUN_ARGS, f"--checkpoint.load={checkpoint}",
                     *data_overrides(shakespeare, run_dir))
    lines = result.stderr.strip().splitlines()
    assert result.returncode == 2 and len(lines) == 1, result.stderr[-3000:]
    assert lines[0].startswith("error: ") and message in lines[0] and "step_4" in lines[0], lines


def test_a_checkpoint_of_another_model_shape_is_refused(shakespeare, saved_run, tmp_path):
    run_dir = _copy(saved_run, tmp_path)
    result = run_cli("train", str(TINY_CONFIG), *RUN_ARGS, "--model.hidden_size=128",
                     *data_overrides(shakespeare, run_dir))
    lines = result.stderr.strip().splitlines()
    assert result.returncode == 2 and len(lines) == 1, result.stderr[-3000:]
    assert "model.hidden_size is 192 in the checkpoint and 128 in this config" in lines[0], lines
