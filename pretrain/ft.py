"""Fault tolerance: signals only set a flag; the training loop acts on it at a step boundary."""

from __future__ import annotations

import signal

import torch
import torch.distributed as dist

#: Exit code of a run stopped by SIGTERM/SIGUSR1 after saving a checkpoint: "requeue me" (EX_TEMPFAIL).
REQUEUE_EXIT_CODE = 75


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
