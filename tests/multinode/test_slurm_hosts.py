"""`pretrain launch slurm --nodes 2` on a real three-node Slurm (scripts/slurm_hosts.sh): slurmctld on host 0, one
slurmd per network-namespace host, each with its own hostname and address. srun really spans two nodes, the
launchers rendezvous over the network, and the requeue template survives what clusters do to jobs:

- the two-node job finishes with a complete checkpoint;
- a rank frozen (SIGSTOP) on one node: every rank exits 86, that node's launcher names itself, and the requeued
  job runs without it (ExcNodeList); then a whole node dies (every process of the host, slurmd included): Slurm
  marks it DOWN and requeues the job, which waits until the node is back, resumes and ends at the uninterrupted
  job's loss.
"""

from __future__ import annotations

import re
import subprocess
import time
from pathlib import Path

import psutil
import pytest

from tests.conftest import REPO, TINY_CONFIG, cli_env, data_overrides, read_metrics, run_cli
from tests.multinode.hosts import Hosts

pytestmark = [pytest.mark.multinode, pytest.mark.slurm, pytest.mark.slow]

SCRIPT = REPO / "scripts" / "slurm_hosts.sh"
BED = "slh"
STEPS = 60
TRAIN_ARGS = [f"--train.steps={STEPS}", "--train.log_every=1", "--checkpoint.every_steps=5",
              "--model.num_layers=2", "--model.hidden_size=64", "--train.micro_batch_size=4",
              "--ft.step_timeout_s=8"]


class SlurmHosts(Hosts):
    """The bed of scripts/slurm_hosts.sh: Hosts plus Slurm commands run on host 0 against its controller."""

    def __init__(self, count: int, state_dir: Path):
        super().__init__(BED, count)
        self.state_dir = state_dir

    def __enter__(self) -> "SlurmHosts":
        subprocess.run(["bash", str(SCRIPT), "down", BED], capture_output=True)
        up = subprocess.run(["bash", str(SCRIPT), "up", BED, str(self.count), str(self.state_dir)],
                            capture_output=True, text=True, timeout=300)
        assert up.returncode == 0, up.stdout[-2000:] + up.stderr[-3000:]
        return self

    def slurm(self, *cmd: str, input: str | None = None, env: dict[str, str] | None = None) -> str:
        out = subprocess.run(["bash", str(SCRIPT), "run", BED, "0", *cmd], input=input, capture_output=True,
                             text=True, env={**cli_env(), **(env or {})}, cwd=REPO, timeout=60)
        assert out.returncode == 0, (cmd, out.stdout[-2000:], out.stderr[-2000:])
        return out.stdout

    def job(self, job_id: str) -> dict[str, str]:
        return dict(re.findall(r"(\w+)=(\S*)", self.slurm("scontrol", "-o", "show", "job", job_id)))

    def restart_slurmd(self, i: int) -> None:
        subprocess.run(["bash", str(SCRIPT), "slurmd", BED, str(i)], check=True, capture_output=True, timeout=60)


@pytest.fixture(scope="module")
def cluster(tmp_path_factory):
    with SlurmHosts(3, tmp_path_factory.mktemp("slurm-hosts")) as bed:
        yield bed


def submit(cluster: SlurmHosts, data, run_dir: Path, *launch_args: str,
           env: dict[str, str] | None = None) -> tuple[str, Path]:
    log = run_dir.parent / f"{run_dir.name}.log"
    rendered = run_cli("launch", "slurm", "--nodes=2", "--gpus-per-node=0", "--procs-per-node=1",
                       "--cpus-per-task=1", f"--output={log}", "--dry-run", *launch_args, str(TINY_CONFIG),
                       *TRAIN_ARGS, *data_overrides(data, run_dir))
    assert rendered.returncode == 0, rendered.stderr[-2000:]
    (run_dir.parent / f"{run_dir.name}.sbatch").write_text(rendered.stdout)
    return cluster.slurm("sbatch", "--parsable", input=rendered.stdout, env=env).strip().split(";")[0], log


def wait_until(predicate, what: str, log: Path, timeout: float = 300) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            pytest.fail(f"{what} did not happen within {timeout:.0f} s:\n"
                        + (log.read_text()[-4000:] if log.exists() else "(no log)"))
        time.sleep(0.5)


def finished(cluster: SlurmHosts, job_id: str) -> bool:
    return cluster.job(job_id).get("JobState") in ("COMPLETED", "FAILED", "CANCELLED", "TIMEOUT")


def logged(run_dir: Path, step: int) -> bool:
    return (run_dir / "metrics.jsonl").exists() and step in read_metrics(run_dir)


@pytest.fixture(scope="module")
def two_node_job(cluster, shakespeare, tmp_path_factory) -> Path:
    run_dir = tmp_path_factory.mktemp("slurm-two-nodes") / "run"
    job_id, log = submit(cluster, shakespeare, run_dir)
    wait_until(lambda: finished(cluster, job_id), f"job {job_id}", log)
    fields = cluster.job(job_id)
    assert fields["JobState"] == "COMPLETED" and fields["ExitCode"] == "0:0", log.read_text()[-4000:]
    return run_dir


def test_two_node_job_spans_two_hosts_and_checkpoints(two_node_job):
    output = (two_node_job.parent / "run.log").read_text()
    nodes = re.search(r"world 2 rank\(s\) on 2 node\(s\): (\S+), (\S+)", output)
    assert nodes and nodes[1] != nodes[2] and all(n.startswith(f"{BED}-h") for n in nodes.groups()), output[-3000:]
    assert re.search(rf"rendezvous {BED}-h\d:\d+", output)  # the first node's name, which every node resolves
    assert "'tensor': 1" in output and "'data': 2" in output
    assert sorted(read_metrics(two_node_job)) == list(range(1, STEPS + 1))
    assert (two_node_job / "checkpoints" / f"step_{STEPS}" / "COMMITTED").is_file()


def job_hosts(cluster: SlurmHosts, job_id: str) -> list[int]:
    """Host indices of the job's nodes (slh-h[0-1] or slh-h0,slh-h2 style lists)."""
    nodelist = cluster.job(job_id)["NodeList"]
    return sorted(int(i) for i in re.findall(r"\d+", cluster.slurm("scontrol", "show", "hostnames", nodelist)))


def test_hang_excludes_the_node_and_a_lost_node_requeues_then_resumes(cluster, two_node_job, shakespeare,
                                                                       tmp_path):
    run_dir = tmp_path / "run"
    # 0.3 s of sleep in every step (no number changes): each run of the job lasts long enough to be interrupted
    # at the moment the test chooses (a tiny step takes ~0.05 s; a run of 60 would end before the test looks).
    job_id, log = submit(cluster, shakespeare, run_dir, "--requeue",
                         env={"PRETRAIN_TEST_FAULTS": "step_sleep_s=0.3"})
    wait_until(lambda: logged(run_dir, 6), "step 6 (after the checkpoint of step 5)", log)
    first = job_hosts(cluster, job_id)
    batch_host = int(re.search(r"\d+", cluster.job(job_id)["BatchHost"])[0])
    frozen = next(h for h in first if h != batch_host)
    worker = next(psutil.Process(pid) for pid in cluster.pids(frozen)
                  if "train" in psutil.Process(pid).cmdline() and "launch" not in psutil.Process(pid).cmdline())
    worker.suspend()  # SIGSTOP
    # The hang: every rank 86, the frozen rank's node names itself, the job is requeued without it.
    wait_until(lambda: f"hang on {BED}-h{frozen}; excluding it" in log.read_text(), "the exclusion", log)
    wait_until(lambda: int(cluster.job(job_id).get("Restarts", 0)) >= 1 and "resumed from" in log.read_text(),
               "the first requeue", log)
    second = job_hosts(cluster, job_id)
    assert frozen not in second, (first, second)
    assert f"{BED}-h{frozen}" in cluster.job(job_id)["ExcNodeList"]
    # A whole node dies while the second run trains: Slurm notices (SlurmdTimeout) and requeues the job.
    logged_now = len((run_dir / "metrics.jsonl").read_text().splitlines())
    wait_until(lambda: len((run_dir / "metrics.jsonl").read_text().splitlines()) > logged_now + 1,
               "a step of the second run", log)
    lost = next(h for h in second if h != int(re.search(r"\d+", cluster.job(job_id)["BatchHost"])[0]))
    for pid in cluster.pids(lost):
        psutil.Process(pid).kill()
    wait_until(lambda: int(cluster.job(job_id).get("Restarts", 0)) >= 2, "the requeue after the node loss", log,
               timeout=120)
    cluster.restart_slurmd(lost)  # the node comes back (its hardware replaced); the job can run again
    wait_until(lambda: finished(cluster, job_id), f"job {job_id} to finish", log, timeout=400)
    fields, output = cluster.job(job_id), log.read_text()
    assert fields["JobState"] == "COMPLETED" and fields["ExitCode"] == "0:0", output[-4000:]
    assert output.count("resumed from") >= 2 and "SLURM_RESTART_COUNT=2" in output, output[-4000:]
    assert "training step exited with 86" in output
    rank_reports = sorted(p.name for p in (run_dir / "hang").glob("rank_*.txt"))
    assert rank_reports == ["rank_0.txt", "rank_1.txt"]
    assert "no hang report of its own" in "".join(p.read_text() for p in (run_dir / "hang").glob("rank_*.txt"))
    final = read_metrics(run_dir)[STEPS]["loss"]
    assert final == pytest.approx(read_metrics(two_node_job)[STEPS]["loss"], rel=1e-5)
