"""``pretrain launch slurm``: render one of the slurm/*.sbatch templates and submit it with sbatch.

Template choice: ``multi_node.sbatch`` (srun → one ``pretrain launch local`` per node, requeue handling with
``--requeue``) for more than one node or with ``--torchrun``; else ``requeue.sbatch`` with ``--requeue`` and
``single_node.sbatch`` without (srun → one task per GPU). On CPU clusters (tests, laptops)
``--gpus-per-node 0 --procs-per-node P`` asks for P tasks (gloo processes) per node and no GPUs.
"""

from __future__ import annotations

import dataclasses
import os
import re
import shlex
import subprocess
import sys
import unicodedata
from pathlib import Path

TEMPLATES = Path(__file__).resolve().parents[1] / "slurm"

#: Environment defaults written into every script; `: "${X:=v}"` keeps a value the user exported already.
ENV_DEFAULTS = """\
# OpenMP/MKL threads per training process = the CPUs Slurm gave it: more oversubscribes the cores the data
# loader and NCCL need (torchrun would pick 1).
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-@OMP_THREADS@}
# NCCL: report init/transport problems once (WARN); rebuild communicators after a failure instead of hanging in
# them (with the hang watchdog, a stuck collective ends the job); pick the interface with NCCL_SOCKET_IFNAME on
# clusters with several (e.g. export NCCL_SOCKET_IFNAME=ib0 before sbatch).
export NCCL_DEBUG=${NCCL_DEBUG:-WARN}
export TORCH_NCCL_ASYNC_ERROR_HANDLING=${TORCH_NCCL_ASYNC_ERROR_HANDLING:-1}
# Python output straight to the Slurm log (otherwise the last lines before a kill are lost in a buffer).
export PYTHONUNBUFFERED=1"""


@dataclasses.dataclass(frozen=True)
class SlurmJob:
    """What to ask Slurm for; each field becomes an #SBATCH line (None: Slurm's/the site's default)."""

    #: Nodes (sbatch --nodes).
    nodes: int = 1
    #: GPUs per node; 0 on CPU clusters (then procs_per_node says how many gloo processes).
    gpus_per_node: int = 1
    #: Training processes per node; default gpus_per_node (one per GPU).
    procs_per_node: int | None = None
    #: CPUs per training process (sbatch --cpus-per-task; also OMP_NUM_THREADS).
    cpus_per_task: int | None = None
    #: Partition (sbatch --partition).
    partition: str | None = None
    #: Time limit, e.g. 04:00:00 (sbatch --time).
    time: str | None = None
    #: Job name (sbatch --job-name).
    job_name: str = "pretrain"
    #: Log file; %j is the job id (sbatch --output).
    output: str | None = None
    #: One torchrun per node (multi_node.sbatch) also on one node, instead of one srun task per GPU.
    torchrun: bool = False
    #: Use the requeue template: checkpoint on USR1, exit 75, requeue, resume.
    requeue: bool = False
    #: With requeue: seconds before the time limit at which Slurm sends USR1.
    signal_seconds: int = 120
    #: Directory the job runs in (the repository / where relative config paths resolve).
    workdir: str = "."
    #: Extra raw sbatch options, e.g. ("--account=abc", "--qos=high").
    extra: tuple[str, ...] = ()

    @property
    def tasks_per_node(self) -> int:
        return self.procs_per_node if self.procs_per_node is not None else self.gpus_per_node

    def __post_init__(self):
        from pretrain.errors import ConfigError

        for flag, value in (("--job-name", self.job_name), ("--partition", self.partition), ("--time", self.time),
                            ("--output", self.output), ("--workdir", self.workdir),
                            *(("--sbatch-option", option) for option in self.extra)):
            check_script_text(flag, value)
        for option in self.extra:
            if not option.startswith("-"):
                raise ConfigError(f"--sbatch-option: expected an sbatch option such as --account=abc, got {option!r}")
        if self.nodes < 1:
            raise ConfigError(f"--nodes: must be >= 1, got {self.nodes}")
        if self.gpus_per_node < 0:
            raise ConfigError(f"--gpus-per-node: must be >= 0, got {self.gpus_per_node}")
        if self.tasks_per_node < 1:
            raise ConfigError("--procs-per-node: required (>= 1) with --gpus-per-node 0 (CPU processes per node)")
        if self.time is not None and not re.fullmatch(r"(\d+-)?\d+(:\d{1,2}){0,2}", self.time):
            raise ConfigError(f"--time: expected [D-]HH:MM:SS or minutes, got {self.time!r}")
        if self.signal_seconds < 1:
            raise ConfigError(f"--signal-seconds: must be >= 1, got {self.signal_seconds}")


def check_script_text(flag: str, value: str | None) -> None:
    """Refuse a value with a control character (newline, carriage return, tab, escape, ...) or a Unicode line or
    paragraph separator, naming ``flag``. The #SBATCH header takes values unquoted, so a newline in ``--job-name``
    or ``--sbatch-option`` would start a line of its own in the script (another #SBATCH directive, or a shell
    command run on the compute node). Quoted values (paths, overrides) are refused alike: none has a use for one,
    and the error names the flag instead of the job failing later."""
    from pretrain.errors import ConfigError

    if value is None:
        return
    bad = next((i for i, ch in enumerate(value) if unicodedata.category(ch) in ("Cc", "Zl", "Zp")), None)
    if bad is not None:
        raise ConfigError(f"{flag}: control character {value[bad]!r} at position {bad} in {value!r} (values are "
                          "written into the sbatch script, where it would break or add lines)")


def template_name(job: SlurmJob) -> str:
    """Which slurm/ template the job uses: one launcher per node for several nodes (or --torchrun), with or
    without requeue; else one task per GPU, with (requeue.sbatch) or without requeue."""
    if job.nodes > 1 or job.torchrun:
        return "multi_node.sbatch"
    return "requeue.sbatch" if job.requeue else "single_node.sbatch"


def sbatch_lines(job: SlurmJob) -> list[str]:
    """The #SBATCH header of the job. The multi-node template runs one torchrun task per node."""
    one_task_per_node = template_name(job) == "multi_node.sbatch"
    lines = [f"--job-name={job.job_name}", f"--nodes={job.nodes}",
             f"--ntasks-per-node={1 if one_task_per_node else job.tasks_per_node}"]
    if job.gpus_per_node:
        lines.append(f"--gpus-per-node={job.gpus_per_node}")
    # Always explicit: the templates pass SLURM_CPUS_PER_TASK on to srun (which stopped inheriting it in 22.11).
    if one_task_per_node:  # the launcher's task holds the CPUs of all its workers
        lines.append(f"--cpus-per-task={(job.cpus_per_task or 1) * job.tasks_per_node}")
    else:
        lines.append(f"--cpus-per-task={job.cpus_per_task or 1}")
    for flag, value in (("--partition", job.partition), ("--time", job.time), ("--output", job.output)):
        if value:
            lines.append(f"{flag}={value}")
    lines += list(job.extra)
    return [f"#SBATCH {line}" for line in lines]


def render(job: SlurmJob, train_args: list[str], python: str = sys.executable) -> str:
    """The sbatch script text for ``pretrain train <train_args>`` (config path + overrides)."""
    for i, arg in enumerate(train_args):
        check_script_text("config" if i == 0 else arg.split("=", 1)[0], arg)
    check_script_text("python", python)
    text = (TEMPLATES / template_name(job)).read_text()
    values = {
        "@SBATCH@": "\n".join(sbatch_lines(job)),
        "@ENV_DEFAULTS@": ENV_DEFAULTS,
        "@WORKDIR@": shlex.quote(str(Path(job.workdir).resolve())),
        "@PYTHON@": shlex.quote(python),
        "@TRAIN_ARGS@": " ".join(shlex.quote(a) for a in train_args),
        "@PROCS_PER_NODE@": str(job.tasks_per_node),
        # SLURM_CPUS_PER_TASK is the whole torchrun task's share in multi_node.sbatch: split it among its workers.
        "@OMP_THREADS@": (f"$(( ${{SLURM_CPUS_PER_TASK:-{job.tasks_per_node}}} / {job.tasks_per_node} ))"
                          if template_name(job) == "multi_node.sbatch" else "${SLURM_CPUS_PER_TASK:-1}"),
        "@SIGNAL_SECONDS@": str(job.signal_seconds),
        "@REQUEUE@": "1" if job.requeue else "0",
        # Reruns append to the same log instead of truncating it.
        "@REQUEUE_SBATCH@": "#SBATCH --requeue\n#SBATCH --open-mode=append" if job.requeue else "",
    }
    for key, value in values.items():
        text = text.replace(key, value)
    leftover = re.findall(r"@[A-Z_]+@", text)
    assert not leftover, f"unrendered placeholders {leftover} in {template_name(job)}"
    return text


def submit(script: str, script_path: Path | None = None) -> str:
    """Write the script (next to the run, for the record) and sbatch it; returns the job id."""
    from pretrain.errors import ConfigError

    if script_path is not None:
        script_path.parent.mkdir(parents=True, exist_ok=True)
        script_path.write_text(script)
    try:
        out = subprocess.run(["sbatch", "--parsable"], input=script, capture_output=True, text=True,
                             check=False, env=dict(os.environ))
    except FileNotFoundError:
        raise ConfigError("sbatch: not found (run on a Slurm login node, or use --dry-run)") from None
    if out.returncode != 0:
        raise ConfigError(f"sbatch: {out.stderr.strip() or out.stdout.strip()}")
    return out.stdout.strip().split(";")[0]
