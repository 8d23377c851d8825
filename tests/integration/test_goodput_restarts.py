"""Goodput across restarts, end to end: a run SIGKILLed twice and resumed accounts the work each kill lost (the
steps between the last checkpoint and the kill, as metrics.jsonl measured them) as redone, and its parts add up to
the wall time the test measured from the first launch to the summary line the last attempt ends with."""

from __future__ import annotations

import json
import subprocess
import sys
import time
from pathlib import Path

from pretrain.metrics import goodput
from tests.conftest import REPO, TINY_CONFIG, cli_env, data_overrides

STEPS, EVERY = 24, 8
# A small model whose steps sleep 0.1 s (fault injection): steps long enough to kill between, little CPU.
ARGS = [f"--train.steps={STEPS}", "--train.log_every=1", f"--checkpoint.every_steps={EVERY}",
        "--checkpoint.keep_last=0", "--model.num_layers=2", "--model.hidden_size=64", "--train.micro_batch_size=4"]
FAULTS = {"PRETRAIN_TEST_FAULTS": "step_sleep_s=0.1"}


def _start(shakespeare, run_dir: Path) -> subprocess.Popen:
    cmd = [sys.executable, "-m", "pretrain", "train", str(TINY_CONFIG), *ARGS, *data_overrides(shakespeare, run_dir)]
    return subprocess.Popen(cmd, cwd=REPO, env={**cli_env(), **FAULTS}, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True)


def _logged_steps(run_dir: Path) -> list[int]:
    path = run_dir / "metrics.jsonl"
    if not path.exists():
        return []
    return [json.loads(line)["step"] for line in path.read_text().splitlines() if line.endswith("}")]


def _kill_after(proc: subprocess.Popen, run_dir: Path, step: int, timeout: float = 300) -> None:
    """SIGKILL ``proc`` once metrics.jsonl holds ``step`` (a few steps after a checkpoint)."""
    deadline = time.monotonic() + timeout
    while step not in _logged_steps(run_dir):
        assert proc.poll() is None, f"run ended before step {step}:\n{proc.stdout.read()[-3000:]}"
        assert time.monotonic() < deadline, f"step {step} not logged in {timeout} s"
        time.sleep(0.02)
    proc.kill()
    proc.wait()


def _attempts_of_metrics(run_dir: Path) -> list[list[dict]]:
    """metrics.jsonl split where the step goes back (a resumed attempt starts)."""
    attempts: list[list[dict]] = []
    for line in (run_dir / "metrics.jsonl").read_text().splitlines():
        record = json.loads(line)
        if not attempts or record["step"] <= attempts[-1][-1]["step"]:
            attempts.append([])
        attempts[-1].append(record)
    return attempts


def test_two_sigkills_redone_time_and_parts_sum_to_wall(shakespeare, tmp_path):
    launched = time.time()
    _kill_after(_start(shakespeare, tmp_path), tmp_path, EVERY + 4)
    _kill_after(_start(shakespeare, tmp_path), tmp_path, 2 * EVERY + 4)
    proc = _start(shakespeare, tmp_path)
    lines = []
    for line in proc.stdout:  # the run's end is its summary line; the interpreter's teardown after it is not
        lines.append(line)   # the run's (1-2 s here: library atexit work; a requeue's next attempt counts it)
        if line.startswith("goodput "):
            ended = time.time()
    output = "".join(lines)
    assert proc.wait(timeout=600) == 0, output[-3000:]

    ledger = goodput.read(tmp_path / goodput.FILE_NAME)
    assert [a["attempt"] for a in ledger] == [1, 2, 3]
    assert [a["resumed_from"] for a in ledger] == [0, EVERY, 2 * EVERY]
    logged = _attempts_of_metrics(tmp_path)
    assert len(logged) == 3
    for killed, after in zip(ledger[:2], ledger[1:]):
        # The steps after the checkpoint the next attempt resumed from, as the killed attempt logged them.
        lost = [r["step_time_s"] for r in logged[killed["attempt"] - 1] if r["step"] > after["resumed_from"]]
        assert len(lost) >= 4
        assert abs(killed["uncommitted_s"] - sum(lost)) <= max(lost), (killed["uncommitted_s"], lost)
    parts = goodput.totals(ledger)
    assert parts["redone"] == sum(a["uncommitted_s"] for a in ledger[:2]) and ledger[-1]["uncommitted_s"] == 0
    assert parts["between_attempts"] > 0 and parts["startup"] > 0 and parts["checkpoint"] > 0
    wall = ended - launched
    print(f"parts {sum(parts.values()):.2f} s, wall {wall:.2f} s, redone {parts['redone']:.2f} s")
    assert abs(sum(parts.values()) - wall) <= 0.02 * wall, (parts, wall)
    summary = [line for line in output.splitlines() if line.startswith("goodput ")]
    assert summary and "over 3 attempts" in summary[-1] and "redone" in summary[-1], output[-2000:]
