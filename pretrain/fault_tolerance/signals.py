"""Signals only set a flag; the training loop acts on it at a step boundary. And the exit codes a run ends with.

Exit codes: 0 finished; 1 an unexpected error (a traceback), or the watchdog's faulthandler backstop; 2 a bad
config, data or checkpoint (one line); 75 stopped by a signal after saving (requeue); 86 hang watchdog;
87 non-finite loss under ``ft.nan_policy=abort`` (or too many skipped steps in a row).
"""

from __future__ import annotations

import signal

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
