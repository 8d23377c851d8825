"""``pretrain launch slurm-prepare``: `data prepare` as a Slurm job array plus a `data merge` job after it.

The array job runs task ``$SLURM_ARRAY_TASK_ID`` of ``--tasks`` (at most ``--max-parallel`` at once, ``%K``),
each one `pretrain data prepare --num-tasks N` on its share of the input (data_pipeline/tasks.py). It is
requeue-safe: ``--requeue`` lets Slurm rerun a task whose node failed or that was pre-empted, and a task rerun is
either a no-op (its completion marker exists) or a clean restart (no marker: what it wrote is removed first). The
merge job depends on the whole array with ``afterok``: it starts only when every task exited 0, and it names any
task that did not finish.
"""

from __future__ import annotations

import dataclasses
import shlex
import subprocess
import sys
from pathlib import Path

from launch.slurm import check_script_text, submit

#: The tokenizer workers are processes of one thread each; output goes straight to the log (a killed task's last
#: lines are not lost in a buffer).
ENV_DEFAULTS = """\
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-1}
export PYTHONUNBUFFERED=1"""

ARRAY_TEMPLATE = """\
#!/bin/bash
# data prepare as a job array: task $SLURM_ARRAY_TASK_ID of @TASKS@ (rendered by `pretrain launch slurm-prepare`).
# Requeue-safe: a finished task reruns as a no-op, an interrupted one starts over (data_pipeline/tasks.py).
@SBATCH@
set -euo pipefail
@ENV_DEFAULTS@
cd @WORKDIR@
echo "pretrain: prepare task ${SLURM_ARRAY_TASK_ID} of @TASKS@ (job ${SLURM_ARRAY_JOB_ID}, restart ${SLURM_RESTART_COUNT:-0})"
exec @PYTHON@ -m pretrain data prepare @PREPARE_ARGS@ --num-tasks @TASKS@ --task-index "${SLURM_ARRAY_TASK_ID}"
"""

MERGE_TEMPLATE = """\
#!/bin/bash
# data merge after every task of the prepare array finished (afterok), rendered by `pretrain launch slurm-prepare`.
@SBATCH@
set -euo pipefail
@ENV_DEFAULTS@
cd @WORKDIR@
exec @PYTHON@ -m pretrain data merge @OUTPUT@
"""


@dataclasses.dataclass(frozen=True)
class PrepareJob:
    """The array and merge jobs of a multi-task `data prepare`."""

    #: Array tasks (each one share of the input).
    tasks: int
    #: At most this many tasks at once (sbatch --array=...%K); 0: no limit.
    max_parallel: int = 0
    #: `data prepare` arguments after the command: inputs, --tokenizer, --output, --seq-length, ...
    prepare_args: tuple[str, ...] = ()
    #: The --output directory (the merge job's argument).
    output: str = ""
    #: CPUs per task (also tokenizer workers: `data prepare --workers`).
    cpus_per_task: int = 4
    #: Partition, time limit, job name, log directory; extra raw sbatch options.
    partition: str | None = None
    time: str | None = None
    job_name: str = "pretrain-prepare"
    log_dir: str | None = None
    workdir: str = "."
    extra: tuple[str, ...] = ()

    def __post_init__(self):
        from pretrain.errors import ConfigError

        if self.tasks < 1 or self.max_parallel < 0 or self.cpus_per_task < 1:
            raise ConfigError(f"--tasks / --max-parallel / --cpus-per-task: need >= 1 / >= 0 / >= 1, got "
                              f"{self.tasks} / {self.max_parallel} / {self.cpus_per_task}")
        for flag, value in (("--job-name", self.job_name), ("--partition", self.partition), ("--time", self.time),
                            ("--log-dir", self.log_dir), ("--workdir", self.workdir), ("--output", self.output),
                            *(("--sbatch-option", o) for o in self.extra), *(("prepare", a) for a in self.prepare_args)):
            check_script_text(flag, value)


def _header(job: PrepareJob, lines: list[str], log_name: str) -> str:
    common = [f"--cpus-per-task={job.cpus_per_task}", "--ntasks=1", "--nodes=1"]
    for flag, value in (("--partition", job.partition), ("--time", job.time)):
        if value:
            common.append(f"{flag}={value}")
    if job.log_dir:
        common.append(f"--output={Path(job.log_dir) / log_name}")
    return "\n".join(f"#SBATCH {line}" for line in [*lines, *common, *job.extra])


def render(job: PrepareJob, array_job_id: str = "<ARRAY_JOB_ID>", python: str = sys.executable) -> tuple[str, str]:
    """(array script, merge script); the merge script depends on `array_job_id` with afterok."""
    array = f"--array=0-{job.tasks - 1}" + (f"%{job.max_parallel}" if job.max_parallel else "")
    values = {
        "@TASKS@": str(job.tasks),
        "@ENV_DEFAULTS@": ENV_DEFAULTS,
        "@WORKDIR@": shlex.quote(str(Path(job.workdir).resolve())),
        "@PYTHON@": shlex.quote(python),
        "@PREPARE_ARGS@": " ".join(shlex.quote(a) for a in [*job.prepare_args, "--workers", str(job.cpus_per_task)]),
        "@OUTPUT@": shlex.quote(job.output),
    }
    scripts = []
    for template, lines, log in ((ARRAY_TEMPLATE, [f"--job-name={job.job_name}", array, "--requeue",
                                                   "--open-mode=append"],  # a requeued task's tries: one log
                                  "%x-%A_%a.log"),
                                 (MERGE_TEMPLATE, [f"--job-name={job.job_name}-merge",
                                                   f"--dependency=afterok:{array_job_id}", "--kill-on-invalid-dep=yes"],
                                  "%x-%j.log")):
        text = template.replace("@SBATCH@", _header(job, lines, log))
        for key, value in values.items():
            text = text.replace(key, value)
        scripts.append(text)
    return scripts[0], scripts[1]


def submit_both(job: PrepareJob, script_dir: Path | None = None) -> tuple[str, str]:
    """sbatch the array, then the merge job depending on it; returns both job ids."""
    if job.log_dir:
        Path(job.log_dir).mkdir(parents=True, exist_ok=True)  # Slurm fails a job whose log directory is missing
    array_script, _ = render(job)
    array_id = submit(array_script, script_dir / "prepare-array.sbatch" if script_dir else None)
    _, merge_script = render(job, array_id)
    try:
        merge_id = submit(merge_script, script_dir / "prepare-merge.sbatch" if script_dir else None)
    except BaseException:
        cancel(array_id)  # an array without its merge would leave the data without a manifest
        raise
    return array_id, merge_id


def cancel(job_id: str) -> None:
    """scancel a job (used when the merge job could not be submitted after its array was)."""
    subprocess.run(["scancel", job_id], check=False)
