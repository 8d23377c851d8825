"""bench/train_step.py runs and prints both sides' throughput and their ratio: on CPU (tiny shape, one round) and,
where a GPU is present, the bf16 MFU table for GPT-3 125M. Speed is not asserted (DEVELOPERS.md: speed goals
live in bench/); these tests keep the benchmark itself from rotting."""

from __future__ import annotations

import re
import subprocess
import sys

import pytest
import torch

from tests.conftest import REPO, cli_env

_NUMBER = r"([\d,]+(?:\.\d+)?)"


def _bench(tmp_path, *args: str) -> list[str]:
    result = subprocess.run([sys.executable, "bench/train_step.py", f"--dir={tmp_path}", *args], cwd=REPO,
                            env=cli_env(), capture_output=True, text=True, timeout=900)
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-3000:]
    return [line for line in result.stdout.splitlines() if line.startswith("| ") and "---" not in line]


def _cells(row: str) -> list[float]:
    return [float(m.replace(",", "")) for m in re.findall(rf"\| {_NUMBER}%? (?=\|)", row)]


@pytest.mark.slow
def test_cpu_bench_prints_both_throughputs_and_the_ratio(tmp_path):
    header, row = _bench(tmp_path, "--shapes=tiny", "--rounds=1", "--steps=1")
    assert "ours tokens/s" in header and "plain (SDPA) tokens/s" in header and "ours / plain (time)" in header
    assert row.startswith("| tiny (4x192")
    params, ours, plain, ratio, unfused, ratio_unfused, bare, ratio_bare = _cells(row)
    assert params == pytest.approx(2.2, abs=0.1) and min(ours, plain, unfused, bare) > 0
    assert ratio == pytest.approx(plain / ours, rel=0.02)  # time ratio = inverse throughput ratio (rounded cells)
    assert ratio_unfused == pytest.approx(unfused / ours, rel=0.02)
    assert ratio_bare == pytest.approx(plain / bare, rel=0.02)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_gpu_bench_prints_mfu_for_125m(tmp_path):
    header, row = _bench(tmp_path, "--shapes=125m", "--rounds=1", "--steps=3")
    assert "ours MFU" in header and "plain MFU" in header
    params, ours, ours_tflops, ours_mfu, plain, plain_tflops, plain_mfu, ratio = _cells(row)
    assert 120 <= params <= 170  # GPT-3 Small with GPT-2's padded vocabulary, untied count
    assert 0 < ours_mfu < 100 and 0 < plain_mfu < 100
    assert ratio == pytest.approx(plain / ours, rel=0.02)
