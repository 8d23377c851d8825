"""A path in the config that does not exist stops `pretrain train` before any process group, in one line naming
the key and the path (exit 2), instead of a FileNotFoundError traceback from copying the tokenizer."""

from __future__ import annotations

from tests.conftest import TINY_CONFIG, data_overrides, run_cli


def test_missing_tokenizer_is_one_line_before_any_work(shakespeare, tmp_path):
    run_dir, missing = tmp_path / "run", tmp_path / "no" / "tokenizer.model"
    result = run_cli("train", str(TINY_CONFIG), *data_overrides(shakespeare, run_dir), f"--data.tokenizer={missing}",
                     timeout=300)
    assert result.returncode == 2, result.stdout[-3000:] + result.stderr[-3000:]
    errors = [line for line in result.stderr.splitlines() if line.startswith("error: ")]
    assert errors == [f"error: data.tokenizer: file not found: {missing}"], result.stderr[-3000:]
    assert "Traceback" not in result.stderr, result.stderr[-3000:]
    assert not run_dir.exists()  # nothing was written: no process group, no run directory
