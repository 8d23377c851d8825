"""`pretrain launch slurm` on a real slurmctld + slurmd (one node, CPU, gloo): the rendered templates train a
2-task tiny GPT; a USR1 (scancel) or a pre-emption by a higher-priority partition makes the job checkpoint, exit 75,
requeue itself and resume, ending bitwise where an uninterrupted job ends. The multi-node template runs on a
three-node cluster of namespace hosts: tests/multinode/test_slurm_hosts.py."""

from __future__ import annotations

import subprocess
from pathlib import Path

import pytest

from tests.conftest import TINY_CONFIG, data_overrides, read_metrics, run_cli
from tests.slurm.conftest import job_fields, wait_for_file_text, wait_for_job

pytestmark = [pytest.mark.slurm, pytest.mark.slow]

STEPS = 12
TRAIN_ARGS = [f"--train.steps={STEPS}", "--train.log_every=1", "--checkpoint.every_steps=6",
              "--model.num_layers=2", "--model.hidden_size=64", "--train.micro_batch_size=4"]
SIGNAL_AFTER_STEP = 3
# Rank 0 sleeps 8 s inside the next step, so the signal surely arrives mid-run (a tiny step takes ~0.05 s); the
# sleep changes no number. The rerun resumes past that step and does not sleep again.
SLOW_STEP = {"PRETRAIN_TEST_FAULTS": f"hang_rank=0,hang_step={SIGNAL_AFTER_STEP + 1},hang_s=8"}


def submit(data, run_dir: Path, *launch_args: str, env: dict[str, str] | None = None) -> tuple[str, Path]:
    """`pretrain launch slurm` (2 CPU tasks, no GPUs) of the tiny config; returns (job id, log path)."""
    log = run_dir.parent / f"{run_dir.name}.log"
    result = run_cli("launch", "slurm", "--gpus-per-node=0", "--procs-per-node=2", f"--output={log}",
                     f"--script={run_dir.parent / (run_dir.name + '.sbatch')}", *launch_args, str(TINY_CONFIG),
                     *TRAIN_ARGS, *data_overrides(data, run_dir), env=env)
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-2000:]
    return result.stdout.split("submitted job ")[1].split()[0], log


@pytest.fixture(scope="module")
def uninterrupted(slurm_cluster, shakespeare, tmp_path_factory) -> Path:
    """The single-node template, run to the end: the reference for the interrupted jobs."""
    run_dir = tmp_path_factory.mktemp("slurm") / "reference"
    job_id, log = submit(shakespeare, run_dir)
    fields = wait_for_job(job_id, log)
    output = log.read_text()
    assert fields["JobState"] == "COMPLETED" and fields["ExitCode"] == "0:0", output[-3000:]
    return run_dir


def test_sbatch_two_task_training_completes(uninterrupted):
    output = (uninterrupted.parent / "reference.log").read_text()
    assert "'data': 2" in output  # srun's 2 tasks became one data-parallel world of 2 (SLURM_* → RANK/WORLD_SIZE)
    assert "parameters identical across 2 data-parallel replicas" in output
    metrics = read_metrics(uninterrupted)
    assert sorted(metrics) == list(range(1, STEPS + 1))
    assert metrics[STEPS]["loss"] < metrics[1]["loss"]
    checkpoints = uninterrupted / "checkpoints"
    assert (checkpoints / f"step_{STEPS}" / "COMMITTED").is_file()
    assert (checkpoints / "latest").read_text().strip() == f"step_{STEPS}"


def assert_requeued_and_resumed(run_dir: Path, log: Path, job_id: str, reference: Path, cause: str) -> None:
    fields = wait_for_job(job_id, log)
    output = log.read_text()  # --open-mode=append: both runs of the job
    assert fields["JobState"] == "COMPLETED" and fields["ExitCode"] == "0:0", output[-3000:]
    assert fields["Restarts"] == "1", output[-3000:]
    assert f"caught {cause}; asking the tasks to checkpoint" in output
    assert "training step exited with 75" in output and f"requeueing job {job_id}" in output
    assert "SLURM_RESTART_COUNT=0" in output and "SLURM_RESTART_COUNT=1" in output
    resumed_at = int(output.split("resumed from ")[1].split(" at step ")[1].split()[0])
    assert SIGNAL_AFTER_STEP <= resumed_at < STEPS, output[-3000:]
    # The signal's checkpoint was committed before the exit (since pruned by checkpoint.keep_last=2).
    assert output.index(f"checkpoint step_{resumed_at} committed") < output.index("training step exited with 75")
    ours, ref = read_metrics(run_dir), read_metrics(reference)
    assert sorted(ours) == list(range(1, STEPS + 1))
    for step in range(resumed_at + 1, STEPS + 1):  # bitwise on CPU: same weights, optimizer, data position, RNG
        assert ours[step]["loss"] == ref[step]["loss"], (step, ours[step]["loss"], ref[step]["loss"])


def test_usr1_checkpoints_requeues_and_resumes(uninterrupted, shakespeare, tmp_path):
    run_dir = tmp_path / "usr1"
    job_id, log = submit(shakespeare, run_dir, "--requeue", env=SLOW_STEP)
    wait_for_file_text(run_dir / "metrics.jsonl", f'"step": {SIGNAL_AFTER_STEP},', job_id, log)
    subprocess.run(["scancel", "--signal=USR1", "--batch", job_id], check=True)
    assert_requeued_and_resumed(run_dir, log, job_id, uninterrupted, cause="USR1")


def test_preemption_by_higher_priority_partition_requeues_and_resumes(uninterrupted, shakespeare, tmp_path):
    run_dir = tmp_path / "preempted"
    job_id, log = submit(shakespeare, run_dir, "--requeue", "--partition=debug", env=SLOW_STEP)
    wait_for_file_text(run_dir / "metrics.jsonl", f'"step": {SIGNAL_AFTER_STEP},', job_id, log)
    # All of the node's CPUs in the PriorityTier=10 partition: only pre-empting our job frees them.
    urgent = subprocess.run(["sbatch", "--parsable", "--partition=urgent", "--ntasks=4",
                             f"--output={tmp_path / 'urgent.log'}", "--wrap=echo urgent ran"],
                            capture_output=True, text=True, check=True).stdout.strip()
    assert_requeued_and_resumed(run_dir, log, job_id, uninterrupted, cause="USR1")
    assert wait_for_job(urgent, tmp_path / "urgent.log")["JobState"] == "COMPLETED"
    assert "urgent ran" in (tmp_path / "urgent.log").read_text()
    # The pre-emption happened while our job ran: the urgent job started before our job's rerun ended.
    assert job_fields(urgent)["StartTime"] <= job_fields(job_id)["EndTime"]
