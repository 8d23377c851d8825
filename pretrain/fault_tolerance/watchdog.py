"""The hang watchdog: every rank dumps its Python stacks and exits with HANG_EXIT_CODE when a step, an evaluation
batch or a save runs past its timeout; and the collective timeout that lets it fire first."""

from __future__ import annotations

import contextlib
import faulthandler
import fcntl
import linecache
import os
import socket
import sys
import threading
import time
from pathlib import Path
from typing import Callable

from pretrain.fault_tolerance.signals import HANG_EXIT_CODE
from pretrain.parallel.env import tighten_collective_timeouts

#: Directory of the run directory holding hang reports: ``rank_<r>.txt`` per rank (the watchdog's line, where the
#: rank waited, its Python stacks), or written by the rank's launcher for a rank that could not (frozen, killed).
HANG_DIR = "hang"


class Watchdog:
    """Per-rank hang detector: a phase (a step, an evaluation batch, a save) that runs past its timeout makes the
    rank print one line naming it, dump every thread's Python stack and exit with ``HANG_EXIT_CODE``.

    Every rank runs its own, so a rank blocked in a collective on a hung peer fires as well as the hung peer: a job
    never sits silently on its allocation. ``beat(step, phase)`` starts a phase and sets its deadline; until the first
    step completes (``step_completed``) the startup timeout applies, which also covers resume and the first step's
    warm-up; saves (``saving``) may have their own. A daemon thread waits for the deadline; as a backstop for a
    thread that holds the GIL (the watchdog thread could not run), ``faulthandler.dump_traceback_later`` dumps the
    stacks from C and exits with code 1 ``backstop_grace_s`` later. A disabled watchdog (step_timeout_s 0) does
    nothing at all.
    """

    def __init__(self, step_timeout_s: float, startup_timeout_s: float = 0.0, save_timeout_s: float = 0.0,
                 rank: int = 0, *, linger_s: float | None = None, backstop_grace_s: float = 10.0, stream=None,
                 hang_dir: str | Path | None = None, exit_fn: Callable[[int], None] = os._exit,
                 backstop: bool = True):
        """Timeouts in seconds (0: ``step_timeout_s``; ``step_timeout_s`` 0 disables). ``linger_s`` (default a
        quarter of step_timeout_s, at most 10 s): after dumping, wait this long before exiting, so that peers whose
        deadline falls at the same moment dump theirs too (a rank that exits first breaks its peers' collectives,
        which would then end with a connection error instead of their stacks). ``stream``: where the line and the
        stacks go (needs a file descriptor; default stderr). ``hang_dir``: also write them to
        ``hang_dir/rank_<rank>.txt`` (the run directory's ``hang/``: one file per rank, whichever node it ran on).
        ``exit_fn``/``backstop`` exist for tests."""
        self.enabled = step_timeout_s > 0
        self.timeouts = {"step_timeout_s": step_timeout_s,
                         "startup_timeout_s": startup_timeout_s or step_timeout_s,
                         "save_timeout_s": save_timeout_s or step_timeout_s}
        self.rank, self.stream, self.exit_fn = rank, _with_fileno(stream or sys.stderr), exit_fn
        self.hang_dir = Path(hang_dir) if hang_dir is not None else None
        self.linger_s = min(10.0, step_timeout_s / 4) if linger_s is None else linger_s
        self.backstop, self.backstop_grace_s = backstop and self.enabled, backstop_grace_s
        self.started = False  # a first step has completed: step_timeout_s applies from now on
        self.fired = False
        self._lock = threading.Lock()
        self._wake = threading.Event()
        self._deadline: float | None = None  # time.monotonic() seconds; None: disarmed
        self._step, self._phase, self._key = 0, "startup", "startup_timeout_s"
        self._closed = False
        self._thread = threading.Thread(target=self._run, name="pretrain-watchdog", daemon=True)
        if self.enabled:
            self._thread.start()

    def collective_timeout_s(self) -> float:
        """Timeout for collectives once the first step is done: the longest phase bound plus the time the watchdog
        needs to report, so that the watchdog (with stacks) fires before a collective fails on its own."""
        longest = max(self.timeouts["step_timeout_s"], self.timeouts["save_timeout_s"])
        return longest + self.linger_s + self.backstop_grace_s

    def beat(self, step: int, phase: str, kind: str = "step") -> None:
        """Start ``phase`` of ``step`` now, with the timeout of ``kind`` ("step" or "save"), e.g.
        ``beat(7, "forward/backward")``."""
        if not self.enabled:
            return
        key = "save_timeout_s" if kind == "save" else "step_timeout_s" if self.started else "startup_timeout_s"
        limit = self.timeouts[key]
        with self._lock:
            self._step, self._phase, self._key = step, phase, key
            self._deadline = time.monotonic() + limit
        if self.backstop:
            # One process-wide timer, re-armed by every beat; it fires only if this thread never got to run.
            faulthandler.dump_traceback_later(limit + self.linger_s + self.backstop_grace_s, exit=True,
                                              file=self.stream)
        self._wake.set()

    def note(self, phase: str) -> None:
        """Rename the running phase (for the report) without moving its deadline, e.g. "optimizer step"."""
        with self._lock:
            self._phase = phase

    def step_completed(self, step: int) -> None:
        """A training step finished: from the first one on, phases are bounded by step_timeout_s and every process
        group's collective timeout is lowered to ``collective_timeout_s``. Re-arms for the work after the step
        (metrics, evaluation, signal agreement)."""
        if not self.enabled:
            return
        if not self.started:
            self.started = True
            tighten_collective_timeouts(self.collective_timeout_s())
        self.beat(step, "end (metrics, signals)")

    @contextlib.contextmanager
    def saving(self, step: int):
        """Bound a checkpoint save by ft.save_timeout_s, then go back to the step timeout for what follows."""
        self.beat(step, "checkpoint save", kind="save")
        try:
            yield
        finally:
            self.beat(step, "end (after checkpoint save)")

    def close(self) -> None:
        """Disarm and stop the thread (the run is over)."""
        if not self.enabled:
            return
        with self._lock:
            self._closed, self._deadline = True, None
        if self.backstop:
            faulthandler.cancel_dump_traceback_later()
        self._wake.set()
        self._thread.join(timeout=5)

    def _run(self) -> None:
        while True:
            self._wake.clear()
            with self._lock:
                if self._closed:
                    return
                deadline = self._deadline
                expired = deadline is not None and time.monotonic() >= deadline
                if expired:
                    self._deadline = None
                    report = (self._step, self._phase, self._key)
            if expired:
                self._fire(*report)
                return
            self._wake.wait(None if deadline is None else deadline - time.monotonic())

    def _fire(self, step: int, phase: str, key: str) -> None:
        self.fired = True
        if self.backstop:
            faulthandler.cancel_dump_traceback_later()  # we are running: the C backstop is not needed
        line = (f"rank {self.rank}: {phase} of step {step} exceeded ft.{key}={self.timeouts[key]:g} s; "
                "Python stacks follow\n")
        report = hang_file(self.hang_dir, self.rank) if self.hang_dir is not None else None
        where = (f"rank {self.rank} (host {socket.gethostname()}, pid {os.getpid()}): step {step}, "
                 f"{main_thread_collective()}" + (f"; stacks also in {report}" if report else "") + "\n")
        if report is not None:
            try:  # first, while nothing has broken yet: the file is what a post-mortem reads
                report.parent.mkdir(parents=True, exist_ok=True)
                with open(report, "w") as f:
                    f.write(line + where)
                    f.flush()
                    faulthandler.dump_traceback(file=f, all_threads=True)
            except OSError as e:  # a full or read-only disk must not keep the rank from exiting
                where += f"(could not write {report}: {e})\n"
        with _exclusive_output(self.stream.fileno()):
            # Straight to the file descriptor, as faulthandler writes: no Python-level lock a hung thread may hold.
            os.write(self.stream.fileno(), line.encode())
            os.write(self.stream.fileno(), where.encode())
            faulthandler.dump_traceback(file=self.stream, all_threads=True)
        time.sleep(self.linger_s)
        self.exit_fn(HANG_EXIT_CODE)


def hang_file(hang_dir: Path, rank: int) -> Path:
    """Where rank ``rank`` (or its launcher, for a rank that could not) writes its hang report."""
    return Path(hang_dir) / f"rank_{rank}.txt"


def main_thread_collective() -> str:
    """Where the main thread waits, for the hang line: the torch.distributed collective it is inside and the first
    caller outside torch ("in collective all_reduce, entered from megatron/core/tensor_parallel/mappings.py:31
    (_reduce)"); or an asynchronous collective's ``.wait()`` ("waiting on an asynchronous collective at
    megatron/core/tensor_parallel/layers.py:624 (backward)"); else "not in a collective, at FILE:LINE (FUNC)" (compute
    or I/O, the usual culprit). Read from the live frames, so the hot path pays nothing: a rank that hangs is, by
    definition, still where it stopped."""
    frame = sys._current_frames().get(threading.main_thread().ident)
    stack = []
    while frame is not None:
        stack.append(frame)
        frame = frame.f_back
    c10d = os.path.join("distributed", "distributed_c10d.py")
    ours = [f for f in stack if f"{os.sep}torch{os.sep}" not in f.f_code.co_filename]
    for i, f in enumerate(stack):  # innermost first
        if f.f_code.co_filename.endswith(c10d):
            outer = [g for g in stack[i:] if g.f_code.co_filename.endswith(c10d)][-1]  # the public API's name
            caller = next((g for g in stack[i:] if g in ours), None)
            return f"in collective {outer.f_code.co_name}" + (f", entered from {_where(caller)}" if caller else "")
    if not ours:
        return "not in a collective"
    innermost = ours[0]
    if ".wait(" in linecache.getline(innermost.f_code.co_filename, innermost.f_lineno):
        return f"waiting on an asynchronous collective at {_where(innermost)}"
    return f"not in a collective, at {_where(innermost)}"


def _where(frame) -> str:
    return f"{_short(frame.f_code.co_filename)}:{frame.f_lineno} ({frame.f_code.co_name})"


def _short(filename: str) -> str:
    """A source path from its package root on (megatron/core/..., pretrain/...), for one-line reports."""
    parts = Path(filename).parts
    for root in ("pretrain", "megatron", "deepspeed", "data_pipeline"):
        if root in parts:
            return "/".join(parts[parts.index(root):])
    return filename


@contextlib.contextmanager
def _exclusive_output(fd: int, wait_s: float = 5.0):
    """Hold an exclusive lock on the file or pipe behind ``fd`` (at most ``wait_s`` waiting for it), so that ranks
    sharing one output (torchrun's children, srun's tasks) write their stack dumps one after another instead of
    interleaving them line by line. The lock is taken through a new open of ``/proc/self/fd/N``: processes that
    inherited the same open file share its locks, a new open does not. Where that fails, no lock is taken."""
    try:
        lock_fd = os.open(f"/proc/self/fd/{fd}", os.O_WRONLY)
    except OSError:  # no /proc, or a socket
        yield
        return
    try:
        deadline = time.monotonic() + wait_s
        while True:
            try:
                fcntl.flock(lock_fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                break
            except BlockingIOError:  # a peer is dumping
                if time.monotonic() > deadline:
                    break  # a peer stuck mid-dump must not stop ours
                time.sleep(0.01)
            except OSError:  # no locks on this kind of file
                break
        yield
    finally:
        os.close(lock_fd)  # releases the lock


def _with_fileno(stream):
    """``stream`` if it has a file descriptor (faulthandler writes to one), else the process's real stderr (a test
    runner may have replaced sys.stderr with an in-memory buffer)."""
    try:
        stream.fileno()
        return stream
    except (AttributeError, OSError, ValueError):  # io.UnsupportedOperation is an OSError and a ValueError
        return sys.__stderr__


def startup_collective_timeout_s(step_timeout_s: float, startup_timeout_s: float = 0.0,
                                 save_timeout_s: float = 0.0) -> float | None:
    """Collective timeout from process start until the first step completes (ft.* timeouts in seconds): the
    longest phase bound plus the time a default :class:`Watchdog` needs to report, so our watchdog (stacks, exit
    86) always fires before a collective fails on its own. torch's defaults would not do: NCCL's is 10 min and,
    with TORCH_NCCL_ASYNC_ERROR_HANDLING=1, kills ranks with SIGABRT (no stacks, no 86) long before a 30-min
    step timeout. None when the watchdog is off (then torch's defaults stay)."""
    if step_timeout_s <= 0:
        return None
    return max(step_timeout_s, startup_timeout_s, save_timeout_s) + min(10.0, step_timeout_s / 4) + 10.0
