"""CheckpointManager: ``checkpoints/step_<N>/`` directories that count only once their commit marker exists.

Layout of one checkpoint::

    step_<N>/
      mp_rank_XX_model_states.pt, zero_pp_rank_*_optim_states.pt   DeepSpeed engine (model + ZeRO optimizer)
      train_state_rank<R>.pt                                       per rank: counters, data position, RNG states
      config.yaml                                                  the resolved run config
      COMMITTED                                                    JSON marker, written last by rank 0
    latest                                                         text: name of the newest complete checkpoint

The marker is written (temp file + rename) only after every rank has finished writing, so a crash mid-save leaves
a directory without a marker, which is never loaded and is cleared before the same step is saved again.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import time
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist

MARKER = "COMMITTED"
LATEST = "latest"
_STEP_DIR = re.compile(r"^step_(\d+)$")


class CheckpointError(RuntimeError):
    """A checkpoint that cannot be loaded; the message is one line and names the directory."""


def _atomic_write(path: Path, text: str) -> None:
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(text)
    os.replace(tmp, path)  # atomic on POSIX: readers see the old or the new file, never half of one


def _barrier() -> None:
    if dist.is_initialized():
        dist.barrier()


class CheckpointManager:
    """Saves and finds complete checkpoints under ``root``; keeps the newest ``keep_last`` (0 = all)."""

    def __init__(self, root: str | Path, keep_last: int = 0):
        self.root = Path(root)
        self.keep_last = keep_last
        self.rank = dist.get_rank() if dist.is_initialized() else 0
        self.world_size = dist.get_world_size() if dist.is_initialized() else 1

    # -- finding -------------------------------------------------------------------------------------------------

    def complete_steps(self) -> list[int]:
        """Steps with a commit marker, ascending."""
        if not self.root.is_dir():
            return []
        steps = [int(m.group(1)) for p in self.root.iterdir() if (m := _STEP_DIR.match(p.name))]
        return sorted(s for s in steps if (self.path(s) / MARKER).is_file())

    def latest(self) -> Path | None:
        """The newest complete checkpoint directory, or None."""
        steps = self.complete_steps()
        return self.path(steps[-1]) if steps else None

    def path(self, step: int) -> Path:
        return self.root / f"step_{step}"

    # -- saving --------------------------------------------------------------------------------------------------

    def save(self, step: int, engine, train_state: dict[str, Any], config_yaml: str, layout: dict) -> Path:
        """Collective: every rank writes its shards, then rank 0 commits. Returns the checkpoint directory."""
        path = self.path(step)
        if self.rank == 0 and path.exists():
            shutil.rmtree(path)  # an uncommitted leftover of a crash at this step, or a re-save of this step
        _barrier()
        start = time.perf_counter()
        engine.save_checkpoint(str(self.root), tag=path.name, save_latest=False)
        torch.save(train_state, path / f"train_state_rank{self.rank:05d}.pt")
        _barrier()  # every rank's files are on disk before the marker says so
        if self.rank == 0:
            (path / "config.yaml").write_text(config_yaml)
            files = {p.name: p.stat().st_size for p in sorted(path.iterdir()) if p.is_file()}
            marker = {"step": step, "world_size": self.world_size, "layout": layout, "files": files,
                      "saved_at": time.time(), "save_seconds": time.perf_counter() - start}
            _atomic_write(path / MARKER, json.dumps(marker, indent=1))
            _atomic_write(self.root / LATEST, path.name + "\n")
            self._prune()
        _barrier()
        return path

    def _prune(self) -> None:
        if self.keep_last <= 0:
            return
        for step in self.complete_steps()[: -self.keep_last]:
            shutil.rmtree(self.path(step), ignore_errors=True)

    # -- loading -------------------------------------------------------------------------------------------------

    def load(self, path: str | Path, engine) -> dict[str, Any]:
        """Load engine state and this rank's train state from a complete checkpoint; returns the train state."""
        path = Path(path)
        marker = read_marker(path)
        if marker["world_size"] != self.world_size:
            raise CheckpointError(
                f"{path}: saved with world size {marker['world_size']}, this run has {self.world_size} "
                "(loading into another layout is not supported yet)")
        state_file = path / f"train_state_rank{self.rank:05d}.pt"
        if not state_file.is_file():
            raise CheckpointError(f"{state_file}: missing train state for rank {self.rank}")
        loaded, _ = engine.load_checkpoint(str(path.parent), tag=path.name, load_lr_scheduler_states=False)
        if loaded is None:
            raise CheckpointError(f"{path}: DeepSpeed found no engine state to load")
        return torch.load(state_file, weights_only=False)


def read_marker(path: str | Path) -> dict[str, Any]:
    """The commit marker of a checkpoint directory; a one-line CheckpointError if it is absent or unreadable."""
    marker = Path(path) / MARKER
    if not marker.is_file():
        raise CheckpointError(f"{path}: not a complete checkpoint (no {MARKER} marker)")
    try:
        return json.loads(marker.read_text())
    except json.JSONDecodeError as e:
        raise CheckpointError(f"{marker}: unreadable commit marker ({e})") from None
