"""``pretrain launch local``: torchrun for one node (standalone) or one node of many (c10d), run in this process.

torchrun, not a launcher of our own: it already restarts failed workers (``--max-restarts``), joins elastic
rendezvous and exports RANK/WORLD_SIZE/LOCAL_RANK/MASTER_ADDR/MASTER_PORT, which ``pretrain train`` reads.

Exit code. torchrun as a program exits 1 whenever any worker failed, so a job's 75 ("checkpointed on a signal,
requeue me", pretrain.fault_tolerance.REQUEUE_EXIT_CODE) and 86 (hang watchdog, ft.HANG_EXIT_CODE) would both read as a crash.
We therefore run torchrun's own entry (``torch.distributed.run.parse_args`` + ``run``) inside this process and
read its accounting of this node's workers: on failure its elastic agent raises ``ChildFailedError`` whose
``failures`` hold every failed worker's real exit code (workers not listed exited 0). That is the agent's
bookkeeping, the same per node under ``--standalone`` and a multi-node c10d rendezvous, and needs neither log
parsing nor error files (``@record`` writes those only for exceptions, not for ``sys.exit(75)``).
:func:`node_exit_code` turns the codes into ours: 86 if any worker hung, 75 only if every worker exited 75, else
the root-cause worker's code (a signal N as 128 + N, as shells and srun report it).

Signals. The agent starts each worker in a session of its own, so a SIGTERM or SIGUSR1 for the job reaches only
this process. torchrun's own SIGTERM handling would pass it on and SIGKILL any worker still busy after its
shutdown timeout (30 s: a large checkpoint takes longer) and would lose the workers' exit codes; SIGUSR1 (Slurm's
``--signal``) would simply kill this process and orphan the workers. So SIGTERM and SIGUSR1 are ours
(:class:`StopForwarder`): passed on to each training process, which saves at the next step boundary and exits 75;
we wait for all of them, keep their codes, then let the agent shut down as after any signal (no restart).
SIGINT/SIGHUP/SIGQUIT stay torchrun's (abort).
"""

from __future__ import annotations

import contextlib
import dataclasses
import logging
import os
import signal
import socket
import sys
import threading
import time
from pathlib import Path

from pretrain.fault_tolerance import HANG_EXIT_CODE, REQUEUE_EXIT_CODE

logger = logging.getLogger(__name__)

#: Signals that ask the training processes to checkpoint and stop (pretrain.fault_tolerance.StopSignal); the launcher forwards
#: them itself. torchrun keeps the rest of its default set (SIGTERM,SIGINT,SIGHUP,SIGQUIT).
STOP_SIGNALS = (signal.SIGTERM, signal.SIGUSR1)
#: A file (set by slurm/multi_node.sbatch) to which a launcher whose node held a frozen rank appends its hostname.
HUNG_NODES_ENV = "PRETRAIN_HUNG_NODES_FILE"
TORCHRUN_SIGNALS = "SIGINT,SIGHUP,SIGQUIT"


@dataclasses.dataclass(frozen=True)
class LocalLaunch:
    """One torchrun invocation (one per node)."""

    #: Worker processes on this node (one per GPU; on CPU, gloo processes).
    nproc: int
    #: Nodes in the job; 1 runs torchrun --standalone (its own rendezvous on a free local port).
    nnodes: int = 1
    #: This node's index with a static rendezvous; None lets the c10d rendezvous assign ranks (elastic).
    node_rank: int | None = None
    #: HOST:PORT of the c10d rendezvous (any node's address, the same on every node); required when nnodes > 1.
    rdzv_endpoint: str | None = None
    #: Rendezvous id: nodes of one job share it, so two jobs on one endpoint do not mix.
    rdzv_id: str = "pretrain"
    #: Times torchrun restarts all workers after one fails (elastic restart; they resume from the checkpoint).
    max_restarts: int = 0
    #: Seconds the rendezvous waits for every node (torchrun's join_timeout; the run's ft.startup_timeout_s):
    #: a node that never arrives ends the launch with one error line instead of torchrun's 600 s default wait.
    join_timeout_s: float = 600.0
    #: The run directory's hang/ (pretrain.fault_tolerance.HANG_DIR) where ranks write hang reports; None: the
    #: launcher does not watch for hangs (then a frozen worker is left to torchrun).
    hang_dir: str | None = None

    def __post_init__(self):
        from pretrain.errors import ConfigError
        from pretrain.parallel.preflight import check_rendezvous_host

        if self.nproc < 1:
            raise ConfigError(f"--nproc: must be >= 1, got {self.nproc}")
        if self.nnodes < 1:
            raise ConfigError(f"--nnodes: must be >= 1, got {self.nnodes}")
        if self.max_restarts < 0:
            raise ConfigError(f"--max-restarts: must be >= 0, got {self.max_restarts}")
        if self.nnodes > 1 and not self.rdzv_endpoint:
            raise ConfigError("--rdzv-endpoint: required with --nnodes > 1 (HOST:PORT reachable from every node)")
        if self.rdzv_endpoint and not _valid_endpoint(self.rdzv_endpoint):
            raise ConfigError(f"--rdzv-endpoint: expected HOST:PORT, got {self.rdzv_endpoint!r}")
        if self.node_rank is not None and not 0 <= self.node_rank < self.nnodes:
            raise ConfigError(f"--node-rank: must be in [0, {self.nnodes}), got {self.node_rank}")
        if self.rdzv_endpoint:
            check_rendezvous_host(self.rdzv_endpoint.rpartition(":")[0].strip("[]"), self.nnodes)


def _valid_endpoint(text: str) -> bool:
    host, sep, port = text.rpartition(":")
    return bool(sep and host and port.isdigit() and 0 < int(port) < 65536)


def torchrun_args(launch: LocalLaunch, pretrain_args: list[str]) -> list[str]:
    """torchrun's own arguments for this node: ``--nproc-per-node=... -m pretrain <pretrain_args>``."""
    args = [f"--nproc-per-node={launch.nproc}", f"--max-restarts={launch.max_restarts}",
            f"--signals-to-handle={TORCHRUN_SIGNALS}"]  # SIGTERM/SIGUSR1: StopForwarder
    if launch.nnodes == 1 and not launch.rdzv_endpoint:
        args.append("--standalone")
    else:
        args += [f"--nnodes={launch.nnodes}", "--rdzv-backend=c10d", f"--rdzv-endpoint={launch.rdzv_endpoint}",
                 f"--rdzv-id={launch.rdzv_id}", f"--rdzv-conf=join_timeout={launch.join_timeout_s:g}"]
        if launch.node_rank is not None:
            args.append(f"--node-rank={launch.node_rank}")
    return args + ["-m", "pretrain", *pretrain_args]


def torchrun_argv(launch: LocalLaunch, pretrain_args: list[str]) -> list[str]:
    """The same as a command line: ``python -m torch.distributed.run ... -m pretrain <pretrain_args>``."""
    return [sys.executable, "-m", "torch.distributed.run", *torchrun_args(launch, pretrain_args)]


def node_exit_code(codes: list[int], nproc: int) -> int:
    """One exit code for this node from its workers' codes (root cause first; workers not listed exited 0).

    86 (a hang) if any worker's watchdog fired: the job is stuck, whatever its peers then did; 75 only if every
    worker saved and asked for a requeue; 0 if all finished; else the first failure that is neither, with death by
    signal N as 128 + N; 1 for a mix of 75 and 0, which no consistent run produces.
    """
    codes = list(codes) + [0] * (nproc - len(codes))
    if HANG_EXIT_CODE in codes:
        return HANG_EXIT_CODE
    if all(c == REQUEUE_EXIT_CODE for c in codes):
        return REQUEUE_EXIT_CODE
    for code in codes:
        if code not in (0, REQUEUE_EXIT_CODE):
            return 128 - code if code < 0 else code
    return 0 if all(c == 0 for c in codes) else 1


class StopForwarder:
    """SIGTERM/SIGUSR1 handler of the launcher: forward the signal to every training process (the process only,
    not its session: its data-loader workers must not die before it has saved), wait until all have exited, keep
    their exit codes in ``codes`` and raise torch's ``SignalException`` so the elastic agent stops without
    restarting (the workers are gone by then, so its SIGKILL after a timeout has nothing left to hit).

    A repeated signal while waiting is forwarded too (the workers record it; one save still happens) and the first
    handler keeps waiting. The wait has no bound of its own: a worker stuck in its save is ended by its own hang
    watchdog (ft.save_timeout_s), and a scheduler's kill after its grace period ends everything anyway.
    """

    def __init__(self):
        #: Exit codes of the training processes, in the order they exited; None until a signal came.
        self.codes: list[int] | None = None
        self.signum: int | None = None

    def __call__(self, signum: int, frame) -> None:
        import psutil
        from torch.distributed.elastic.multiprocessing.api import SignalException

        workers = _training_processes()
        for proc in workers:
            try:
                os.kill(proc.pid, signum)
            except ProcessLookupError:  # exited meanwhile; its code is collected below
                pass
        if self.signum is not None:
            return  # the first handler (further up this stack) is still waiting for them
        self.signum = signum
        name = signal.Signals(signum).name
        logger.warning("launch: got %s; passed it to %d training processes, waiting for them to save and exit",
                       name, len(workers))
        # wait_procs reaps our own children and reports their exit codes (negative: killed by that signal).
        gone, _ = psutil.wait_procs(workers)  # in the order they exited
        self.codes = [p.returncode if p.returncode is not None else 1 for p in gone]
        raise SignalException(f"launcher got {name}", sigval=signal.Signals(signum))


def _training_processes():
    """This process's children that run ``pretrain`` (the agent's workers; the elastic agent runs in-process)."""
    import psutil

    found = []
    for child in psutil.Process().children(recursive=False):
        try:
            if "pretrain" in child.cmdline():
                found.append(child)
        except psutil.ZombieProcess:  # exited, not yet reaped: a worker that just finished; its code counts
            found.append(child)
        except psutil.NoSuchProcess:
            pass
    return found


class HangMonitor:
    """Watches the run's hang/ directory while this node's workers run (a thread of the launcher, which no frozen
    worker can stop). Once any rank of the job, on any node, has reported a hang, each of this node's training
    processes that has not written its own report within ``grace_s`` is frozen (SIGSTOP, a stuck driver call that
    holds the GIL past the backstop) or gone: the monitor writes its report from outside (process state, kernel
    wait channel), SIGKILLs it and records its rank in ``killed``, so the node exits 86 like its peers instead of
    waiting on a process that will never move. Reports older than the monitor or its last round (an earlier
    attempt's) are ignored."""

    def __init__(self, hang_dir: str, grace_s: float = 5.0, poll_s: float = 0.5):
        self.hang_dir, self.grace_s, self.poll_s = Path(hang_dir), grace_s, poll_s
        self.started = time.time()
        #: Ranks this monitor killed for not reporting their own hang.
        self.killed: list[int] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="pretrain-hang-monitor", daemon=True)

    def __enter__(self) -> "HangMonitor":
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join(timeout=10)

    def _fresh_reports(self) -> dict[int, Path]:
        found = {}
        for path in self.hang_dir.glob("rank_*.txt"):
            try:
                if path.stat().st_mtime >= self.started and path.stem.removeprefix("rank_").isdigit():
                    found[int(path.stem.removeprefix("rank_"))] = path
            except FileNotFoundError:
                pass
        return found

    def _run(self) -> None:
        while not self._stop.wait(self.poll_s):
            if not (reports := self._fresh_reports()):
                continue
            if self._stop.wait(self.grace_s):
                return
            reported = self._fresh_reports()
            for proc in _training_processes():
                rank = _rank_of(proc)
                if rank is not None and rank not in reported:
                    self._report_and_kill(proc, rank, min(reports))
            self.started = time.time()  # with --max-restarts the next attempt may hang anew: watch for that

    def _report_and_kill(self, proc, rank: int, first: int) -> None:
        import psutil

        from pretrain.fault_tolerance import hang_file

        try:
            status = proc.status()
            wchan = Path(f"/proc/{proc.pid}/wchan").read_text().strip() or "-"
        except (psutil.Error, OSError):
            status, wchan = "gone", "-"
        line = (f"rank {rank} (host {socket.gethostname()}, pid {proc.pid}): no hang report of its own within "
                f"{self.grace_s:g} s of rank {first}'s; process {status} (kernel wait channel {wchan}); killed by "
                "its launcher (SIGKILL) - suspect this rank or its host\n")
        try:
            hang_file(self.hang_dir, rank).write_text(line)
        except OSError as e:
            line += f"(could not write its report: {e})\n"
        logger.error("launch: %s", line.strip())
        self.killed.append(rank)
        try:
            proc.kill()  # SIGKILL ends a stopped process too
        except psutil.NoSuchProcess:
            pass


def _rank_of(proc) -> int | None:
    """The global RANK torchrun gave a worker (from its environment)."""
    import psutil

    try:
        return int(proc.environ()["RANK"])
    except (psutil.Error, KeyError, ValueError):
        return None


def run(launch: LocalLaunch, pretrain_args: list[str]) -> int:
    """Run torchrun in this process until this node's workers are done; returns :func:`node_exit_code` of their
    exit codes (75: every worker checkpointed on a signal, rerun to resume; 86: a hang, also one this node's
    :class:`HangMonitor` ended; 1 when not every node arrived at the rendezvous within ``join_timeout_s``)."""
    from torch.distributed.elastic.rendezvous.api import RendezvousTimeoutError

    from pretrain.parallel.preflight import NNODES_ENV

    args = torchrun_args(launch, pretrain_args)
    logger.info("launch: torchrun %s", " ".join(args))
    os.environ[NNODES_ENV] = str(launch.nnodes)  # the workers' preflight checks that this many nodes joined
    # A node that replaces a lost one must be able to join the next rendezvous round. With the rendezvous TCP
    # store shared with the workers (torch's default since 2.4), rank 0's agent publishes MASTER_ADDR/PORT only in
    # its first round, and the newcomer waits for them in the new round's keys forever while rank 0 waits for the
    # newcomer (torch 2.13, dynamic_rendezvous.next_rendezvous; tests/multinode/test_torchrun_hosts.py). Without
    # sharing, rank 0 publishes them every round and the workers start a store of their own, as before 2.4. One
    # node keeps the shared store: its workers' own store would bind a port torchrun picked from the ephemeral
    # range and let go of, which an outgoing connection can take first.
    if launch.nnodes > 1:
        os.environ.setdefault("TORCH_DISABLE_SHARE_RDZV_TCP_STORE", "1")
    forwarder = StopForwarder()
    previous = {sig: signal.signal(sig, forwarder) for sig in STOP_SIGNALS}
    monitor = HangMonitor(launch.hang_dir) if launch.hang_dir else None
    try:
        with monitor or contextlib.nullcontext():
            code = _run_torchrun(args, launch, forwarder)
    except RendezvousTimeoutError:
        logger.error("launch: not all %d nodes arrived at the rendezvous %s (id %s) within %g s "
                     "(ft.startup_timeout_s); check that every node runs this launch with the same endpoint and id "
                     "and can reach it", launch.nnodes, launch.rdzv_endpoint, launch.rdzv_id, launch.join_timeout_s)
        return 1
    except Exception:
        if not (monitor and monitor.killed):
            raise
        # The agent can fail on its way out of a hang (its peers' store is gone): the hang is what to report.
        logger.warning("launch: torchrun failed after a hang", exc_info=True)
        code = HANG_EXIT_CODE
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)
    if monitor and monitor.killed and code != 0:  # (a restarted group that then finished is a success)
        logger.error("launch: rank(s) %s never reported their own hang and were killed; exit code %d",
                     monitor.killed, HANG_EXIT_CODE)
        if hung_nodes_file := os.environ.get(HUNG_NODES_ENV):  # slurm/multi_node.sbatch excludes these on requeue
            with open(hung_nodes_file, "a") as f:
                f.write(socket.gethostname() + "\n")
        return HANG_EXIT_CODE
    return code


def _run_torchrun(args: list[str], launch: LocalLaunch, forwarder: StopForwarder) -> int:
    """torchrun's own entry with our signal forwarder installed; the node's exit code from the workers'."""
    from torch.distributed import run as torchrun
    from torch.distributed.elastic.multiprocessing.api import SignalException
    from torch.distributed.elastic.multiprocessing.errors import ChildFailedError

    try:
        torchrun.run(torchrun.parse_args(args))
        return 0
    except ChildFailedError as e:
        # Root cause first, as torchrun reports it; the summary table names each failed rank and its exit code.
        failures = sorted(e.failures.values(), key=lambda f: f.timestamp)
        code = node_exit_code([f.exitcode for f in failures], launch.nproc)
        logger.error("launch: exit code %d from the workers' exit codes\n%s", code, e.format_msg())
        return code
    except SignalException as e:
        if not forwarder.codes:  # SIGINT/SIGHUP/SIGQUIT (torchrun's), or a stop before any worker existed
            return 128 + int(e.sigval)
        code = node_exit_code(forwarder.codes, len(forwarder.codes))  # each process it waited for reported
        logger.warning("launch: training processes exited with %s after %s: exit code %d", forwarder.codes,
                       signal.Signals(forwarder.signum).name, code)
        return code
