"""Tiny BERT through the real CLI on real data: it learns in one process, and TP=2 under torchrun takes the same
steps (per-step losses and gradient norms)."""

from __future__ import annotations

import math
from pathlib import Path

import pytest

from tests.conftest import REPO, data_overrides, read_metrics, run_cli

BERT_TINY = REPO / "configs" / "bert" / "tiny.yaml"
STEPS = 10
# A short warmup so 10 steps show learning; both runs use the same arguments (the LR schedule depends on them).
RUN_ARGS = [f"--train.steps={STEPS}", "--train.log_every=1", "--optim.warmup_steps=3", "--train.eval_batches=2",
            "--checkpoint.every_steps=0"]


def train(shakespeare, run_dir: Path, *extra: str, nproc: int = 0) -> dict[int, dict]:
    result = run_cli("train", str(BERT_TINY), *RUN_ARGS, *data_overrides(shakespeare, run_dir), *extra,
                     torchrun_nproc=nproc)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    return read_metrics(run_dir)


@pytest.fixture(scope="module")
def single(shakespeare, tmp_path_factory) -> dict[int, dict]:
    return train(shakespeare, tmp_path_factory.mktemp("bert_single"))


def test_tiny_bert_learns(single):
    assert sorted(single) == list(range(1, STEPS + 1))
    first, last = single[1]["loss"], single[STEPS]["loss"]
    # Step 1 is the untrained model: MLM ln(1024) + NSP ln(2) (tiny.yaml's vocabulary is the tokenizer's 1024).
    assert first == pytest.approx(math.log(1024) + math.log(2), abs=0.1)
    assert last < first - 0.5, (first, last)
    assert single[STEPS]["val_loss"] < first
    assert all(single[s]["tokens_per_s"] > 0 and single[s]["tflops_per_device"] > 0 for s in single)


@pytest.mark.slow
def test_tensor_parallel_2_matches_single_process(shakespeare, single, tmp_path):
    tp2 = train(shakespeare, tmp_path, "--parallel.tensor=2", nproc=2)
    assert sorted(tp2) == sorted(single)
    for step in single:
        assert tp2[step]["loss"] == pytest.approx(single[step]["loss"], rel=1e-5), step
        assert tp2[step]["grad_norm"] == pytest.approx(single[step]["grad_norm"], rel=1e-4), step
    assert tp2[STEPS]["val_loss"] == pytest.approx(single[STEPS]["val_loss"], rel=1e-5)
