"""`pretrain demo`: corpus → tokenizer → shards → training → checkpoint → perplexity → generated text."""

from __future__ import annotations

import re

import pytest

from tests.conftest import read_metrics, run_cli


@pytest.mark.slow  # ~40 s: every stage, the held-out plays validated twice
def test_demo_runs_end_to_end(tmp_path):
    result = run_cli("demo", "--dir", str(tmp_path), "--steps", "20", "--train.log_every=10")
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    out = result.stdout
    for stage in range(1, 6):
        assert f"== [{stage}/5]" in out  # progress through every stage
    assert (tmp_path / "tokenizer.model").is_file()
    assert (tmp_path / "data" / "train" / "manifest.json").is_file()
    assert (tmp_path / "run" / "checkpoints" / "step_20" / "COMMITTED").is_file()
    ppl = float(re.search(r"perplexity ([0-9.]+)", out).group(1))
    metrics = read_metrics(tmp_path / "run")
    assert metrics[20]["loss"] < metrics[10]["loss"]
    # The demo's perplexity comes from reloading the checkpoint; it must equal the in-training evaluation.
    assert abs(ppl - metrics[20]["val_ppl"]) / ppl < 1e-3, (ppl, metrics[20]["val_ppl"])
    assert ppl < 2048  # better than uniform over the vocabulary
    continuation = out.split("--- continuation ---", 1)[1].split("--- done", 1)[0]
    assert len(continuation.strip()) > len("ROMEO.\nBut soft, what light") + 20
    # The new console, and the end: the goodput summary, then the report's path.
    assert "step 10/20 (50%) · loss " in out and " tok/s · " in out
    last = out.strip().splitlines()[-2:]
    assert last[0].startswith("goodput ") and "over 1 attempt" in last[0], last
    assert last[1].startswith(f"report: {tmp_path / 'run' / 'report.html'}"), last
    assert (tmp_path / "run" / "report.png").is_file()
