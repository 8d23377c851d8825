"""The hang watchdog: every rank dumps its Python stacks and exits with HANG_EXIT_CODE when a step, an evaluation
batch or a save runs past its timeout; and the collective timeout that lets it fire first."""

from __future__ import annotations

import contextlib
import faulthandler
import fcntl
import os
import sys
import threading
import time
from typing import Callable

from pretrain.fault_tolerance.signals import HANG_EXIT_CODE
from pretrain.parallel.env import tighten_collective_timeouts


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
                 exit_fn: Callable[[int], None] = os._exit, backstop: bool = True):
        """Timeouts in seconds (0: ``step_timeout_s``; ``step_timeout_s`` 0 disables). ``linger_s`` (default a
        quarter of step_timeout_s, at most 10 s): after dumping, wait this long before exiting, so that peers whose
        deadline falls at the same moment dump theirs too (a rank that exits first breaks its peers' collectives,
        which would then end with a connection error instead of their stacks). ``stream``: where the line and the
        stacks go (needs a file descriptor; default stderr). ``exit_fn``/``backstop`` exist for tests."""
        self.enabled = step_timeout_s > 0
        self.timeouts = {"step_timeout_s": step_timeout_s,
                         "startup_timeout_s": startup_timeout_s or step_timeout_s,
                         "save_timeout_s": save_timeout_s or step_timeout_s}
        self.rank, self.stream, self.exit_fn = rank, _with_fileno(stream or sys.stderr), exit_fn
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
        with _exclusive_output(self.stream.fileno()):
            # Straight to the file descriptor, as faulthandler writes: no Python-level lock a hung thread may hold.
            os.write(self.stream.fileno(), line.encode())
            faulthandler.dump_traceback(file=self.stream, all_threads=True)
        time.sleep(self.linger_s)
        self.exit_fn(HANG_EXIT_CODE)


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
