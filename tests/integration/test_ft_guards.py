"""Fault guards end to end through the real CLI, with faults injected by PRETRAIN_TEST_FAULTS:

- NaN/spike guard: a NaN loss (and a loss spike under ft.spike_policy=skip) leaves parameters and optimizer state
  bitwise as they were on every rank (ZeRO-0 single process, ZeRO-2/3 over DP=2, PP=2), training goes on with finite
  losses and the skips are counted; under ft.nan_policy=abort the run stops with one line naming the step.
- Hang watchdog: one rank of two sleeps inside step 2; both ranks print the watchdog line and their stacks and the
  job ends within the step timeout (plus the report's linger and a margin), instead of hanging for 600 s.
"""

from __future__ import annotations

import math
import re
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from pretrain.fault_tolerance import HANG_EXIT_CODE, NONFINITE_EXIT_CODE
from tests.conftest import REPO, TINY_CONFIG, cli_env, data_overrides, read_metrics, run_cli

SMALL = ["--model.num_layers=2", "--model.hidden_size=64", "--train.micro_batch_size=4", "--train.eval_batches=2"]
NAN_STEP, SPIKE_STEP, STEPS = 3, 5, 6
# Every step logged and checkpointed, so each step's parameters and optimizer state can be compared. The spike
# detector judges against the 3 previous losses; the injected spike (loss x 1000) is ~1e5 standard deviations out,
# ordinary steps stay far below 1e4.
GUARD_ARGS = [f"--train.steps={STEPS}", "--train.log_every=1", "--checkpoint.every_steps=1", "--checkpoint.keep_last=0",
              "--ft.spike_window=3", "--ft.spike_zscore=10000", "--ft.spike_policy=skip", *SMALL]
GUARD_FAULTS = {"PRETRAIN_TEST_FAULTS": f"nan_loss_step={NAN_STEP},spike_loss_step={SPIKE_STEP}"}


def engine_tensors(checkpoint: Path) -> dict[str, torch.Tensor]:
    """Every tensor in a checkpoint's DeepSpeed files (model states, and optimizer states with their fp32
    partitions under ZeRO), keyed by file and path; the per-rank train state (RNG, data position) is left out."""
    found = {}

    def walk(obj, key):
        if isinstance(obj, torch.Tensor):
            found[key] = obj
        elif isinstance(obj, dict):
            for k, v in obj.items():
                walk(v, f"{key}/{k}")
        elif isinstance(obj, (list, tuple)):
            for i, v in enumerate(obj):
                walk(v, f"{key}/{i}")

    files = sorted(p for p in checkpoint.glob("*.pt") if not p.name.startswith("train_state"))
    assert files, f"no DeepSpeed files in {checkpoint}"
    for path in files:
        walk(torch.load(path, map_location="cpu", weights_only=False), path.name)
    return found


def changed(run_dir: Path, before: int, after: int) -> list[str]:
    """Tensors that differ (not bitwise equal) between the checkpoints of two steps."""
    a, b = (engine_tensors(run_dir / "checkpoints" / f"step_{s}") for s in (before, after))
    assert a.keys() == b.keys()
    return [k for k in a if not torch.equal(a[k], b[k])]


def assert_guarded_run(result: subprocess.CompletedProcess, run_dir: Path) -> None:
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    metrics = read_metrics(run_dir)
    assert sorted(metrics) == list(range(1, STEPS + 1))
    assert math.isnan(metrics[NAN_STEP]["loss"])
    assert metrics[SPIKE_STEP]["loss"] > 1000 * 6 and metrics[SPIKE_STEP]["loss_spikes"] == 1
    assert all(math.isfinite(metrics[s]["loss"]) for s in metrics if s not in (NAN_STEP, SPIKE_STEP))
    assert [metrics[s]["skipped_steps"] for s in range(1, STEPS + 1)] == [0, 0, 1, 1, 2, 2]
    assert f"WARNING pretrain.trainer: step {NAN_STEP}: non-finite loss (nan); update skipped on every rank" \
        in result.stderr
    # The skipped steps changed nothing, not a parameter, not a moment, not Adam's step count ...
    assert changed(run_dir, NAN_STEP - 1, NAN_STEP) == []
    assert changed(run_dir, SPIKE_STEP - 1, SPIKE_STEP) == []
    # ... while the steps after them did update the parameters (the module's, or under ZeRO-3 their fp32
    # partitions), so the comparison does see updates when there are some.
    for step in (NAN_STEP, SPIKE_STEP):
        after = changed(run_dir, step, step + 1)
        assert any("/module/" in k or "/fp32_flat_groups/" in k for k in after), (step, after)


def test_nan_and_spike_skipped_zero0_single_process(shakespeare, tmp_path):
    result = run_cli("train", str(TINY_CONFIG), *GUARD_ARGS, *data_overrides(shakespeare, tmp_path),
                     env=GUARD_FAULTS, timeout=300)
    assert_guarded_run(result, tmp_path)


@pytest.mark.parametrize("zero_stage", [2, pytest.param(3, marks=pytest.mark.slow)])
def test_nan_and_spike_skipped_zero_data_parallel_2(zero_stage, shakespeare, tmp_path):
    result = run_cli("train", str(TINY_CONFIG), *GUARD_ARGS, f"--parallel.zero_stage={zero_stage}",
                     *data_overrides(shakespeare, tmp_path), env=GUARD_FAULTS, torchrun_nproc=2, timeout=300)
    assert_guarded_run(result, tmp_path)
    assert "parameters identical across 2 data-parallel replicas" in result.stderr


@pytest.mark.slow
def test_nan_and_spike_skipped_pipeline_2(shakespeare, tmp_path):
    result = run_cli("train", str(TINY_CONFIG), *GUARD_ARGS, "--parallel.pipeline=2", "--parallel.zero_stage=1",
                     "--train.global_batch_size=8", *data_overrides(shakespeare, tmp_path), env=GUARD_FAULTS,
                     torchrun_nproc=2, timeout=300)
    assert_guarded_run(result, tmp_path)


def test_nan_abort_stops_with_one_line(shakespeare, tmp_path):
    result = run_cli("train", str(TINY_CONFIG), "--train.steps=5", "--train.log_every=1", "--ft.nan_policy=abort",
                     *SMALL, *data_overrides(shakespeare, tmp_path), env={"PRETRAIN_TEST_FAULTS": "nan_loss_step=2"},
                     timeout=300)
    assert result.returncode == NONFINITE_EXIT_CODE, result.stdout[-3000:] + result.stderr[-3000:]
    errors = [line for line in result.stderr.splitlines() if line.startswith("error: ")]
    assert errors == ["error: step 2: non-finite loss (nan); update not applied; stopping (ft.nan_policy=abort)"]
    assert "Traceback" not in result.stderr
    assert sorted(read_metrics(tmp_path)) == [1]  # step 2 never completed


def test_hung_rank_makes_every_rank_dump_stacks_and_exit(shakespeare, tmp_path):
    """Rank 1 sleeps 600 s in step 2, rank 0 waits for it in the gradient all-reduce; ft.step_timeout_s=8."""
    timeout_s, linger_s = 8.0, 2.0  # the watchdog lingers min(10, timeout / 4) s so that peers dump too
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", "-m", "pretrain",
           "train", str(TINY_CONFIG), "--train.steps=5", "--train.log_every=1", f"--ft.step_timeout_s={timeout_s}",
           *SMALL, *data_overrides(shakespeare, tmp_path)]
    env = {**cli_env(), "PRETRAIN_TEST_FAULTS": "hang_rank=1,hang_step=2,hang_s=600"}
    log = tmp_path / "output.txt"
    with open(log, "w") as out:  # a file, not a pipe: a full pipe would stall the job and skew the timing
        proc = subprocess.Popen(cmd, cwd=REPO, env=env, stdout=out, stderr=subprocess.STDOUT)
        metrics, deadline = tmp_path / "metrics.jsonl", time.monotonic() + 300
        while not (metrics.exists() and metrics.read_text().strip()):  # step 1 done: step 2 starts now
            assert proc.poll() is None, log.read_text()[-3000:]
            assert time.monotonic() < deadline, "step 1 never finished"
            time.sleep(0.05)
        step_2_started = time.monotonic()
        try:
            proc.wait(timeout=120)
        finally:
            proc.kill()
        elapsed = time.monotonic() - step_2_started
    output = log.read_text()
    assert proc.returncode != 0
    for rank in (0, 1):
        line = f"rank {rank}: forward/backward of step 2 exceeded ft.step_timeout_s={timeout_s:g} s"
        assert f"{line}; Python stacks follow" in output, output[-5000:]
    assert "in injected_faults" in output  # rank 1's sleeping frame
    assert "in all_reduce" in output  # rank 0 stuck in the collective waiting for rank 1
    codes = re.findall(r"exitcode\s*:\s*(-?\d+)", output)  # torchrun's report of each rank's exit
    assert len(codes) >= 2 and set(codes) == {str(HANG_EXIT_CODE)}, output[-3000:]
    assert timeout_s <= elapsed < timeout_s + linger_s + 15, elapsed
