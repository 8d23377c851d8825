"""A real one-node Slurm for the tests in this directory: scripts/slurm_cluster.sh brings it up (apt-installing
munge/slurmctld/slurmd/slurm-client on a fresh machine) once per session and stops it at the end if it started it."""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import time
from pathlib import Path

import pytest

from tests.conftest import REPO

CLUSTER_SCRIPT = REPO / "scripts" / "slurm_cluster.sh"


@pytest.fixture(scope="session")
def slurm_cluster():
    """Start (idempotently) the test cluster; yields when `sinfo` shows the node idle."""
    if os.geteuid() != 0 or not (shutil.which("apt-get") or shutil.which("slurmctld")):
        pytest.skip("the Slurm test cluster needs root and Debian packages (apt-get)")
    was_running = subprocess.run(["bash", str(CLUSTER_SCRIPT), "status"], capture_output=True).returncode == 0
    started = subprocess.run(["bash", str(CLUSTER_SCRIPT), "start"], capture_output=True, text=True, timeout=600)
    assert started.returncode == 0, started.stdout[-2000:] + started.stderr[-2000:]
    yield
    if not was_running:
        subprocess.run(["bash", str(CLUSTER_SCRIPT), "stop"], capture_output=True, timeout=120)


def job_fields(job_id: str) -> dict[str, str]:
    """`scontrol show job` as {key: value} (JobState, ExitCode, Restarts, ...); {} once the job is forgotten."""
    out = subprocess.run(["scontrol", "-o", "show", "job", job_id], capture_output=True, text=True).stdout
    return dict(re.findall(r"(\w+)=(\S*)", out))


def wait_for_job(job_id: str, log: Path, timeout: float = 300) -> dict[str, str]:
    """Wait until the job has left the queue for good (requeues included); cancels it and fails on timeout."""
    deadline = time.monotonic() + timeout
    while True:
        fields = job_fields(job_id)
        if fields.get("JobState") in ("COMPLETED", "FAILED", "CANCELLED", "TIMEOUT", "NODE_FAIL", "OUT_OF_MEMORY"):
            return fields
        if time.monotonic() > deadline:
            subprocess.run(["scancel", job_id])
            tail = log.read_text()[-3000:] if log.exists() else "(no log)"
            pytest.fail(f"job {job_id} still {fields.get('JobState')} after {timeout:.0f} s:\n{tail}")
        time.sleep(1)


def wait_for_file_text(path: Path, text: str, job_id: str, log: Path, timeout: float = 180) -> None:
    """Wait until ``path`` contains ``text`` (e.g. a step in metrics.jsonl) while the job runs."""
    deadline = time.monotonic() + timeout
    while not (path.exists() and text in path.read_text()):
        state = job_fields(job_id).get("JobState")
        if state not in ("PENDING", "RUNNING", "CONFIGURING") or time.monotonic() > deadline:
            tail = log.read_text()[-3000:] if log.exists() else "(no log)"
            pytest.fail(f"job {job_id} ({state}) never wrote {text!r} to {path}:\n{tail}")
        time.sleep(0.2)
