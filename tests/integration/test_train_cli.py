"""`pretrain train` end to end through the real CLI: learning, metrics, checkpoints, resume, signals, bad configs."""

from __future__ import annotations

import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from tests.conftest import REPO, TINY_CONFIG, cli_env, data_overrides, read_metrics, run_cli, train_tiny

STEPS = 60
# Same run for the reference and the interrupted runs: the LR schedule depends on train.steps.
RUN_ARGS = [f"--train.steps={STEPS}", "--train.log_every=1", "--checkpoint.every_steps=20",
            "--checkpoint.keep_last=0"]


@pytest.fixture(scope="module")
def reference_run(shakespeare, tmp_path_factory) -> Path:
    """The acceptance command: gpt_tiny for 60 steps, uninterrupted."""
    return train_tiny(shakespeare, tmp_path_factory.mktemp("reference"), *RUN_ARGS)


@pytest.mark.slow  # the 60-step reference run
def test_loss_falls_metrics_and_checkpoint(reference_run):
    metrics = read_metrics(reference_run)
    assert sorted(metrics) == list(range(1, STEPS + 1))  # one record per logged step (log_every=1)
    for record in metrics.values():
        for key in ("step", "loss", "lr", "grad_norm", "tokens_per_s", "step_time_s"):
            assert key in record, (key, record)
    assert metrics[STEPS]["loss"] < metrics[1]["loss"] - 1.5, (metrics[1]["loss"], metrics[STEPS]["loss"])
    # The reader reads the rows of the shuffle windows it reached (16 rows of 129 uint16 tokens a step, at most one
    # 512-row window ahead), each once, with its 16-byte digest.
    for s, record in metrics.items():
        assert 16 * s * (129 * 2 + 16) <= record["data_read_bytes"] <= (16 * s + 512) * (129 * 2 + 16)
    assert "val_loss" in metrics[STEPS] and metrics[STEPS]["val_ppl"] > 1.0
    checkpoints = reference_run / "checkpoints"
    assert (checkpoints / f"step_{STEPS}" / "COMMITTED").is_file()
    assert (checkpoints / "latest").read_text().strip() == f"step_{STEPS}"
    assert (reference_run / "config.yaml").is_file() and (reference_run / "tokenizer.model").is_file()


def _start(shakespeare, run_dir: Path, faults: str = "") -> subprocess.Popen:
    from pretrain.fault_tolerance import TEST_FAULTS_ENV

    cmd = [sys.executable, "-m", "pretrain", "train", str(TINY_CONFIG), *RUN_ARGS,
           *data_overrides(shakespeare, run_dir)]
    return subprocess.Popen(cmd, cwd=REPO, env={**cli_env(), TEST_FAULTS_ENV: faults}, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True)


def _wait_for(path: Path, proc: subprocess.Popen, timeout: float = 300) -> None:
    deadline = time.monotonic() + timeout
    while not path.exists():
        assert proc.poll() is None, f"run ended before {path} appeared:\n{proc.stdout.read()[-3000:]}"
        assert time.monotonic() < deadline, f"{path} did not appear in {timeout} s"
        time.sleep(0.05)


def _assert_same_trajectory(run_dir: Path, reference: Path, from_step: int) -> None:
    ours, ref = read_metrics(run_dir), read_metrics(reference)
    assert max(ours) == STEPS
    for step in range(from_step + 1, STEPS + 1):
        # Bitwise on CPU: same weights, optimizer state, data position and RNG after the restart.
        assert ours[step]["loss"] == ref[step]["loss"], (step, ours[step]["loss"], ref[step]["loss"])


@pytest.mark.slow
def test_sigkill_then_sigterm_twice_and_each_rerun_continues_the_trajectory(shakespeare, reference_run, tmp_path):
    """The two interruptions a Slurm job meets, in one run. SIGKILL right after the step-20 checkpoint: nothing
    more is saved, and the rerun resumes from step 20. Then SIGTERM, and a second SIGTERM while the checkpoint it
    asked for is being written (a 3 s save window): the save completes and the run exits with the requeue code. The
    last rerun resumes from that checkpoint and ends on the uninterrupted run's losses, bitwise."""
    from pretrain.fault_tolerance import REQUEUE_EXIT_CODE

    checkpoints = tmp_path / "checkpoints"
    proc = _start(shakespeare, tmp_path)
    _wait_for(checkpoints / "step_20" / "COMMITTED", proc)
    proc.kill()  # SIGKILL: no chance to save anything more
    proc.wait()

    proc = _start(shakespeare, tmp_path, faults="save_delay_s=3")
    _wait_for(checkpoints / "step_40" / "COMMITTED", proc)
    proc.send_signal(signal.SIGTERM)
    deadline = time.monotonic() + 120
    while not (saving := [p for p in checkpoints.glob("step_*") if p.name not in ("step_20", "step_40")]):
        assert proc.poll() is None and time.monotonic() < deadline, "the signal's checkpoint never started"
        time.sleep(0.02)
    assert not (saving[0] / "COMMITTED").exists()
    proc.send_signal(signal.SIGTERM)
    output, _ = proc.communicate(timeout=300)
    assert proc.returncode == REQUEUE_EXIT_CODE, output[-3000:]
    assert f"resumed from {checkpoints / 'step_20'} at step 20" in output, output[-3000:]
    logged = max(read_metrics(tmp_path))  # the step the signal was acted on (every step is logged)
    assert logged > 40 and (checkpoints / f"step_{logged}" / "COMMITTED").is_file()
    assert (checkpoints / "latest").read_text().strip() == f"step_{logged}"

    resumed = run_cli("train", str(TINY_CONFIG), *RUN_ARGS, *data_overrides(shakespeare, tmp_path))
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert f"resumed from {checkpoints / f'step_{logged}'} at step {logged}" in resumed.stderr
    _assert_same_trajectory(tmp_path, reference_run, from_step=20)


@pytest.mark.parametrize("override, key", [
    ("--model.hiden_size=64", "model.hiden_size"),
    ("--train.steps=many", "train.steps"),
    ("--parallel.zero_stage=5", "parallel.zero_stage"),
    ("--parallel.tensor=2", "parallel.tensor"),  # 2 does not divide the world size 1
])
def test_bad_config_fails_before_any_work(override, key, tmp_path):
    run_dir = tmp_path / "run"
    result = run_cli("train", str(TINY_CONFIG), f"--run.dir={run_dir}", override, timeout=120)
    assert result.returncode == 2
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ") and key in lines[0], result.stderr
    assert not run_dir.exists()  # nothing was written
