"""`pretrain launch local`: torchrun standalone with 2 processes trains to exactly the losses of a plain
`torchrun --nproc_per_node=2` run (several nodes, on network-namespace hosts: tests/multinode/).

Its exit code is the workers', not torchrun's 1: SIGTERM to the launcher reaches the training processes, which
checkpoint and exit 75, and so does the launcher; a hung rank (watchdog, 86 on every rank) makes it exit 86.
"""

from __future__ import annotations

import signal
import subprocess
import sys
import time
from pathlib import Path

import psutil
import pytest

from pretrain.fault_tolerance import HANG_EXIT_CODE, REQUEUE_EXIT_CODE
from tests.conftest import REPO, TINY_CONFIG, cli_env, data_overrides, read_metrics, run_cli

pytestmark = pytest.mark.slow

STEPS = 8
TRAIN_ARGS = [f"--train.steps={STEPS}", "--train.log_every=1", "--checkpoint.every_steps=0",
              "--model.num_layers=2", "--model.hidden_size=64", "--train.micro_batch_size=4"]


def losses(run_dir: Path) -> list[float]:
    metrics = read_metrics(run_dir)
    assert sorted(metrics) == list(range(1, STEPS + 1))
    return [metrics[s]["loss"] for s in range(1, STEPS + 1)]


@pytest.fixture(scope="module")
def torchrun_reference(shakespeare, tmp_path_factory) -> list[float]:
    run_dir = tmp_path_factory.mktemp("torchrun")
    result = run_cli("train", str(TINY_CONFIG), *TRAIN_ARGS, *data_overrides(shakespeare, run_dir), torchrun_nproc=2)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    # data_read_bytes, summed over both ranks: each row of the shuffle windows read so far (8 steps x 8 rows, at
    # most one 512-row window ahead) once, by the rank that owns it, with its 16-byte digest (129 uint16 tokens).
    metrics = read_metrics(run_dir)
    for s in range(1, STEPS + 1):
        assert 8 * s * (129 * 2 + 16) <= metrics[s]["data_read_bytes"] <= (8 * s + 512) * (129 * 2 + 16)
    return losses(run_dir)


def test_launch_local_standalone_matches_torchrun(torchrun_reference, shakespeare, tmp_path):
    result = run_cli("launch", "local", "--nproc=2", str(TINY_CONFIG), *TRAIN_ARGS,
                     *data_overrides(shakespeare, tmp_path))
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    assert "launch: torchrun --nproc-per-node=2" in result.stderr and "--standalone" in result.stderr
    assert "'data': 2" in result.stderr
    assert losses(tmp_path) == torchrun_reference


SMALL = ["--model.num_layers=2", "--model.hidden_size=64", "--train.micro_batch_size=4"]


def test_sigterm_to_launcher_checkpoints_and_exits_requeue_code(shakespeare, tmp_path):
    """The signal goes to `pretrain launch local` only (the agent runs its workers in sessions of their own)."""
    run_dir, log = tmp_path / "run", tmp_path / "output.txt"
    cmd = [sys.executable, "-m", "pretrain", "launch", "local", "--nproc=2", str(TINY_CONFIG), "--train.steps=100000",
           "--train.log_every=1", "--checkpoint.every_steps=0", *SMALL, *data_overrides(shakespeare, run_dir)]
    with open(log, "w") as out:  # a file, not a pipe: nobody reads a pipe while we wait
        proc = subprocess.Popen(cmd, cwd=REPO, env=cli_env(), stdout=out, stderr=subprocess.STDOUT)
        descendants = []
        try:
            metrics, deadline = run_dir / "metrics.jsonl", time.monotonic() + 300
            while not (metrics.exists() and metrics.read_text().strip()):  # step 1 done: StopSignal installed
                assert proc.poll() is None, log.read_text()[-3000:]
                assert time.monotonic() < deadline, "step 1 never finished"
                time.sleep(0.1)
            descendants = psutil.Process(proc.pid).children(recursive=True)
            proc.send_signal(signal.SIGTERM)
            proc.wait(timeout=240)
        finally:
            for p in [proc, *descendants]:  # a launcher that died alone would leave its workers training
                try:
                    p.kill()
                except (ProcessLookupError, psutil.NoSuchProcess):
                    pass
    output = log.read_text()
    assert proc.returncode == REQUEUE_EXIT_CODE, output[-3000:]
    logged = max(read_metrics(run_dir))  # the step the signal was acted on: saved, then both ranks exited 75
    assert (run_dir / "checkpoints" / f"step_{logged}" / "COMMITTED").is_file(), output[-3000:]
    assert (run_dir / "checkpoints" / "latest").read_text().strip() == f"step_{logged}"
    assert "launch: training processes exited with [75, 75] after SIGTERM: exit code 75" in output, output[-3000:]


def test_hung_rank_makes_launcher_exit_hang_code(shakespeare, tmp_path):
    """Rank 1 sleeps in step 2; both ranks' watchdogs exit 86 (ft.step_timeout_s=8); torchrun alone would say 1."""
    result = run_cli("launch", "local", "--nproc=2", str(TINY_CONFIG), "--train.steps=5", "--train.log_every=1",
                     "--ft.step_timeout_s=8", *SMALL, *data_overrides(shakespeare, tmp_path), timeout=300,
                     env={"PRETRAIN_TEST_FAULTS": "hang_rank=1,hang_step=2,hang_s=600"})
    output = result.stdout[-3000:] + result.stderr[-5000:]
    assert result.returncode == HANG_EXIT_CODE, output
    assert f"launch: exit code {HANG_EXIT_CODE} from the workers' exit codes" in result.stderr, output
