"""Goodput across restarts and the run report, end to end: a run SIGKILLed twice and resumed accounts the work each
kill lost (the steps between the last checkpoint and the kill, as metrics.jsonl measured them) as redone, and its
parts add up to the wall time the test measured from the first launch to the summary line the last attempt ends
with; `pretrain report` on that run renders in headless Chromium."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest

from pretrain.metrics import goodput
from tests.conftest import REPO, TINY_CONFIG, cli_env, data_overrides, run_cli

pytestmark = pytest.mark.slow  # ~40 s: three process starts under kills, then the report in Chromium

STEPS, EVERY = 24, 8
# A small model whose steps sleep 0.15 s (fault injection): steps long enough to kill between, little CPU.
ARGS = [f"--train.steps={STEPS}", "--train.log_every=1", f"--checkpoint.every_steps={EVERY}",
        "--checkpoint.keep_last=0", "--model.num_layers=2", "--model.hidden_size=64", "--train.micro_batch_size=4"]
FAULTS = {"PRETRAIN_TEST_FAULTS": "step_sleep_s=0.15"}


def _start(shakespeare, run_dir: Path) -> subprocess.Popen:
    cmd = [sys.executable, "-m", "pretrain", "train", str(TINY_CONFIG), *ARGS, *data_overrides(shakespeare, run_dir)]
    return subprocess.Popen(cmd, cwd=REPO, env={**cli_env(), **FAULTS}, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True)


def _records(run_dir: Path) -> list[dict]:
    path = run_dir / "metrics.jsonl"
    lines = path.read_text().splitlines() if path.exists() else []
    return [json.loads(line) for line in lines if line.endswith("}")]


def _kill_after(proc: subprocess.Popen, run_dir: Path, step: int, timeout: float = 300) -> list[dict]:
    """SIGKILL ``proc`` once it has logged ``step`` (a few steps after a checkpoint); returns its records."""
    before = len(_records(run_dir))
    deadline = time.monotonic() + timeout
    while not any(r["step"] >= step for r in _records(run_dir)[before:]):
        assert proc.poll() is None, f"run ended before step {step}:\n{proc.stdout.read()[-3000:]}"
        assert time.monotonic() < deadline, f"step {step} not logged in {timeout} s"
        time.sleep(0.02)
    proc.kill()
    proc.wait()
    return _records(run_dir)[before:]


@pytest.fixture(scope="module")
def killed_twice(shakespeare, tmp_path_factory) -> tuple[Path, float, str, list[list[dict]]]:
    """A run SIGKILLed a few steps after its step-8 and its step-16 checkpoint, then resumed to the end: (run dir,
    seconds from the first launch to the last attempt's summary line, the last attempt's output, the records each
    killed attempt logged)."""
    run_dir = tmp_path_factory.mktemp("killed_twice")
    launched = time.time()
    killed = [_kill_after(_start(shakespeare, run_dir), run_dir, EVERY + 4),
              _kill_after(_start(shakespeare, run_dir), run_dir, 2 * EVERY + 4)]
    proc = _start(shakespeare, run_dir)
    lines, ended = [], None
    for line in proc.stdout:  # the run's end is its summary line; the interpreter's teardown after it is not
        lines.append(line)   # the run's (1-2 s here: library atexit work; a requeue's next attempt counts it)
        if line.startswith("goodput "):
            ended = time.time()
    output = "".join(lines)
    assert proc.wait(timeout=600) == 0 and ended, output[-3000:]
    return run_dir, ended - launched, output, killed


def test_two_sigkills_redone_time_and_parts_sum_to_wall(killed_twice):
    tmp_path, wall, output, killed_logs = killed_twice
    ledger = goodput.read(tmp_path / goodput.FILE_NAME)
    assert [a["attempt"] for a in ledger] == [1, 2, 3]
    resumed = [a["resumed_from"] for a in ledger]  # [0, 8, 16] unless a kill came late, after the next save
    assert resumed[0] == 0 and 0 < resumed[1] <= resumed[2] and all(r % EVERY == 0 for r in resumed), resumed
    for killed, logged, after in zip(ledger[:2], killed_logs, ledger[1:]):
        # The steps after the checkpoint the next attempt resumed from, as the killed attempt logged them.
        lost = [r["step_time_s"] for r in logged if r["step"] > after["resumed_from"]]
        assert len(lost) >= 1
        assert abs(killed["uncommitted_s"] - sum(lost)) <= max(lost), (killed["uncommitted_s"], lost)
    parts = goodput.totals(ledger)
    assert parts["redone"] == sum(a["uncommitted_s"] for a in ledger[:2]) and ledger[-1]["uncommitted_s"] == 0
    assert parts["startup"] > 0 and parts["checkpoint"] > 0
    print(f"parts {sum(parts.values()):.2f} s, wall {wall:.2f} s, redone {parts['redone']:.2f} s")
    assert abs(sum(parts.values()) - wall) <= 0.02 * wall, (parts, wall)
    summary = [line for line in output.splitlines() if line.startswith("goodput ")]
    assert summary and "over 3 attempts" in summary[-1] and "redone" in summary[-1], output[-2000:]


def test_report_renders_in_headless_chromium(killed_twice, tmp_path):
    """`pretrain report` on the twice-killed run: the page, with its PNG, renders in headless Chromium (the Debian
    package scripts/test.sh installs) into a screenshot that is not blank and shows the plots' colours."""
    import matplotlib.image

    chromium = shutil.which("chromium")
    if chromium is None:
        pytest.skip("chromium not installed (scripts/test.sh installs the Debian package)")
    run_dir = killed_twice[0]
    result = run_cli("report", str(run_dir), timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    page = run_dir / "report.html"
    assert f"report: {page}" in result.stdout
    text = page.read_text()
    assert "over 3 attempts" in text and "report.png" in text and "train:" in text  # summary, plots, config
    shot = tmp_path / "shot.png"
    rendered = subprocess.run([chromium, "--headless", "--no-sandbox", "--disable-gpu", "--hide-scrollbars",
                               "--window-size=1200,1400", f"--screenshot={shot}", page.as_uri()],
                              capture_output=True, text=True, timeout=180)
    assert shot.is_file(), rendered.stderr[-3000:]
    pixels = matplotlib.image.imread(shot)[..., :3]  # [h, w, 3] floats in 0..1
    not_white = (pixels < 0.95).any(axis=-1).mean()
    assert not_white > 0.05, not_white
    # The PNG was loaded into the page: its goodput-green (#2ca02c) and restart-red (#d62728) are on screen.
    for colour in ((0x2c, 0xa0, 0x2c), (0xd6, 0x27, 0x28)):
        near = (abs(pixels - [c / 255 for c in colour]) < 0.08).all(axis=-1).sum()
        assert near > 50, (colour, near)
