"""Data features through `pretrain train`: blended sources, bad shards (error and skip), `data prepare` output."""

from __future__ import annotations

import shutil

import pytest

from tests.conftest import TINY_CONFIG, data_overrides, read_metrics, run_cli

FAST = ["--train.steps=8", "--train.log_every=1", "--checkpoint.every_steps=0", "--train.eval_batches=1",
        "--model.num_layers=2"]


def test_blended_sources_follow_the_weights(shakespeare, tmp_path):
    blend = f"--data.train=[{{path: {shakespeare['train']}, weight: 3}}, {{path: {shakespeare['valid']}, weight: 1}}]"
    result = run_cli("train", str(TINY_CONFIG), *FAST, *data_overrides(shakespeare, tmp_path), blend)
    assert result.returncode == 0, result.stderr[-3000:]
    metrics = read_metrics(tmp_path)
    # 8 steps x 16 samples = 128 samples: Megatron's rule keeps each count within one sample of weight * total.
    fractions = metrics[8]["data_fractions"]
    assert fractions == pytest.approx([0.75, 0.25], abs=1 / 128)
    assert metrics[8]["skipped_shards"] == 0


def _corrupt_copy(src, dst):
    shutil.copytree(src, dst)
    shard = sorted(dst.glob("*.tar"))[1]
    data = bytearray(shard.read_bytes())
    data[2000:2010] = b"\xff" * 10  # same size, different bytes: only the checksum (xxh3_128) can notice
    shard.write_bytes(bytes(data))
    return shard


def test_corrupt_shard_is_a_one_line_error_naming_it(shakespeare, tmp_path):
    shard = _corrupt_copy(shakespeare["train"], tmp_path / "shards")
    overrides = data_overrides(shakespeare, tmp_path / "run")
    result = run_cli("train", str(TINY_CONFIG), *FAST, *overrides, f"--data.train={tmp_path / 'shards'}",
                     "--data.shuffle=false")
    assert result.returncode == 2, result.stdout[-2000:] + result.stderr[-2000:]
    lines = result.stderr.strip().splitlines()
    assert lines[-1].startswith("error: ") and shard.name in lines[-1], result.stderr[-2000:]


def test_corrupt_shard_skipped_and_counted(shakespeare, tmp_path):
    _corrupt_copy(shakespeare["train"], tmp_path / "shards")
    overrides = data_overrides(shakespeare, tmp_path / "run")
    result = run_cli("train", str(TINY_CONFIG), *FAST, *overrides, f"--data.train={tmp_path / 'shards'}",
                     "--data.shuffle=false", "--data.on_bad_shard=skip")
    assert result.returncode == 0, result.stderr[-3000:]
    assert read_metrics(tmp_path / "run")[8]["skipped_shards"] == 1
