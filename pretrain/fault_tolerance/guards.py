"""The NaN / loss-spike guard's pieces: the spike test (``loss_zscore`` over a window kept by ``push_loss``) and
``NonFiniteStep``, which stops a run whose updates cannot go on."""

from __future__ import annotations

import math
import sys

from pretrain.fault_tolerance.signals import NONFINITE_EXIT_CODE


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
