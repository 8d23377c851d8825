"""Goodput: where every second of a run's wall-clock time went, summed over all its attempts (requeues, restarts).

The ledger is a stopwatch with labels. Each attempt starts counting at its process start (or its Slurm job's start
when the job says so) and the loop calls ``mark(kind)`` after each phase: the seconds since the previous mark go to
that phase, so an attempt's parts add up to its wall time by construction. Kinds (``KINDS``):

- ``startup``: process start (or the Slurm job's, ``attempt_start_time``) to the end of the first step's data wait
  (launcher, imports, process groups, resume);
- ``productive``: training steps whose result survived in a committed checkpoint;
- ``data_wait``: the part of those steps spent waiting for batches;
- ``skipped``: steps whose update was skipped (non-finite loss or gradient norm, a skipped loss spike);
- ``eval``: validation; ``checkpoint``: the time a save blocked the loop;
- ``redone``: work lost at a kill: the steps after the last checkpoint, which the next attempt trains again;
- ``between_attempts``: from an attempt's last record to the next attempt's start (the dead process's unlogged
  tail, the requeue wait, the launcher).

A step is *uncommitted* until a checkpoint at or after it commits: it then moves to ``productive``/``data_wait``;
if the process dies first, the next attempt counts it as ``redone``. So every exported total only grows (the
Prometheus series are counters), and the run's parts sum to its wall time: the totals plus the current attempt's
uncommitted seconds.

Persistence: rank 0 appends one JSON line per flush (every log step and every save) to ``<run.dir>/goodput.jsonl``
with the attempt's cumulative numbers; a SIGKILL loses only what came after the last line, and that time lands in
``between_attempts``. Reading takes the last complete line of each attempt.
"""

from __future__ import annotations

import json
import logging
import os
import time
from collections import deque
from pathlib import Path
from typing import Any

from pretrain.metrics import names

logger = logging.getLogger(__name__)

FILE_NAME = "goodput.jsonl"
KINDS = ("productive", "startup", "checkpoint", "eval", "data_wait", "redone", "skipped", "between_attempts")
#: Kinds an attempt measures itself (the rest are settled between attempts).
_MEASURED = ("productive", "startup", "checkpoint", "eval", "data_wait", "skipped")


def attempt_start_time(query_slurm: bool = True) -> float:
    """Unix time this attempt began: the process's creation time, or the Slurm job's start when this process is part
    of the job's first step and that start is earlier (by under an hour): srun, the launcher and the interpreter
    then count as startup, not as time between attempts."""
    start = process_start_time()
    job = slurm_job_start() if query_slurm else None
    if job is not None and start - 3600 < job <= start:
        start = job
    return start


def slurm_job_start() -> float | None:
    """Unix start time of this Slurm job's current run (a requeue starts it again): ``SLURM_JOB_START_TIME`` (Slurm
    >= 23.02), else ``scontrol show job``'s StartTime (whole seconds). None outside Slurm, in a later job step (the
    allocation's earlier steps are not this attempt's startup), or when scontrol does not answer in 5 s."""
    job = os.environ.get("SLURM_JOB_ID", "")
    if not job or os.environ.get("SLURM_STEP_ID", "0") != "0":
        return None
    if os.environ.get("SLURM_JOB_START_TIME", "").isdigit():
        return float(os.environ["SLURM_JOB_START_TIME"])
    import subprocess

    try:
        shown = subprocess.run(["scontrol", "show", "job", "-o", job], capture_output=True, text=True, timeout=5)
    except (OSError, subprocess.TimeoutExpired):
        return None
    return scontrol_start_time(shown.stdout)


def scontrol_start_time(text: str) -> float | None:
    """The ``StartTime=`` of ``scontrol show job -o`` output (the controller's local time) as unix time."""
    for field in text.split():
        if field.startswith("StartTime="):
            try:
                return time.mktime(time.strptime(field.removeprefix("StartTime="), "%Y-%m-%dT%H:%M:%S"))
            except ValueError:  # "Unknown" (not started) or another format
                return None
    return None


def process_start_time() -> float:
    """Unix time this process was created, to ~10 ms: /proc's start ticks against /proc/uptime (psutil's
    create_time rounds the boot time to whole seconds); psutil elsewhere."""
    try:
        ticks = int(Path("/proc/self/stat").read_text().rsplit(")", 1)[1].split()[19])  # field 22: starttime
        uptime = float(Path("/proc/uptime").read_text().split()[0])
        return time.time() - (uptime - ticks / os.sysconf("SC_CLK_TCK"))
    except (OSError, ValueError, IndexError):
        import psutil

        return psutil.Process().create_time()


class GoodputLedger:
    """One attempt's stopwatch, and the run's totals over every attempt recorded in ``<run_dir>/goodput.jsonl``.

    ``path=None`` (ranks other than 0) keeps time but writes and reads nothing."""

    def __init__(self, path: Path | None, start: float | None = None, clock=time.time):
        self.path, self.clock = path, clock
        self.start = attempt_start_time(query_slurm=path is not None) if start is None else start
        self.last_mark = self.start
        self.seconds = dict.fromkeys(_MEASURED, 0.0)
        self.pending: deque[tuple[int, float, float]] = deque()  # uncommitted steps: (step, compute s, data wait s)
        self._pending_s = 0.0  # their sum, kept as they come and go
        self.step = 0
        self.resumed_from = 0
        self.steps_done = 0  # steps this attempt
        self._committed_step: float | None = None
        self.history = read(path) if path is not None else []
        self.attempt = (self.history[-1]["attempt"] + 1) if self.history else 1
        self._file = None

    @classmethod
    def for_run(cls, run_dir: str | Path, is_writer: bool) -> "GoodputLedger":
        """The ledger of this attempt of the run in ``run_dir`` (writing on the writer rank only)."""
        return cls(Path(run_dir) / FILE_NAME if is_writer else None)

    # -- measuring ----------------------------------------------------------------------------------------------

    def mark(self, kind: str) -> float:
        """Give the seconds since the previous mark to ``kind``; returns them."""
        now = self.clock()
        elapsed, self.last_mark = now - self.last_mark, now
        self.seconds[kind] += elapsed
        return elapsed

    def resumed(self, step: int) -> None:
        """The attempt continues from checkpoint ``step`` (0: from scratch); logs the run's goodput so far."""
        self.step = self.resumed_from = step
        if self.history:
            logger.info("attempt %d of this run, from step %d; so far: %s", self.attempt, step, summary(self.history))

    def step_done(self, step: int, step_s: float, data_wait_s: float, applied: bool) -> None:
        """Step ``step`` finished now, after ``step_s`` seconds of which ``data_wait_s`` waited for batches.
        Everything before the attempt's first forward (its first data wait included) is startup."""
        now = self.clock()
        elapsed, self.last_mark = now - self.last_mark, now
        wait = min(max(data_wait_s, 0.0), elapsed)
        if not self.steps_done:
            compute = min(max(step_s - wait, 0.0), elapsed)
            self.seconds["startup"] += elapsed - compute
            elapsed, wait = compute, 0.0
        self.steps_done += 1
        self.step = step
        if applied:
            self.pending.append((step, elapsed - wait, wait))
            self._pending_s += elapsed
        else:
            self.seconds["skipped"] += elapsed

    def committed(self, step: int) -> None:
        """A checkpoint of ``step`` committed: the steps up to it are productive for good."""
        while self.pending and self.pending[0][0] <= step:
            _, compute, wait = self.pending.popleft()
            self._pending_s -= compute + wait
            self.seconds["productive"] += compute
            self.seconds["data_wait"] += wait

    def update(self, record: dict[str, Any], last_commit: dict[str, float]) -> None:
        """End of a loop iteration: settle a checkpoint commit (``last_commit``: the checkpoint manager's), and on a
        log step (``record`` not empty) or after a commit write this attempt's line and add the run's totals to
        ``record`` (rank 0; the exporter and the sinks read them there)."""
        committed = last_commit.get(names.LAST_CHECKPOINT_STEP)
        fresh = committed is not None and committed != self._committed_step
        if fresh:
            self._committed_step = committed
            self.committed(int(committed))
        if not (record or fresh) or self.path is None:
            return
        self.flush()
        if record:
            record[names.GOODPUT_S] = {k: round(v, 3) for k, v in self.totals().items()}
            record[names.GOODPUT_UNCOMMITTED_S] = round(self.uncommitted_s(), 3)

    def finish(self, last_commit: dict[str, float]) -> None:
        """The attempt ends (finished, stopped by a signal, or failed): the time since the last mark (the wait for
        an async save, closing the sinks) counts as checkpoint; write the last line and print the run's goodput
        summary on stdout (rank 0)."""
        self.mark("checkpoint")
        self.update({}, last_commit)
        self.close()
        if self.path is not None:
            print(summary([*self.history, self.record()]), flush=True)

    def uncommitted_s(self) -> float:
        """Seconds of steps no committed checkpoint holds yet (lost if the process dies now)."""
        return max(self._pending_s, 0.0) if self.pending else 0.0

    # -- recording ----------------------------------------------------------------------------------------------

    def record(self) -> dict[str, Any]:
        """This attempt's line of goodput.jsonl: cumulative seconds up to the last mark."""
        rec = {"attempt": self.attempt, "start": round(self.start, 3), "time": round(self.last_mark, 3),
               "step": self.step, "resumed_from": self.resumed_from,
               "seconds": {k: round(v, 4) for k, v in self.seconds.items()},
               "uncommitted_s": round(self.uncommitted_s(), 4)}
        if os.environ.get("SLURM_JOB_ID"):
            rec["slurm"] = {"job_id": os.environ["SLURM_JOB_ID"],
                            "restart_count": int(os.environ.get("SLURM_RESTART_COUNT", "0") or 0)}
        return rec

    def flush(self) -> None:
        """Append this attempt's cumulative line (rank 0; append-only, a torn last line is skipped on reading)."""
        if self.path is None:
            return
        if self._file is None:
            if self.path.exists() and self.path.stat().st_size:
                with open(self.path, "rb") as existing:  # a SIGKILL mid-line: start ours on a fresh line
                    existing.seek(-1, os.SEEK_END)
                    torn = existing.read(1) != b"\n"
            else:
                torn = False
            self._file = open(self.path, "a")
            if torn:
                self._file.write("\n")
        self._file.write(json.dumps(self.record(), separators=(",", ":")) + "\n")
        self._file.flush()

    def totals(self) -> dict[str, float]:
        """The run's seconds per kind over every attempt so far (this one up to its last mark; its uncommitted
        steps are not in it: ``uncommitted_s()``)."""
        return totals([*self.history, self.record()])

    def close(self) -> None:
        """Write the final line and close the file."""
        self.flush()
        if self._file is not None:
            self._file.close()
            self._file = None


def read(path: Path) -> list[dict[str, Any]]:
    """The last complete line of each attempt in ``path`` (oldest first); [] when there is none."""
    if not path.is_file():
        return []
    last: dict[int, dict[str, Any]] = {}
    for line in path.read_text().splitlines():
        try:
            rec = json.loads(line)
            last[int(rec["attempt"])] = rec
        except (ValueError, KeyError, TypeError):  # a line torn by a kill
            continue
    return [last[a] for a in sorted(last)]


def totals(attempts: list[dict[str, Any]]) -> dict[str, float]:
    """Seconds per kind over ``attempts`` (the last line of each, oldest first). An attempt followed by another
    lost its uncommitted steps (``redone``) and the time from its last line to the next one's start
    (``between_attempts``)."""
    out = dict.fromkeys(KINDS, 0.0)
    for i, rec in enumerate(attempts):
        for kind, value in rec["seconds"].items():
            out[kind] += value
        if i + 1 < len(attempts):
            out["redone"] += rec["uncommitted_s"]
            out["between_attempts"] += max(0.0, attempts[i + 1]["start"] - rec["time"])
    return out


def wall_s(attempts: list[dict[str, Any]]) -> float:
    """From the first attempt's start to the last one's last line."""
    return attempts[-1]["time"] - attempts[0]["start"] if attempts else 0.0


def goodput_fraction(attempts: list[dict[str, Any]]) -> float:
    """Productive seconds over the wall time of ``attempts`` (0 before any)."""
    wall = wall_s(attempts)
    return totals(attempts)["productive"] / wall if wall > 0 else 0.0


def summary(attempts: list[dict[str, Any]]) -> str:
    """``goodput 91.2% of 0:04:10 over 3 attempts: productive 3:48 · startup 0:12 · ...`` (uncommitted steps of
    the last attempt are shown apart: they become productive at the next checkpoint, or redone after a kill)."""
    parts = totals(attempts)
    wall = wall_s(attempts)
    pending = attempts[-1]["uncommitted_s"] if attempts else 0.0
    fraction = goodput_fraction(attempts)
    shown = " · ".join(f"{kind.replace('_', ' ')} {hms(parts[kind])}" for kind in KINDS if parts[kind] >= 0.05
                       or kind == "productive")
    tail = f" · uncommitted {hms(pending)}" if pending >= 0.05 else ""
    n = len(attempts)
    return (f"goodput {100 * fraction:.1f}% of {hms(wall)} over {n} attempt{'s' if n != 1 else ''}: "
            f"{shown}{tail}")


def hms(seconds: float) -> str:
    """``12.3s`` under a minute, else ``H:MM:SS``."""
    seconds = max(0.0, seconds)
    if seconds < 60:
        return f"{seconds:.1f}s"
    minutes, secs = divmod(int(round(seconds)), 60)
    hours, minutes = divmod(minutes, 60)
    return f"{hours}:{minutes:02d}:{secs:02d}"
