"""Chaos: a 2-rank torchrun run SIGKILLed at random moments, mid-step and mid-save, and restarted each time.

At the end the loss trajectory and the final parameters and optimizer state must be bitwise identical to an
uninterrupted run, and every restart must have resumed from the newest checkpoint that was committed (had its
marker) when it started: never from a directory without one.
"""

from __future__ import annotations

import random
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import psutil
import pytest
import torch

from tests.conftest import REPO, TINY_CONFIG, cli_env, data_overrides, read_metrics

STEPS, KILLS = 16, 4  # a kill costs the run at most 3 steps of progress: 4 kills end before step 16
RUN_ARGS = [f"--train.steps={STEPS}", "--train.log_every=1", "--checkpoint.every_steps=2",
            "--checkpoint.keep_last=3", "--parallel.zero_stage=1", "--train.global_batch_size=32",
            "--train.micro_batch_size=8", "--model.num_layers=2"]
SAVE_DELAY_S = 0.5  # widens the window between a checkpoint's files and its marker
_RESUMED = re.compile(r"resumed from (\S+) at step (\d+) ")


def _launch(shakespeare, run_dir: Path, extra: list[str] = ()) -> subprocess.Popen:
    from pretrain.fault_tolerance import TEST_FAULTS_ENV

    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", "-m", "pretrain",
           "train", str(TINY_CONFIG), *RUN_ARGS, *extra, *data_overrides(shakespeare, run_dir)]
    env = {**cli_env(), TEST_FAULTS_ENV: f"save_delay_s={SAVE_DELAY_S}"}
    return subprocess.Popen(cmd, cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            start_new_session=True)


def _kill_all(proc: subprocess.Popen) -> None:
    """SIGKILL torchrun and its workers at once (the workers run in sessions of their own)."""
    family = [proc.pid] + [child.pid for child in psutil.Process(proc.pid).children(recursive=True)]
    for pid in family:
        try:
            psutil.Process(pid).send_signal(signal.SIGKILL)
        except psutil.NoSuchProcess:
            pass
    proc.wait()


def _committed(checkpoints: Path) -> list[int]:
    return sorted(int(p.name[5:]) for p in checkpoints.glob("step_*") if (p / "COMMITTED").is_file())


def _resumed_step(line: str) -> int | None:
    match = _RESUMED.search(line)
    return int(match.group(2)) if match else None


def _wait_for_moment(proc: subprocess.Popen, checkpoints: Path, mid_save: bool, rng: random.Random):
    """Read the run's output until the chosen moment: a save in progress (a new directory without its marker
    yet), or a random point one to three steps into training. Returns (reached, step it resumed from or 0)."""
    before = set(_committed(checkpoints))
    steps_to_wait, seen, resumed = rng.randint(1, 3), 0, 0
    for line in proc.stdout:
        resumed = _resumed_step(line) or resumed
        seen += line.startswith("step ")
        if mid_save and seen:
            if any(not (p / "COMMITTED").exists() and int(p.name[5:]) not in before
                   for p in checkpoints.glob("step_*")):
                time.sleep(rng.uniform(0, SAVE_DELAY_S))
                return True, resumed
        elif not mid_save and seen >= steps_to_wait:
            time.sleep(rng.uniform(0, 0.3))
            return True, resumed
    return False, resumed


@pytest.mark.slow
def test_random_kills_leave_the_run_bitwise_identical(shakespeare, tmp_path):
    reference = tmp_path / "reference"
    proc = _launch(shakespeare, reference)
    output, _ = proc.communicate(timeout=600)
    assert proc.returncode == 0, output[-3000:]

    run_dir, rng = tmp_path / "chaos", random.Random(6)
    checkpoints = run_dir / "checkpoints"
    for kill in range(KILLS + 1):
        newest = (_committed(checkpoints) or [0])[-1]
        # Every other restart writes its checkpoints in the background: the result must not depend on it.
        proc = _launch(shakespeare, run_dir, [f"--checkpoint.async={'true' if kill % 2 else 'false'}"])
        if kill < KILLS:
            reached, resumed = _wait_for_moment(proc, checkpoints, mid_save=kill % 2 == 1, rng=rng)
            _kill_all(proc)
            assert reached, f"the run finished after {kill} kills; raise STEPS"
        else:
            output, _ = proc.communicate(timeout=600)
            assert proc.returncode == 0, output[-3000:]
            resumed = next((s for line in output.splitlines() if (s := _resumed_step(line))), 0)
        # Only committed checkpoints load, and the newest of them: nothing since it was lost, nothing half-written
        # was used.
        assert resumed == newest, (kill, resumed, newest)

    ours, ref = read_metrics(run_dir), read_metrics(reference)
    assert sorted(ours) == sorted(ref) == list(range(1, STEPS + 1))
    assert [ours[s]["loss"] for s in ref] == [ref[s]["loss"] for s in ref]
    final, expected = checkpoints / f"step_{STEPS}", reference / "checkpoints" / f"step_{STEPS}"
    files = sorted(p.name for p in expected.glob("*.pt") if not p.name.startswith("train_state"))
    assert files, expected
    for file in files:
        _assert_bitwise_equal(torch.load(final / file, weights_only=False),
                              torch.load(expected / file, weights_only=False), file)


def _assert_bitwise_equal(a, b, where: str) -> None:
    if isinstance(a, torch.Tensor):
        assert torch.equal(a, b), where
    elif isinstance(a, dict):
        for key in a:
            if key not in ("ds_config", "ds_version"):
                _assert_bitwise_equal(a[key], b[key], f"{where}/{key}")
    elif isinstance(a, (list, tuple)):
        for i, (x, y) in enumerate(zip(a, b)):
            _assert_bitwise_equal(x, y, f"{where}[{i}]")
