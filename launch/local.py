"""``pretrain launch local``: the torchrun command line for one node (standalone) or one node of many (c10d).

torchrun, not a launcher of our own: it already restarts failed workers (``--max-restarts``), joins elastic
rendezvous and exports RANK/WORLD_SIZE/LOCAL_RANK/MASTER_ADDR/MASTER_PORT, which ``pretrain train`` reads.
"""

from __future__ import annotations

import dataclasses
import os
import subprocess
import sys


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

    def __post_init__(self):
        from pretrain.config import ConfigError

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


def _valid_endpoint(text: str) -> bool:
    host, sep, port = text.rpartition(":")
    return bool(sep and host and port.isdigit() and 0 < int(port) < 65536)


def torchrun_argv(launch: LocalLaunch, pretrain_args: list[str]) -> list[str]:
    """``python -m torch.distributed.run ... -m pretrain <pretrain_args>`` for this node."""
    argv = [sys.executable, "-m", "torch.distributed.run", f"--nproc-per-node={launch.nproc}",
            f"--max-restarts={launch.max_restarts}"]
    if launch.nnodes == 1 and not launch.rdzv_endpoint:
        argv.append("--standalone")
    else:
        argv += [f"--nnodes={launch.nnodes}", "--rdzv-backend=c10d", f"--rdzv-endpoint={launch.rdzv_endpoint}",
                 f"--rdzv-id={launch.rdzv_id}"]
        if launch.node_rank is not None:
            argv.append(f"--node-rank={launch.node_rank}")
    return argv + ["-m", "pretrain", *pretrain_args]


def run(launch: LocalLaunch, pretrain_args: list[str]) -> int:
    """Run torchrun in the foreground; its exit code is ours (75: checkpointed on a signal, rerun to resume)."""
    argv = torchrun_argv(launch, pretrain_args)
    print("launch:", " ".join(argv[1:]), flush=True)
    return subprocess.call(argv, env=dict(os.environ))
