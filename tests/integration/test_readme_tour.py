"""The README's five-minute tour, run line by line as a reader would: tokenizer → shards → train → eval → generate.

The lines are taken from README.md unchanged and run by bash, in order, in a temporary directory that holds a link
to the repository's configs/ (the tour's paths are relative: `configs/...` to read, `runs/tour/...` to write), so
the repository's own runs/ is left alone. `pretrain` resolves to this checkout run by this test's interpreter.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
import time

import pytest

from tests.conftest import REPO, cli_env
from tests.unit.test_readme import tour_commands

pytestmark = pytest.mark.slow  # ~1 min on 2 idle cores: six CLI processes, 30 training steps


def test_readme_tour_runs(tmp_path):
    (tmp_path / "configs").symlink_to(REPO / "configs", target_is_directory=True)
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    wrapper = bin_dir / "pretrain"
    wrapper.write_text(f'#!/bin/sh\nexec "{sys.executable}" -m pretrain "$@"\n')
    wrapper.chmod(0o755)
    env = {**cli_env(), "PATH": os.pathsep.join([str(bin_dir), os.environ.get("PATH", "")])}

    outputs, timings = {}, []
    for command in tour_commands():
        start = time.perf_counter()
        result = subprocess.run(["bash", "-c", command], cwd=tmp_path, env=env, capture_output=True, text=True,
                                timeout=600)
        timings.append(f"{time.perf_counter() - start:5.1f} s  {command[:80]}")
        assert result.returncode == 0, f"{command}\n{result.stdout[-3000:]}\n{result.stderr[-3000:]}"
        outputs[command.split()[1]] = result.stdout
    print("\n".join(timings))

    tour = tmp_path / "runs" / "tour"
    assert (tour / "tokenizer.model").is_file()
    for split in ("train", "valid"):
        assert (tour / "data" / split / "manifest.json").is_file()
    assert (tour / "run" / "checkpoints" / "latest").is_file()

    # eval prints the validation loss and perplexity of the checkpoint on the held-out plays.
    match = re.search(r"val loss ([0-9.]+) \| perplexity ([0-9.]+)", outputs["eval"])
    assert match, outputs["eval"]
    ppl = float(match.group(2))
    assert 1 < ppl < 2048, ppl  # better than uniform over the 2,048-piece vocabulary

    # generate streams text: some words of the continuation.
    text = outputs["generate"]
    assert len(re.findall(r"[A-Za-z]{2,}", text)) >= 3, text
