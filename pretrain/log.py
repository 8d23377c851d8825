"""Diagnostics through ``logging``, rank-aware: rank 0 logs at INFO, every other rank only warnings and errors,
and every line names its rank, so the interleaved output of torchrun's or srun's tasks stays readable.

The console metrics line and what a command is asked to print (``pretrain eval``'s numbers, generated text) are
not diagnostics and stay on stdout.
"""

from __future__ import annotations

import logging
import os
import sys


def setup_logging(rank: int | None = None) -> None:
    """Configure logging once per process: stderr, ``rank R`` in every line, our INFO on rank 0 only.

    ``rank`` defaults to the launcher's RANK (torchrun) or SLURM_PROCID (a bare srun task), else 0.
    """
    if rank is None:
        rank = int(os.environ.get("RANK", os.environ.get("SLURM_PROCID", "0")))
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(logging.Formatter(f"%(asctime)s rank {rank} %(levelname)s %(name)s: %(message)s",
                                           datefmt="%H:%M:%S"))
    root = logging.getLogger()
    root.handlers[:] = [handler]
    # Libraries (megatron-core, DeepSpeed) log at WARNING and above: their INFO lines repeat per rank and per
    # import, and would bury a one-line config error under banners. Our own loggers log at INFO on rank 0.
    root.setLevel(logging.WARNING)
    for ours in ("pretrain", "data_pipeline", "launch"):
        logging.getLogger(ours).setLevel(logging.INFO if rank == 0 else logging.WARNING)
