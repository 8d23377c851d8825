"""`pretrain launch local` on two network-namespace hosts (tests/multinode/hosts.py): real hostnames, a real
network between them, gloo and the c10d rendezvous over it; nothing on 127.0.0.1.

- Two hosts x 2 processes at TP=2 x DP=2 (tensor-parallel pairs within a host, data-parallel replicas across the
  hosts, as on GPU clusters where TP stays on NVLink) train to the losses of one 4-process run on one host.
- A lost host (every process of host 1 SIGKILLed) is survived with --max-restarts 1: host 0's agent restarts the
  group, host 1 comes back and rejoins, the job resumes from its newest checkpoint and ends at the same loss.
  Here one process per host, so the tensor-parallel pairs span the hosts.
- A host that never arrives ends the launch within ft.startup_timeout_s with one error line.
- A rank frozen with SIGSTOP on host 1: every rank exits 86 (host 1's launcher reports and kills the frozen one),
  hang reports under run_dir/hang name the step and collective of each rank.
"""

from __future__ import annotations

import signal
import subprocess
import sys
import time
from pathlib import Path

import psutil
import pytest

from pretrain.fault_tolerance import HANG_EXIT_CODE
from tests.conftest import REPO, TINY_CONFIG, cli_env, data_overrides, read_metrics, run_cli
from tests.multinode.hosts import Hosts

pytestmark = [pytest.mark.multinode, pytest.mark.slow]

STEPS = 8
# The global batch is fixed, so one process per host (DP=1, 2 micro-batches accumulated) and two (DP=2) train on
# the same samples in the same order.
TRAIN_ARGS = [f"--train.steps={STEPS}", "--train.log_every=1", "--model.num_layers=2", "--model.hidden_size=64",
              "--train.micro_batch_size=4", "--train.global_batch_size=8", "--parallel.tensor=2"]
PORT = 29400  # each bed is a network of its own: any port is free there


def losses(run_dir: Path) -> dict[int, float]:
    return {step: record["loss"] for step, record in read_metrics(run_dir).items()}


@pytest.fixture(scope="module")
def hosts():
    with Hosts("mnt", 2) as bed:
        yield bed


@pytest.fixture(scope="module")
def one_host_reference(shakespeare, tmp_path_factory) -> dict[int, float]:
    """One 4-process torchrun on this machine (TP=2 x DP=2), no checkpoints."""
    run_dir = tmp_path_factory.mktemp("one-host")
    result = run_cli("train", str(TINY_CONFIG), *TRAIN_ARGS, "--checkpoint.every_steps=0",
                     *data_overrides(shakespeare, run_dir), torchrun_nproc=4)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    found = losses(run_dir)
    assert sorted(found) == list(range(1, STEPS + 1))
    return found


def launch_cmd(host: int, nproc: int, run_dir: Path, data, *extra: str, hosts: Hosts) -> list[str]:
    return [sys.executable, "-m", "pretrain", "launch", "local", f"--nproc={nproc}", "--nnodes=2",
            f"--node-rank={host}", f"--rdzv-endpoint={hosts.name(0)}:{PORT}", f"--rdzv-id={run_dir.name}",
            str(TINY_CONFIG), *TRAIN_ARGS, *data_overrides(data, run_dir), *extra]


def start(hosts: Hosts, host: int, cmd: list[str], log: Path) -> subprocess.Popen:
    # torchrun pins one intra-op thread per worker only with several workers per node; the reference had 4, so
    # every run here pins it (the thread count changes CPU reduction order, hence the last bits of the loss).
    with open(log, "a") as out:
        return hosts.popen(host, cmd, cwd=REPO, env={**cli_env(), "OMP_NUM_THREADS": "1"}, stdout=out,
                           stderr=subprocess.STDOUT)


def wait_all(procs: list[subprocess.Popen], logs: list[Path], timeout: float = 600) -> list[int]:
    deadline = time.monotonic() + timeout
    for proc in procs:
        try:
            proc.wait(timeout=max(1.0, deadline - time.monotonic()))
        except subprocess.TimeoutExpired:
            pytest.fail("a host's launcher did not finish:\n" + "\n".join(log.read_text()[-3000:] for log in logs))
    return [proc.returncode for proc in procs]


def wait_for_step(run_dir: Path, step: int, procs: list[subprocess.Popen], logs: list[Path],
                  timeout: float = 300) -> None:
    deadline = time.monotonic() + timeout
    while not ((run_dir / "metrics.jsonl").exists() and step in read_metrics(run_dir)):
        if time.monotonic() > deadline or any(p.poll() is not None for p in procs):
            pytest.fail(f"step {step} never logged:\n" + "\n".join(log.read_text()[-3000:] for log in logs))
        time.sleep(0.1)


def test_two_hosts_train_like_one_host(hosts, one_host_reference, shakespeare, tmp_path):
    run_dir = tmp_path / "run"
    logs = [tmp_path / f"host{i}.log" for i in (0, 1)]
    procs = [start(hosts, i, launch_cmd(i, 2, run_dir, shakespeare, "--checkpoint.every_steps=0",
                                        "--ft.preflight_allreduce_mib=64", hosts=hosts), logs[i]) for i in (0, 1)]
    assert wait_all(procs, logs) == [0, 0], "\n".join(log.read_text()[-3000:] for log in logs)
    host0 = logs[0].read_text()
    # The preflight block: both hosts joined, every rank agreed, the all-reduce went over the veth.
    assert f"world 4 rank(s) on 2 node(s): {hosts.name(0)}, {hosts.name(1)}" in host0, host0[-3000:]
    assert "all-reduce of 64 MiB per rank" in host0 and "bus bandwidth" in host0
    assert "'tensor': 2" in host0 and "'data': 2" in host0
    found = losses(run_dir)
    assert sorted(found) == sorted(one_host_reference)
    for step, loss in one_host_reference.items():
        assert found[step] == pytest.approx(loss, rel=1e-5), step


def test_lost_host_elastic_restart_resumes_to_the_same_loss(hosts, one_host_reference, shakespeare, tmp_path):
    run_dir = tmp_path / "run"
    logs = [tmp_path / f"host{i}.log" for i in (0, 1)]
    cmds = [launch_cmd(i, 1, run_dir, shakespeare, "--checkpoint.every_steps=2", "--max-restarts=1",
                       hosts=hosts) for i in (0, 1)]
    procs = [start(hosts, i, cmds[i], logs[i]) for i in (0, 1)]
    wait_for_step(run_dir, 3, procs, logs)
    killed_at = time.monotonic()
    for pid in hosts.pids(1):  # the whole host: launcher, worker, everything in its namespace
        try:
            psutil.Process(pid).kill()
        except psutil.NoSuchProcess:
            pass
    procs[1].wait(timeout=30)
    logged_before = len((run_dir / "metrics.jsonl").read_text().splitlines())
    procs[1] = start(hosts, 1, cmds[1], logs[1])  # the node comes back (a replacement, or the same after reboot)
    deadline = time.monotonic() + 300
    while len((run_dir / "metrics.jsonl").read_text().splitlines()) == logged_before:
        assert time.monotonic() < deadline and procs[0].poll() is None, logs[0].read_text()[-3000:]
        time.sleep(0.1)
    restart_s = time.monotonic() - killed_at
    assert wait_all(procs, logs) == [0, 0], "\n".join(log.read_text()[-3000:] for log in logs)
    host0 = logs[0].read_text()
    assert host0.count("resumed from") == 1, host0[-3000:]  # the restarted group resumed; nothing else did
    final = losses(run_dir)[STEPS]
    assert final == pytest.approx(one_host_reference[STEPS], rel=1e-5)
    print(f"lost host: kill -> first step after resume {restart_s:.1f} s")


def test_a_host_that_never_arrives_is_one_error_within_the_startup_timeout(hosts, shakespeare, tmp_path):
    log = tmp_path / "host0.log"
    start_time = time.monotonic()
    proc = start(hosts, 0, launch_cmd(0, 1, tmp_path, shakespeare, "--ft.startup_timeout_s=15", hosts=hosts), log)
    assert wait_all([proc], [log], timeout=120) == [1]
    elapsed = time.monotonic() - start_time
    text = log.read_text()
    assert "launch: not all 2 nodes arrived at the rendezvous" in text and "within 15 s" in text, text[-3000:]
    assert elapsed < 15 + 60, elapsed  # the join timeout, plus start-up of Python and torch on a busy machine


def test_a_frozen_rank_ends_every_rank_with_the_hang_code_and_reports(hosts, shakespeare, tmp_path):
    timeout_s = 8
    run_dir = tmp_path / "run"
    logs = [tmp_path / f"host{i}.log" for i in (0, 1)]
    procs = [start(hosts, i, launch_cmd(i, 1, run_dir, shakespeare, "--train.steps=500",
                                        "--checkpoint.every_steps=0", f"--ft.step_timeout_s={timeout_s}",
                                        hosts=hosts), logs[i]) for i in (0, 1)]
    wait_for_step(run_dir, 3, procs, logs)
    worker = next(psutil.Process(pid) for pid in hosts.pids(1)
                  if "train" in psutil.Process(pid).cmdline() and "launch" not in psutil.Process(pid).cmdline())
    worker.send_signal(signal.SIGSTOP)
    frozen_at = time.monotonic()
    codes = wait_all(procs, logs, timeout=120)
    elapsed = time.monotonic() - frozen_at
    output = "\n".join(log.read_text() for log in logs)
    assert codes == [HANG_EXIT_CODE, HANG_EXIT_CODE], output[-4000:]
    # Stated bound: step timeout + the watchdog's linger (timeout/4 = 2 s) + the launcher's grace (5 s) + polls.
    assert elapsed < timeout_s + 2 + 5 + 30, elapsed
    rank0 = (run_dir / "hang" / "rank_0.txt").read_text()
    # Where rank 0 waits for the frozen peer: inside a collective, or on an asynchronous one's handle.wait().
    assert "exceeded ft.step_timeout_s=8 s" in rank0, rank0[:2000]
    assert "in collective" in rank0 or "waiting on an asynchronous collective" in rank0, rank0[:2000]
    assert "Thread" in rank0 or "File" in rank0  # the Python stacks follow the two lines
    rank1 = (run_dir / "hang" / "rank_1.txt").read_text()
    assert f"host {hosts.name(1)}" in rank1 and "no hang report of its own" in rank1 and "stopped" in rank1, rank1
    assert "rank 0 (host mnt-h0" in output and "collective" in output  # the log names where rank 0 waited
    print(f"frozen rank: SIGSTOP -> every node exited {HANG_EXIT_CODE} in {elapsed:.1f} s")
