"""Slurm's environment → torch's launcher environment (RANK, WORLD_SIZE, LOCAL_RANK, MASTER_ADDR, MASTER_PORT).

Under ``srun pretrain train CFG`` (one task per GPU, no torchrun) every task learns its place from ``SLURM_*``:
its rank is SLURM_PROCID, the world is the step's task count, the rendezvous host is the first node of the job's
node list and the port is derived from the job id, so every task of a job (and of its requeued reruns, which keep
the id) computes the same address without talking to the others. Pure functions, so they are unit tested without
a cluster; ``apply`` is what ``pretrain train`` calls.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
from typing import Mapping

from pretrain.errors import ConfigError

#: MASTER_PORT = PORT_BASE + job id % PORT_SPAN: stays clear of the well-known ports below 10000 and of Linux's
#: ephemeral range (32768+), so two jobs sharing a node rarely collide (ids PORT_SPAN apart do).
PORT_BASE = 10000
PORT_SPAN = 20000


class NodelistError(ConfigError):
    """A Slurm variable we cannot use (names it and the offending text); a ConfigError, so `pretrain train`
    reports it in one line."""


def _split_top_level(text: str) -> list[str]:
    """Split ``a[1-2],b,c[3,5]`` at the commas outside brackets."""
    parts, depth, start = [], 0, 0
    for i, ch in enumerate(text):
        depth += ch == "["
        depth -= ch == "]"
        if depth < 0:
            raise NodelistError(f"SLURM_JOB_NODELIST: unbalanced ']' in {text!r}")
        if ch == "," and depth == 0:
            parts.append(text[start:i])
            start = i + 1
    if depth:
        raise NodelistError(f"SLURM_JOB_NODELIST: unbalanced '[' in {text!r}")
    parts.append(text[start:])
    return [p for p in parts if p]


def _expand_range(item: str, text: str) -> list[str]:
    """``01-04`` → 01, 02, 03, 04 (zero padding kept); ``7`` → 7."""
    lo, sep, hi = item.partition("-")
    if not lo.isdigit() or (sep and not hi.isdigit()):
        raise NodelistError(f"SLURM_JOB_NODELIST: bad range {item!r} in {text!r}")
    if not sep:
        return [lo]
    if int(hi) < int(lo):
        raise NodelistError(f"SLURM_JOB_NODELIST: descending range {item!r} in {text!r}")
    width = len(lo)
    return [str(n).zfill(width) for n in range(int(lo), int(hi) + 1)]


def expand_nodelist(text: str) -> list[str]:
    """Slurm's compressed host list → host names, in order: ``gpu[01-04,07],login1`` → gpu01 … gpu04, gpu07,
    login1. Several bracket groups in one name (``rack[1-2]-n[1-2]``) expand as a product, like Slurm's own."""
    text = text.strip()
    if not text:
        raise NodelistError("SLURM_JOB_NODELIST: empty")
    hosts: list[str] = []
    for part in _split_top_level(text):
        match = re.match(r"^([^\[\]]*)\[([^\[\]]+)\](.*)$", part)
        if not match:
            if "[" in part or "]" in part:
                raise NodelistError(f"SLURM_JOB_NODELIST: cannot parse {part!r} in {text!r}")
            hosts.append(part)
            continue
        prefix, ranges, rest = match.groups()
        suffixes = expand_nodelist(rest) if "[" in rest else [rest]
        for item in ranges.split(","):
            for number in _expand_range(item.strip(), text):
                hosts.extend(prefix + number + suffix for suffix in suffixes)
    return hosts


def first_host(nodelist: str, use_scontrol: bool = True) -> str:
    """The job's first host: ``scontrol show hostnames`` when available (Slurm's own parser), else ours. Ours
    also vets the text first: scontrol turns a malformed list into a bogus host name instead of failing."""
    hosts = expand_nodelist(nodelist)
    if use_scontrol and shutil.which("scontrol"):
        try:
            out = subprocess.run(["scontrol", "show", "hostnames", nodelist], capture_output=True, text=True,
                                 timeout=10, check=True).stdout.split()
            if out:
                return out[0]
        except (subprocess.SubprocessError, OSError):
            pass  # an odd or broken scontrol: ours
    return hosts[0]


def master_port(job_id: str | int) -> int:
    """The rendezvous port of a job: the same on every task and on every rerun of a requeued job."""
    try:
        number = int(str(job_id).split("_")[0])  # array tasks: "1234_7" has its own SLURM_JOB_ID too
    except ValueError:
        raise NodelistError(f"SLURM_JOB_ID: not a job id: {job_id!r}") from None
    return PORT_BASE + number % PORT_SPAN


def under_srun(env: Mapping[str, str]) -> bool:
    """True in a task started by srun (a job step) that no torch launcher has set up: the mapping applies.

    The batch script itself also sees SLURM_PROCID=0 and SLURM_NTASKS of the whole job, but no
    SLURM_STEP_NUM_TASKS; mapping there would make one process wait for a world of N."""
    return "RANK" not in env and "SLURM_PROCID" in env and "SLURM_STEP_NUM_TASKS" in env


def torch_env(env: Mapping[str, str], use_scontrol: bool = True) -> dict[str, str]:
    """The torch launcher variables for a task of a Slurm job step (see ``under_srun``); MASTER_ADDR and
    MASTER_PORT already in ``env`` win (a user pinning the rendezvous)."""
    nodelist = env.get("SLURM_STEP_NODELIST") or env.get("SLURM_JOB_NODELIST") or env.get("SLURM_NODELIST")
    if not nodelist:
        raise NodelistError("SLURM_JOB_NODELIST: not set in a Slurm job step")
    job_id = env.get("SLURM_JOB_ID") or env.get("SLURM_JOBID")
    if not job_id:
        raise NodelistError("SLURM_JOB_ID: not set in a Slurm job step")
    return {
        "RANK": env["SLURM_PROCID"],
        "WORLD_SIZE": env.get("SLURM_STEP_NUM_TASKS") or env["SLURM_NTASKS"],
        "LOCAL_RANK": env.get("SLURM_LOCALID", "0"),
        "LOCAL_WORLD_SIZE": (env.get("SLURM_STEP_TASKS_PER_NODE") or env.get("SLURM_NTASKS_PER_NODE")
                             or "1").split("(")[0].split(",")[0],
        "MASTER_ADDR": env.get("MASTER_ADDR") or first_host(nodelist, use_scontrol),
        "MASTER_PORT": env.get("MASTER_PORT") or str(master_port(job_id)),
    }


def apply(environ: dict | None = None) -> bool:
    """Export the torch variables into ``environ`` (default ``os.environ``) when running as a bare srun task;
    returns whether it did."""
    environ = os.environ if environ is None else environ
    if not under_srun(environ):
        return False
    environ.update(torch_env(environ))
    return True
