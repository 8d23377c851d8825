"""CheckpointManager: ``checkpoints/step_<N>/`` directories that count only once their commit marker exists.

The directory layout and the marker are format.py's.

Every rank writes its own files (DeepSpeed decides which; ``CheckpointWriter`` does the writing and hashes
what it wrote). The marker, with the step, the layout and each file's size and sha256, is written (temp file +
rename) only after every rank reported its files done, so a crash mid-save leaves a directory without a marker:
it is never loaded and is cleared before the same step is saved again. Loading checks sizes and checksums (each
rank hashes a share of the files); resuming automatically falls back to the newest checkpoint that passes.

Which checkpoint a run resumes from (``resume_point``) is rank 0's decision, with Megatron's load/save semantics:
the newest of the run's own checkpoints that verifies, else ``checkpoint.load`` (another run's checkpoint that
seeds this one), else none. Every rank checks that it reads the same commit marker (sha256) as rank 0, so all ranks
load the same checkpoint or all fail with the same one-line error. Files are read through ``safe_load`` (weights
only: unpickling a checkpoint runs no code from it).

With ``async_save`` a save only snapshots the state (copies to host memory) and a background thread writes it;
the commit happens at a later step boundary once every rank is done (``poll``), and at the latest when the next
save starts or the run ends (``wait``).
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch.distributed as dist

from pretrain.checkpoint.format import (LATEST, MARKER, STEP_DIR, atomic_write, check_model_fits, complete_steps,
                                       layout_changes, read_marker, step_path)
from pretrain.checkpoint.safe_load import load_checkpoint_file
from pretrain.checkpoint.writer import CheckpointWriter, deepspeed_checkpoint_engine, file_sha256
from pretrain.config import ModelConfig
from pretrain.errors import CheckpointError
from pretrain.fault_tolerance import TestFaults

logger = logging.getLogger(__name__)


class CheckpointDisagreement(CheckpointError):
    """Ranks see different contents at a checkpoint's path (a rank cannot read it, or reads another commit
    marker). Fatal, never skipped for an older checkpoint: the ranks would not see that one alike either."""


@dataclass(frozen=True)
class ResumePoint:
    """The checkpoint a run continues from: chosen by rank 0, verified, the same on every rank."""

    path: Path
    marker: dict[str, Any]
    digest: str  # sha256 of the commit marker's bytes, which every rank read alike
    reason: str  # why this one, for the log


def _barrier() -> None:
    if dist.is_initialized():
        dist.barrier()


def _world() -> tuple[int, int]:
    return (dist.get_rank(), dist.get_world_size()) if dist.is_initialized() else (0, 1)


def _gather(obj: Any) -> list[Any]:
    """Every rank's ``obj`` in rank order, on every rank (a CPU object gather: gloo and NCCL alike)."""
    if not dist.is_initialized():
        return [obj]
    gathered = [None] * dist.get_world_size()
    dist.all_gather_object(gathered, obj)
    return gathered


def _from_rank0(obj: Any) -> Any:
    """Rank 0's ``obj`` on every rank."""
    if not dist.is_initialized():
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def _all_true(ok: bool) -> bool:
    """True on every rank iff ``ok`` on every rank."""
    return all(_gather(ok))


class CheckpointManager:
    """Saves, commits, verifies and finds checkpoints under ``root``.

    keep_last: newest complete checkpoints kept (0 = all); keep_every: steps that are multiples of it are kept
    for good (0 = none); async_save: write in a background thread; layout: this run's (marker "layout").
    """

    def __init__(self, root: str | Path, keep_last: int = 0, keep_every: int = 0, async_save: bool = False,
                 layout: dict | None = None):
        self.root = Path(root)
        self.keep_last, self.keep_every, self.async_save = keep_last, keep_every, async_save
        self.layout = layout or {}
        self.rank, self.world_size = _world()
        self.faults = TestFaults.from_env()
        self._pending: tuple[int, Path, CheckpointWriter, float] | None = None
        #: Numbers of the last save: seconds the training loop was blocked, seconds of writing, bytes written.
        self.stats: dict[str, float] = {}
        #: The last commit as metrics record keys (step, unix time, seconds from save start to commit); {} before.
        self.last_commit: dict[str, float] = {}
        #: Complete (marked) checkpoints that failed verification at resume: left for a human, never pruned.
        self.bad_steps: set[int] = set()

    # -- finding -------------------------------------------------------------------------------------------------

    def complete_steps(self) -> list[int]:
        """Steps with a commit marker, ascending."""
        return complete_steps(self.root)

    def latest(self) -> Path | None:
        """The newest complete checkpoint directory (marker present; contents not verified), or None."""
        steps = self.complete_steps()
        return self.path(steps[-1]) if steps else None

    def path(self, step: int) -> Path:
        return step_path(self.root, step)

    def resume_point(self, explicit: str = "") -> ResumePoint | None:
        """Collective: the checkpoint to resume from, decided by rank 0 and verified; None to start fresh.

        The run's own newest checkpoint that verifies wins (one that does not is skipped with a warning and
        remembered in ``bad_steps``, which pruning neither counts nor deletes); ``explicit`` (checkpoint.load) is
        used only when none of the run's own does, so a requeued run continues from its own progress instead of
        going back to the checkpoint that seeded it (a bad ``explicit`` raises CheckpointError). Ranks that
        disagree about what they see raise the same one-line CheckpointDisagreement on every rank.
        """
        # Rank 0 lists the candidates: another rank's listing may differ (a commit racing the scan, storage that
        # is not shared), and ranks choosing on their own would load different steps.
        own = _from_rank0([self.path(s) for s in reversed(self.complete_steps())] if self.rank == 0 else None)
        for path in own:
            try:
                marker, digest = self._verified(path)
            except CheckpointDisagreement:
                raise
            except CheckpointError as e:
                self.bad_steps.add(int(STEP_DIR.match(path.name).group(1)))
                if self.rank == 0:
                    logger.warning("skipping checkpoint: %s", e)
                continue
            why = f"the newest complete checkpoint of this run in {self.root}"
            if explicit:
                why += f"; checkpoint.load={explicit} only seeds a run without checkpoints of its own"
            return ResumePoint(path, marker, digest, why)
        if explicit:
            marker, digest = self._verified(Path(explicit))
            why = (f"none of the {len(own)} complete checkpoints in {self.root} verifies" if own else
                   f"{self.root} has no complete checkpoint yet")
            return ResumePoint(Path(explicit), marker, digest, f"checkpoint.load, since {why}")
        if own and self.rank == 0:
            logger.warning("none of the %d complete checkpoints in %s verifies: starting from step 0", len(own),
                           self.root)
        return None

    def verify(self, path: str | Path) -> dict[str, Any]:
        """Collective: the marker exists, reads the same on every rank, and every file it lists has its size and
        sha256 (each rank hashes a share); returns the marker, else raises a one-line CheckpointError naming the
        first bad file (CheckpointDisagreement where ranks see different things)."""
        return self._verified(Path(path))[0]

    def _verified(self, path: Path) -> tuple[dict[str, Any], str]:
        marker, digest = self._agreed_marker(path)
        by_size, by_hash = [], []  # what this rank finds by stat (every file), by hashing (its share)
        for i, (name, meta) in enumerate(sorted(marker["files"].items())):
            file = path / name
            if not file.is_file():
                by_size.append(f"{file}: missing")
            elif file.stat().st_size != meta["bytes"]:
                by_size.append(f"{file}: {file.stat().st_size} bytes, the marker says {meta['bytes']} (truncated?)")
            elif i % self.world_size == self.rank and file_sha256(file) != meta["sha256"]:
                by_hash.append(f"{file}: sha256 does not match the marker's (corrupt)")
        views = _gather((by_size, by_hash))
        rank0 = set(views[0][0])  # rank 0's stat decides; a rank that sees less is not on the same storage
        for rank, (seen, _) in enumerate(views):
            if other := [p for p in seen if p not in rank0]:
                raise CheckpointDisagreement(f"rank {rank} sees {other[0]}, rank 0 does not: every rank must see "
                                             "the same checkpoint files (shared storage?)")
        problems = sorted(rank0 | {p for _, hashed in views for p in hashed})
        if problems:
            raise CheckpointError(problems[0] + (f" (and {len(problems) - 1} more)" if len(problems) > 1 else ""))
        return marker, digest

    def _agreed_marker(self, path: Path) -> tuple[dict[str, Any], str]:
        """Collective: the commit marker at ``path`` and the sha256 of its bytes, once every rank has read the same
        bytes as rank 0. Rank 0 cannot read it: CheckpointError (a bad checkpoint); another rank cannot, or reads
        other bytes: CheckpointDisagreement, the same message on every rank."""
        try:
            view = ("sha256", hashlib.sha256((path / MARKER).read_bytes()).hexdigest())
        except OSError as e:
            view = ("error", f"{path}: not a complete checkpoint (no {MARKER} marker: {e.strerror or e})")
        views = _gather(view)
        kind, digest = views[0]
        if kind == "error":
            raise CheckpointError(digest)
        for rank, (other_kind, other) in enumerate(views):
            if other_kind == "error":
                raise CheckpointDisagreement(f"rank {rank}: {other}, but rank 0 reads it: every rank must see the "
                                             "same checkpoint directory (shared storage?)")
            if other != digest:
                raise CheckpointDisagreement(f"{path}: rank {rank} reads another {MARKER} marker (sha256 "
                                             f"{other[:12]}, rank 0's {digest[:12]}): every rank must see the same "
                                             "checkpoint directory (shared storage?)")
        return read_marker(path), digest

    # -- saving --------------------------------------------------------------------------------------------------

    def save(self, step: int, engine, train_state: dict[str, Any], config_yaml: str) -> Path:
        """Collective: snapshot this rank's engine shards and train state and write them (in the background with
        async_save); committed here, or by a later ``poll``/``wait`` when async. Returns the directory."""
        self.wait()  # one save in flight at a time: the previous one is committed first
        start = time.perf_counter()
        path = self.path(step)
        if self.rank == 0 and path.exists():
            shutil.rmtree(path)  # an uncommitted leftover of a crash at this step, or a re-save of this step
        _barrier()
        writer = CheckpointWriter(delay_s=self.faults.save_delay_s)
        engine.checkpoint_engine = writer.deepspeed_engine()  # DeepSpeed hands every file it saves to us
        engine.save_checkpoint(str(self.root), tag=path.name, save_latest=False)
        writer.add(train_state, path / f"train_state_rank{self.rank:05d}.pt")
        if self.rank == 0:
            writer.add_text(config_yaml, path / "config.yaml")
        self._pending, self.stats = (step, path, writer, start), {}
        if self.async_save:
            writer.start()
        else:
            writer.run()
            self._commit()
        self.stats["blocking_s"] = time.perf_counter() - start
        return path

    def poll(self) -> bool:
        """Collective, at a step boundary: commit the in-flight async save if every rank finished writing it.
        Returns True if a save is still in flight."""
        if self._pending is None:
            return False
        if not _all_true(self._pending[2].done()):
            return True
        self._commit()
        return False

    def wait(self) -> None:
        """Collective: finish writing and commit the in-flight save, if any."""
        if self._pending is not None:
            self._pending[2].join()
            self._commit()

    def _commit(self) -> None:
        """Collective: gather every rank's written files, then rank 0 writes the marker and ``latest``."""
        step, path, writer, start = self._pending
        self._pending = None
        writer.join()  # re-raises a failed background write
        files = _gather(writer.written)
        listed = {name: meta for rank_files in files for name, meta in rank_files.items()}
        if self.rank == 0:
            for file in sorted(path.iterdir()):  # files DeepSpeed writes itself (its zero_to_fp32.py copy)
                if file.is_file() and file.name not in listed:
                    listed[file.name] = {"bytes": file.stat().st_size, "sha256": file_sha256(file)}
            marker = {"step": step, "world_size": self.world_size, "layout": self.layout,
                      "files": dict(sorted(listed.items())), "saved_at": time.time(),
                      "save_seconds": time.perf_counter() - start}
            atomic_write(path / MARKER, json.dumps(marker, indent=1))
            atomic_write(self.root / LATEST, path.name + "\n")
        self.bad_steps.discard(step)  # a skipped corrupt step_<step> was just replaced by a good one
        if self.rank == 0:
            self._prune(step)
            megabytes = sum(meta["bytes"] for meta in listed.values()) / 1e6
            logger.info("checkpoint %s committed: %.1f MB; rank 0 wrote its share in %.2f s", path.name, megabytes,
                        writer.write_seconds)
        self.stats.update(write_s=writer.write_seconds, bytes=sum(m["bytes"] for m in files[self.rank].values()))
        _barrier()
        self.last_commit = {"last_checkpoint_step": step, "last_checkpoint_time": time.time(),
                            "checkpoint_save_s": time.perf_counter() - start}

    def _prune(self, written: int) -> None:
        """Rank 0, after committing step ``written``: delete all but the newest ``keep_last`` good checkpoints
        (and keep_every's). Counted and deleted are only good ones: a corrupt checkpoint that resume skipped
        (``bad_steps``) stays marked and may be newer than everything this run writes after the fallback, and
        counting it would delete the checkpoint just written. ``written`` is never deleted."""
        if self.keep_last <= 0:
            return
        good = [step for step in self.complete_steps() if step not in self.bad_steps]
        keep = set(good[-self.keep_last:]) | {written}
        for step in good:
            if step not in keep and not (self.keep_every and step % self.keep_every == 0):
                # Renamed first (atomic), so a crash mid-delete never leaves a marked directory with files missing.
                trash = self.root / f".pruned_{self.path(step).name}"
                shutil.rmtree(trash, ignore_errors=True)  # left by a crash during an earlier prune
                os.replace(self.path(step), trash)
                shutil.rmtree(trash, ignore_errors=True)

    # -- loading -------------------------------------------------------------------------------------------------

    def load(self, path: Path, marker: dict[str, Any], engine, model: ModelConfig) -> dict[str, Any]:
        """Collective: load the checkpoint at ``path`` (verified: ``marker`` is what ``resume_point`` returned)
        into the TrainEngine ``engine``; returns this rank's train state.

        Saved with this run's layout: DeepSpeed loads its own files and every rank gets its own train state back.
        Saved with another layout: the weights and optimizer state are resharded (pretrain.checkpoint.reshard)
        and every rank continues from rank 0's counters and data position; per-rank RNG streams and
        Transformer-XL memory do not carry over to a new layout and start afresh (reported).
        """
        check_model_fits(path, model, marker["layout"], self.layout)
        saved = marker["layout"]
        changed = layout_changes(saved, self.layout)
        if not changed:
            ds_engine = engine.engine
            saving_engine = ds_engine.checkpoint_engine
            ds_engine.checkpoint_engine = deepspeed_checkpoint_engine()  # DeepSpeed reads every file through it
            try:
                loaded, _ = ds_engine.load_checkpoint(str(path.parent), tag=path.name, load_lr_scheduler_states=False)
            finally:
                ds_engine.checkpoint_engine = saving_engine
            if loaded is None:
                raise CheckpointError(f"{path}: DeepSpeed found no engine state to load")
            return self._train_state(path, self.rank)
        from pretrain.checkpoint.reshard import load_resharded

        load_resharded(path, saved, engine, model.num_layers, gated_mlp=model.activation == "swiglu")
        state = self._train_state(path, 0)
        state.pop("memory", None)  # lanes and layers sit elsewhere in the new layout: memory restarts empty
        state["rng"].pop("tracker", None)  # model-parallel RNG streams are per TP rank: the new ranks' own seeds
        return state

    def _train_state(self, path: Path, rank: int) -> dict[str, Any]:
        file = path / f"train_state_rank{rank:05d}.pt"
        if not file.is_file():
            raise CheckpointError(f"{file}: missing train state for rank {rank}")
        return load_checkpoint_file(file)


