"""Fail-fast checks of a multi-process job before its first step, logged by rank 0 in one block.

A job that is wired wrongly should fail in seconds with a line that says what is wrong, not train for hours in a
state nobody asked for. The classic multi-node mistakes each get a check:

- **A loopback rendezvous.** ``--rdzv-endpoint localhost:29500`` (or a MASTER_ADDR that resolves to 127.0.0.1) on
  every node makes each node meet only itself: N jobs train alone, each on 1/N of the data, all silently.
  :func:`check_rendezvous_host` refuses it in the launcher; :func:`run` also compares the hosts that joined with
  the node count the launcher asked for (``PRETRAIN_NNODES``).
- **Ranks that disagree** on world size, config, code or data (a node with a stale checkout, an override typed on
  one node, another dataset mounted at the same path): :func:`run` gathers a fingerprint from every rank and
  names the first rank and field that differ from rank 0's.
- **A slow or broken interconnect** (NCCL on the wrong interface, a flapping link): a timed all-reduce of
  ``ft.preflight_allreduce_mib`` per rank reports its bus bandwidth, logged and exported to Prometheus.

A host that never arrives is the launcher's to report (torchrun's rendezvous ``join_timeout``, which ``pretrain
launch local`` sets to ft.startup_timeout_s); a rank that arrives and then stops is the watchdog's.
"""

from __future__ import annotations

import dataclasses
import hashlib
import ipaddress
import json
import logging
import os
import socket
import time
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist

from pretrain.errors import ConfigError

logger = logging.getLogger(__name__)

#: Environment variable the launchers set to the number of nodes they started (torchrun's own GROUP_WORLD_SIZE
#: is what joined, which is exactly what a loopback rendezvous gets wrong).
NNODES_ENV = "PRETRAIN_NNODES"

#: Source trees whose files make up the code version every rank must share.
_CODE_PACKAGES = ("pretrain", "data_pipeline")


class PreflightError(ConfigError):
    """The job is wired wrongly (exit code 2, one line, on every rank alike)."""


@dataclasses.dataclass(frozen=True)
class PreflightReport:
    """What the checks measured (rank 0 logs it; the exporter serves the bandwidth)."""

    world_size: int
    hosts: tuple[str, ...]  # one per node, in rank order of their first rank
    allreduce_mib: float
    allreduce_s: float | None  # None: not measured (a world of one, or ft.preflight_allreduce_mib 0)
    bus_bandwidth_gbps: float | None  # GB/s (1e9 bytes), NCCL-tests' "busbw" convention
    seconds: float  # the whole preflight


def check_rendezvous_host(host: str, nnodes: int, flag: str = "--rdzv-endpoint") -> None:
    """Refuse a rendezvous host that does not resolve, or resolves to a loopback address while the job spans
    more than one node (every node would then meet only itself)."""
    if nnodes <= 1:
        return
    try:
        addresses = {info[4][0] for info in socket.getaddrinfo(host, None)}
    except socket.gaierror as e:
        raise ConfigError(f"{flag}: host {host!r} does not resolve on {socket.gethostname()} ({e.strerror}); "
                          "every node must reach the rendezvous at that name") from None
    loopback = sorted(a for a in addresses if ipaddress.ip_address(a.split("%")[0]).is_loopback)
    if loopback:
        raise ConfigError(f"{flag}: host {host!r} resolves to loopback {loopback[0]} with {nnodes} nodes: each node "
                          "would rendezvous with itself and train alone; use node 0's address on the cluster network")


def code_version() -> str:
    """Package version plus a digest of every source file of the packages (not git: a deployed copy has none)."""
    from pretrain import __version__

    digest = hashlib.sha256()
    root = Path(__file__).resolve().parents[2]
    for package in _CODE_PACKAGES:
        for path in sorted((root / package).rglob("*.py")):
            digest.update(str(path.relative_to(root)).encode() + b"\0" + path.read_bytes())
    return f"{__version__}+{digest.hexdigest()[:12]}"


def fingerprint(config_yaml: str, manifest: dict[str, Any]) -> dict[str, Any]:
    """What every rank must agree on; the keys are the field names errors report."""
    return {
        "world_size": int(os.environ.get("WORLD_SIZE", dist.get_world_size())),
        "config_sha256": hashlib.sha256(config_yaml.encode()).hexdigest()[:16],
        "code_version": code_version(),
        "data_manifest_sha256": hashlib.sha256(json.dumps(manifest, sort_keys=True).encode()).hexdigest()[:16],
    }


def first_disagreement(prints: list[dict[str, Any]]) -> tuple[int, str] | None:
    """(rank, field) of the first rank whose fingerprint differs from rank 0's, in rank order, else None."""
    for rank, mine in enumerate(prints[1:], start=1):
        for key, value in prints[0].items():
            if mine.get(key) != value:
                return rank, key
    return None


def bus_bandwidth(nbytes: int, world: int, seconds: float) -> float:
    """All-reduce bus bandwidth in GB/s: ``nbytes * 2 (n - 1) / n / seconds``, NCCL-tests' busbw, which a ring
    all-reduce moves per rank and so compares across world sizes with the link speed."""
    return nbytes * 2 * (world - 1) / world / seconds / 1e9


def timed_allreduce(mib: float, device: torch.device) -> float:
    """Seconds one all-reduce of ``mib`` MiB of fp32 per rank takes, after one small warm-up all-reduce that builds
    the connections (the first collective's set-up would otherwise count as bandwidth)."""
    dist.all_reduce(torch.ones(1, device=device))
    buffer = torch.ones(max(1, int(mib * 2**20) // 4), dtype=torch.float32, device=device)
    dist.barrier()
    start = time.perf_counter()
    dist.all_reduce(buffer)
    buffer[0].item()  # waits for the device work (CUDA) before the clock stops
    return time.perf_counter() - start


def run(config_yaml: str, manifest: dict[str, Any], allreduce_mib: float, device: torch.device) -> PreflightReport:
    """Every rank: gather fingerprints and hostnames, refuse a disagreement or missing nodes (the same
    :class:`PreflightError` on every rank, so all exit together), time the all-reduce; rank 0 logs one block."""
    start = time.perf_counter()
    world = dist.get_world_size()
    mine = {"host": socket.gethostname(), **fingerprint(config_yaml, manifest)}
    gathered: list[dict[str, Any]] = [{} for _ in range(world)]
    dist.all_gather_object(gathered, mine)
    hosts = tuple(dict.fromkeys(g["host"] for g in gathered))
    prints = [{k: v for k, v in g.items() if k != "host"} for g in gathered]
    if (found := first_disagreement(prints)) is not None:
        rank, key = found
        raise PreflightError(f"preflight: rank {rank} (host {gathered[rank]['host']}) disagrees with rank 0 on "
                             f"{key}: {prints[rank][key]} vs {prints[0][key]}; every rank must run the same "
                             "world size, config, code and data")
    expected = int(os.environ.get(NNODES_ENV, "0") or 0)
    if expected > len(hosts):
        raise PreflightError(f"preflight: {len(hosts)} of {expected} nodes joined ({', '.join(hosts)}); is the "
                             "rendezvous endpoint a loopback address or a different host on some node?")
    seconds = timed_allreduce(allreduce_mib, device) if world > 1 and allreduce_mib > 0 else None
    busbw = bus_bandwidth(int(allreduce_mib * 2**20) // 4 * 4, world, seconds) if seconds else None
    report = PreflightReport(world, hosts, allreduce_mib, seconds, busbw, time.perf_counter() - start)
    if dist.get_rank() == 0:
        bandwidth = (f"all-reduce of {allreduce_mib:g} MiB per rank in {seconds * 1e3:.1f} ms: bus bandwidth "
                     f"{busbw:.3f} GB/s" if seconds else "all-reduce not measured (one rank, or "
                     "ft.preflight_allreduce_mib 0)")
        logger.info("preflight passed in %.2f s\n  world %d rank(s) on %d node(s): %s\n  agreed: %s\n  %s",
                    report.seconds, world, len(hosts), ", ".join(hosts),
                    ", ".join(f"{k} {v}" for k, v in prints[0].items()), bandwidth)
    return report
