"""Network-namespace "hosts" for multi-node tests: a thin Python face of scripts/netns_hosts.sh.

``with Hosts("mn", 2) as hosts:`` creates hosts ``mn-h0`` and ``mn-h1`` (10.231.0.1, 10.231.0.2, each with its own
hostname), ``hosts.popen(1, argv)`` runs a command on host 1, and leaving the block kills every process in the
bed's namespaces (by PID, whoever started them) and deletes the namespaces by name, also when the test failed.
"""

from __future__ import annotations

import os
import shutil
import subprocess
from pathlib import Path

SCRIPT = Path(__file__).resolve().parents[2] / "scripts" / "netns_hosts.sh"
SUBNET = "10.231.0"


def namespaces_refused() -> str | None:
    """Why this machine cannot build a bed (a skip reason), or None when it can."""
    if os.geteuid() != 0:
        return "network-namespace hosts need root"
    for tool in ("ip", "nsenter", "unshare"):
        if not shutil.which(tool):
            return f"network-namespace hosts need `{tool}` (iproute2, util-linux)"
    probe = subprocess.run(["bash", str(SCRIPT), "up", "probe", "1"], capture_output=True, text=True)
    subprocess.run(["bash", str(SCRIPT), "down", "probe"], capture_output=True)
    return None if probe.returncode == 0 else f"network namespaces refused here: {probe.stderr.strip()}"


class Hosts:
    """N namespace hosts on one private bridge; a context manager that always tears down."""

    def __init__(self, bed: str, count: int):
        self.bed, self.count = bed, count
        self.procs: list[subprocess.Popen] = []

    def __enter__(self) -> "Hosts":
        subprocess.run(["bash", str(SCRIPT), "down", self.bed], capture_output=True)  # leftovers of a killed run
        subprocess.run(["bash", str(SCRIPT), "up", self.bed, str(self.count)], check=True, capture_output=True)
        return self

    def __exit__(self, *exc) -> None:
        self.down()

    def down(self) -> None:
        subprocess.run(["bash", str(SCRIPT), "down", self.bed], capture_output=True)
        for proc in self.procs:  # the `ip netns exec` parents died with their namespace's processes: reap them
            try:
                proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                proc.kill()

    def name(self, i: int) -> str:
        """Host i's hostname (also its namespace's name)."""
        return f"{self.bed}-h{i}"

    def address(self, i: int) -> str:
        return f"{SUBNET}.{i + 1}"

    def argv(self, i: int, cmd: list[str]) -> list[str]:
        """``cmd`` as run on host i."""
        return ["bash", str(SCRIPT), "run", self.bed, str(i), *cmd]

    def popen(self, i: int, cmd: list[str], **kwargs) -> subprocess.Popen:
        """Start ``cmd`` on host i (Popen keyword arguments pass through); torn down with the bed."""
        proc = subprocess.Popen(self.argv(i, cmd), **kwargs)
        self.procs.append(proc)
        return proc

    def run(self, i: int, cmd: list[str], **kwargs) -> subprocess.CompletedProcess:
        return subprocess.run(self.argv(i, cmd), **kwargs)

    def pids(self, i: int) -> list[int]:
        """Every process on host i now (its network namespace's, the `ip netns exec` wrappers included)."""
        out = subprocess.run(["ip", "netns", "pids", self.name(i)], capture_output=True, text=True).stdout
        return [int(pid) for pid in out.split()]
