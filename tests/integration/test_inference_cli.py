"""`pretrain eval` and `pretrain generate` on a checkpoint saved by a tensor-parallel torchrun run."""

from __future__ import annotations

from pathlib import Path

import pytest

from tests.conftest import TINY_CONFIG, data_overrides, read_metrics, run_cli, value_after

STEPS = 30
EVAL_BATCHES = 4


@pytest.fixture(scope="module")
def tp2_run(shakespeare, tmp_path_factory) -> Path:
    run_dir = tmp_path_factory.mktemp("tp2")
    result = run_cli("train", str(TINY_CONFIG), *data_overrides(shakespeare, run_dir), "--parallel.tensor=2",
                     f"--train.steps={STEPS}", f"--train.eval_batches={EVAL_BATCHES}", "--checkpoint.every_steps=0",
                     torchrun_nproc=2)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    return run_dir


@pytest.mark.slow
def test_eval_of_a_tp2_checkpoint_equals_the_in_training_evaluation(tp2_run):
    result = run_cli("eval", "--checkpoint", str(tp2_run), "--max-batches", str(EVAL_BATCHES))
    assert result.returncode == 0, result.stderr[-3000:]
    # Consolidated into one process, the model scores the same validation rows as the two TP ranks did.
    assert value_after(result.stdout, "val loss") == pytest.approx(read_metrics(tp2_run)[STEPS]["val_loss"],
                                                                   rel=1e-4)
    assert value_after(result.stdout, "perplexity") < 1024  # better than uniform over the vocabulary


@pytest.mark.slow
def test_generate_from_a_tp2_checkpoint_streams_seeded_text(tp2_run):
    args = ["generate", "--checkpoint", str(tp2_run / "checkpoints"), "--prompt", "ROMEO.", "--max-new-tokens",
            "30", "--temperature", "0.9", "--top-k", "50", "--top-p", "0.95", "--seed", "3"]
    first, again = run_cli(*args), run_cli(*args)
    assert first.returncode == 0, first.stderr[-3000:]
    assert first.stdout == again.stdout  # the seed fixes the text
    assert len(first.stdout.strip()) >= 20
    other = run_cli(*args[:-1], "4")
    assert other.returncode == 0 and other.stdout != first.stdout
    greedy = [run_cli("generate", "--checkpoint", str(tp2_run), "--prompt", "ROMEO.", "--greedy",
                      "--max-new-tokens", "10", "--seed", seed) for seed in ("1", "2")]
    assert greedy[0].returncode == 0 and len(greedy[0].stdout) > 1, greedy[0].stderr[-3000:]
    assert greedy[0].stdout == greedy[1].stdout  # argmax decoding draws nothing


def test_generate_names_a_directory_without_checkpoints(tmp_path):
    result = run_cli("generate", "--checkpoint", str(tmp_path), "--prompt", "x")
    assert result.returncode == 2
    lines = result.stderr.strip().splitlines()
    assert lines[-1].startswith("error: ") and str(tmp_path) in lines[-1] and "no complete checkpoint" in lines[-1]
