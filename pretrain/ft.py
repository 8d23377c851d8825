"""Fault tolerance: signals only set a flag; the training loop acts on it at a step boundary.

Also here: the hang watchdog (``Watchdog``: every rank dumps its Python stacks and exits when a step, an evaluation
batch or a save runs past its timeout), the NaN/spike guard's pieces (``loss_zscore``, ``NonFiniteStep``), and the
test hooks that make faults happen on purpose (``TestFaults``): the chaos, watchdog and NaN tests set
``PRETRAIN_TEST_FAULTS`` in the environment of the runs they break; nothing else reads it.

Exit codes: 0 finished; 1 an unexpected error (a traceback), or the watchdog's faulthandler backstop; 2 a bad
config, data or checkpoint (one line); 75 stopped by a signal after saving (requeue); 86 hang watchdog;
87 non-finite loss under ``ft.nan_policy=abort`` (or too many skipped steps in a row).
"""

from __future__ import annotations

import contextlib
import dataclasses
import datetime
import faulthandler
import fcntl
import math
import os
import signal
import sys
import threading
import time
from typing import Callable

import torch
import torch.distributed as dist

#: Exit code of a run stopped by SIGTERM/SIGUSR1 after saving a checkpoint: "requeue me" (EX_TEMPFAIL).
REQUEUE_EXIT_CODE = 75
#: Exit code of a rank whose watchdog fired (a step, evaluation batch or save ran past its ft.*_timeout_s).
#: Distinct from 1 (a crash) so that a requeue policy can tell "hung, probably a bad node" from "bug".
HANG_EXIT_CODE = 86
#: Exit code of a run stopped by a non-finite loss or gradient norm (ft.nan_policy=abort, or
#: ft.max_skipped_in_a_row skipped steps in a row). Requeueing would only repeat it.
NONFINITE_EXIT_CODE = 87


class StopSignal:
    """Records SIGTERM/SIGUSR1 (Slurm pre-emption, ``--signal``); never does work inside the handler."""

    def __init__(self):
        self.received: int | None = None

    def install(self) -> "StopSignal":
        for sig in (signal.SIGTERM, signal.SIGUSR1):
            signal.signal(sig, self._handle)
        return self

    def _handle(self, signum, frame) -> None:
        self.received = signum

    def agreed(self, device: torch.device) -> bool:
        """True on every rank if any rank got a signal (one tiny all-reduce), so all ranks stop at the same step."""
        flag = torch.tensor([1.0 if self.received else 0.0], device=device)
        if dist.is_initialized():
            dist.all_reduce(flag, op=dist.ReduceOp.MAX)
        return bool(flag.item())


#: Environment variable of the fault-injection test hooks, e.g. ``save_delay_s=2,nan_loss_step=3``.
TEST_FAULTS_ENV = "PRETRAIN_TEST_FAULTS"


@dataclasses.dataclass(frozen=True)
class TestFaults:
    """Faults the tests inject into a real run (all off by default); parsed from ``PRETRAIN_TEST_FAULTS``."""

    __test__ = False  # not a pytest test class

    #: Sleep this long after a checkpoint's shards are written and before its commit marker (widens the
    #: window in which a kill leaves an uncommitted directory).
    save_delay_s: float = 0.0
    #: Make the loss of this optimizer step (1-based: the step that completes step N) NaN on every rank.
    nan_loss_step: int = 0
    #: Multiply the loss of this step by 1000 on every rank (a loss spike with finite gradients).
    spike_loss_step: int = 0
    #: Rank that sleeps ``hang_s`` seconds inside step ``hang_step`` (1-based); -1: none.
    hang_rank: int = -1
    #: See hang_rank.
    hang_step: int = 0
    #: See hang_rank.
    hang_s: float = 0.0

    @classmethod
    def from_env(cls) -> "TestFaults":
        text = os.environ.get(TEST_FAULTS_ENV, "").strip()
        if not text:
            return cls()
        fields = {f.name: f.type for f in dataclasses.fields(cls)}
        values = {}
        for item in text.split(","):
            key, _, value = item.partition("=")
            if key.strip() not in fields:
                raise ValueError(f"{TEST_FAULTS_ENV}: unknown fault {key.strip()!r} (known: {', '.join(fields)})")
            kind = float if fields[key.strip()] in ("float", float) else int
            values[key.strip()] = kind(value)
        return cls(**values)


@contextlib.contextmanager
def injected_faults(faults: TestFaults, engine, step: int, rank: int):
    """Apply this step's test faults around its forward/backward: ``hang_*`` sleeps here on ``hang_rank`` (the
    watchdog test looks for this frame in the dumped stacks); ``nan_loss_step`` multiplies every micro-batch loss by
    NaN after the forward and before the backward, so the gradients are NaN too, as after a real overflow;
    ``spike_loss_step`` by 1000 (finite gradients)."""
    if faults.hang_rank == rank and faults.hang_step == step:
        time.sleep(faults.hang_s)
    factor = float("nan") if faults.nan_loss_step == step else 1000.0 if faults.spike_loss_step == step else None
    if factor is None:
        yield
        return
    loss_fn = engine.loss_fn
    engine.loss_fn = lambda output, batch: loss_fn(output, batch) * factor
    try:
        yield
    finally:
        engine.loss_fn = loss_fn


# -- hang watchdog ------------------------------------------------------------------------------------------------


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


def _group_timeout(group) -> datetime.timedelta | None:
    """The shortest collective timeout among a process group's backends, or None where torch does not say."""
    found = []
    for device in getattr(group, "_device_types", []):
        options = getattr(group._get_backend(device), "options", None)
        if getattr(options, "_timeout", None) is not None:
            found.append(options._timeout)
    return min(found) if found else None


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


def set_collective_timeouts(seconds: float, only_lower: bool = False) -> int:
    """Set the collective timeout of every process group this rank belongs to (the default group, megatron-core's
    and DeepSpeed's, whichever library created them) to ``seconds``; with ``only_lower`` never raise one. Returns
    how many groups changed. Uses torch's private ``_set_pg_timeout`` (torch 2.13); without it, nothing changes.
    """
    from torch.distributed import distributed_c10d as c10d

    set_timeout = getattr(c10d, "_set_pg_timeout", None)
    if set_timeout is None or not dist.is_initialized():
        return 0
    bound = datetime.timedelta(seconds=seconds)
    changed = 0
    for group in list(c10d._world.pg_map):
        current = _group_timeout(group)
        if current != bound and not (only_lower and current is not None and current <= bound):
            set_timeout(bound, group)
            changed += 1
    return changed


def tighten_collective_timeouts(seconds: float) -> int:
    """Lower every process group's collective timeout to ``seconds`` (never raise one): after the first step a
    collective stuck on a dead or hung peer should fail within the run's own bound (on NCCL its watchdog then
    aborts the communicator), not the startup bound that covered resume and warm-up."""
    return set_collective_timeouts(seconds, only_lower=True)


# -- NaN / spike guard --------------------------------------------------------------------------------------------


def loss_zscore(window: tuple[float, ...], loss: float) -> float:
    """How many standard deviations (sample std of ``window``) ``loss`` lies above the window's mean; NaN while the
    window has fewer than 2 losses. A window of equal losses gets a tiny floor on its spread, so a jump still
    stands out instead of dividing by zero."""
    if len(window) < 2 or not math.isfinite(loss):
        return math.nan
    mean = sum(window) / len(window)
    std = math.sqrt(sum((x - mean) ** 2 for x in window) / (len(window) - 1))
    return (loss - mean) / max(std, 1e-6 * abs(mean), 1e-12)


def push_loss(window: tuple[float, ...], loss: float, size: int) -> tuple[float, ...]:
    """The window with ``loss`` appended, keeping the newest ``size`` (a tuple, so a checkpoint written in the
    background never sees it change). Spikes are kept in it: a lasting change of the loss level is learnt within a
    few steps instead of flagging every later step."""
    return (window + (loss,))[-size:] if math.isfinite(loss) else window


class NonFiniteStep(SystemExit):
    """Stops the run (every rank decides alike) with ``NONFINITE_EXIT_CODE`` after a one-line message on rank 0;
    a SystemExit, so no traceback is printed and the launcher's cleanup still runs."""

    def __init__(self, message: str, rank: int):
        if rank == 0:
            print(f"error: {message}", file=sys.stderr, flush=True)
        super().__init__(NONFINITE_EXIT_CODE)
