"""CheckpointManager: ``checkpoints/step_<N>/`` directories that count only once their commit marker exists.

Layout of one checkpoint::

    step_<N>/
      mp_rank_XX_model_states.pt, zero_pp_rank_*_optim_states.pt   DeepSpeed engine (model + ZeRO optimizer)
      train_state_rank<R>.pt                                       per rank: counters, data position, RNG states
      config.yaml                                                  the resolved run config
      COMMITTED                                                    JSON marker, written last by rank 0
    latest                                                         text: name of the newest complete checkpoint

Every rank writes its own files (DeepSpeed decides which; ``CheckpointWriter`` does the writing and hashes
what it wrote). The marker, with the step, the layout and each file's size and sha256, is written (temp file +
rename) only after every rank reported its files done, so a crash mid-save leaves a directory without a marker:
it is never loaded and is cleared before the same step is saved again. Loading checks sizes and checksums (each
rank hashes a share of the files); resuming automatically falls back to the newest checkpoint that passes.

With ``async_save`` a save only snapshots the state (copies to host memory) and a background thread writes it;
the commit happens at a later step boundary once every rank is done (``poll``), and at the latest when the next
save starts or the run ends (``wait``).
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

from pretrain.checkpoint.writer import CheckpointWriter, file_sha256
from pretrain.config import ModelConfig
from pretrain.ft import TestFaults

MARKER = "COMMITTED"
LATEST = "latest"
_STEP_DIR = re.compile(r"^step_(\d+)$")
#: Layout keys that DeepSpeed's own loader needs unchanged, with their value in markers written before the key
#: existed; any difference goes through resharding, which matches parameters by name. The layer spec is one:
#: Transformer Engine's and the local layers save the same names (pretrain/models/layer_names.py) but may order
#: parameters differently, and DeepSpeed matches optimizer state by position.
RESHARD_KEYS = {"tensor": 1, "pipeline": 1, "virtual_pipeline": 1, "data": 1, "zero_stage": 1,
                "layer_spec": "local"}


class CheckpointError(RuntimeError):
    """A checkpoint that cannot be loaded; the message is one line and names the directory or file."""


def _atomic_write(path: Path, text: str) -> None:
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(text)
    os.replace(tmp, path)  # atomic on POSIX: readers see the old or the new file, never half of one


def _barrier() -> None:
    if dist.is_initialized():
        dist.barrier()


def _world() -> tuple[int, int]:
    return (dist.get_rank(), dist.get_world_size()) if dist.is_initialized() else (0, 1)


def _all_true(ok: bool) -> bool:
    """True on every rank iff ``ok`` on every rank (gloo and NCCL alike: a CPU object gather)."""
    if not dist.is_initialized():
        return ok
    flags = [None] * dist.get_world_size()
    dist.all_gather_object(flags, ok)
    return all(flags)


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

    # -- finding -------------------------------------------------------------------------------------------------

    def complete_steps(self) -> list[int]:
        """Steps with a commit marker, ascending."""
        if not self.root.is_dir():
            return []
        steps = [int(m.group(1)) for p in self.root.iterdir() if (m := _STEP_DIR.match(p.name))]
        return sorted(s for s in steps if (self.path(s) / MARKER).is_file())

    def latest(self) -> Path | None:
        """The newest complete checkpoint directory (marker present; contents not verified), or None."""
        steps = self.complete_steps()
        return self.path(steps[-1]) if steps else None

    def path(self, step: int) -> Path:
        return self.root / f"step_{step}"

    def latest_verified(self) -> tuple[Path, dict[str, Any]] | None:
        """Collective: the newest complete checkpoint whose files pass ``verify``, with its marker; a checkpoint
        that does not is reported in one line and skipped (auto-resume falls back to the one before)."""
        for step in reversed(self.complete_steps()):
            try:
                return self.path(step), self.verify(self.path(step))
            except CheckpointError as e:
                if self.rank == 0:
                    print(f"warning: skipping checkpoint: {e}", flush=True)
        return None

    def resume_point(self, explicit: str = "") -> tuple[Path, dict[str, Any]] | None:
        """Collective: the checkpoint to resume from, verified, with its marker: ``explicit`` (checkpoint.load;
        a bad one raises CheckpointError) or else the newest that verifies; None to start fresh."""
        if explicit:
            return Path(explicit), self.verify(explicit)
        return self.latest_verified()

    def verify(self, path: str | Path) -> dict[str, Any]:
        """Collective: the marker exists and every file it lists has its size and sha256 (each rank hashes a
        share); returns the marker, else raises a one-line CheckpointError naming the first bad file."""
        path = Path(path)
        marker = read_marker(path)
        problems = []
        for i, (name, meta) in enumerate(sorted(marker["files"].items())):
            file = path / name
            if not file.is_file():
                problems.append(f"{file}: missing")
            elif file.stat().st_size != meta["bytes"]:
                problems.append(f"{file}: {file.stat().st_size} bytes, the marker says {meta['bytes']} (truncated?)")
            elif i % self.world_size == self.rank and file_sha256(file) != meta["sha256"]:
                problems.append(f"{file}: sha256 does not match the marker's (corrupt)")
        if dist.is_initialized():
            gathered = [None] * self.world_size
            dist.all_gather_object(gathered, problems)
            problems = sorted({p for rank_problems in gathered for p in rank_problems})
        if problems:
            raise CheckpointError(problems[0] + (f" (and {len(problems) - 1} more)" if len(problems) > 1 else ""))
        return marker

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
        files = [writer.written]
        if dist.is_initialized():
            files = [None] * self.world_size
            dist.all_gather_object(files, writer.written)
        listed = {name: meta for rank_files in files for name, meta in rank_files.items()}
        if self.rank == 0:
            for file in sorted(path.iterdir()):  # files DeepSpeed writes itself (its zero_to_fp32.py copy)
                if file.is_file() and file.name not in listed:
                    listed[file.name] = {"bytes": file.stat().st_size, "sha256": file_sha256(file)}
            marker = {"step": step, "world_size": self.world_size, "layout": self.layout,
                      "files": dict(sorted(listed.items())), "saved_at": time.time(),
                      "save_seconds": time.perf_counter() - start}
            _atomic_write(path / MARKER, json.dumps(marker, indent=1))
            _atomic_write(self.root / LATEST, path.name + "\n")
            self._prune()
            megabytes = sum(meta["bytes"] for meta in listed.values()) / 1e6
            print(f"checkpoint {path.name} committed: {megabytes:.1f} MB; rank 0 wrote its share in "
                  f"{writer.write_seconds:.2f} s", flush=True)
        self.stats.update(write_s=writer.write_seconds, bytes=sum(m["bytes"] for m in files[self.rank].values()))
        _barrier()
        self.last_commit = {"last_checkpoint_step": step, "last_checkpoint_time": time.time(),
                            "checkpoint_save_s": time.perf_counter() - start}

    def _prune(self) -> None:
        if self.keep_last <= 0:
            return
        for step in self.complete_steps()[: -self.keep_last]:
            if not (self.keep_every and step % self.keep_every == 0):
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
            loaded, _ = engine.engine.load_checkpoint(str(path.parent), tag=path.name,
                                                      load_lr_scheduler_states=False)
            if loaded is None:
                raise CheckpointError(f"{path}: DeepSpeed found no engine state to load")
            return self._train_state(path, self.rank)
        from pretrain.checkpoint.reshard import load_resharded

        if self.rank == 0:
            print(f"resharding {path} ({', '.join(changed)})", flush=True)
        load_resharded(path, saved, engine, model.num_layers, gated_mlp=model.activation == "swiglu")
        state = self._train_state(path, 0)
        state.pop("memory", None)  # lanes and layers sit elsewhere in the new layout: memory restarts empty
        state["rng"].pop("tracker", None)  # model-parallel RNG streams are per TP rank: the new ranks' own seeds
        return state

    def _train_state(self, path: Path, rank: int) -> dict[str, Any]:
        file = path / f"train_state_rank{rank:05d}.pt"
        if not file.is_file():
            raise CheckpointError(f"{file}: missing train state for rank {rank}")
        return torch.load(file, weights_only=False)


def layout_changes(saved: dict, layout: dict) -> list[str]:
    """The RESHARD_KEYS in which a checkpoint's layout (``saved``, its marker's) differs from this run's
    ``layout``, as "key old->new"; empty when DeepSpeed can load the checkpoint itself."""
    return [f"{k} {saved.get(k, old)}->{layout.get(k, old)}" for k, old in RESHARD_KEYS.items()
            if saved.get(k, old) != layout.get(k, old)]


def read_marker(path: str | Path) -> dict[str, Any]:
    """The commit marker of a checkpoint directory; a one-line CheckpointError if it is absent or unreadable."""
    marker = Path(path) / MARKER
    if not marker.is_file():
        raise CheckpointError(f"{path}: not a complete checkpoint (no {MARKER} marker)")
    try:
        return json.loads(marker.read_text())
    except json.JSONDecodeError as e:
        raise CheckpointError(f"{marker}: unreadable commit marker ({e})") from None


#: Model fields that decide parameter shapes: a checkpoint loads only into a config that agrees on all of them.
SHAPE_FIELDS = ("family", "num_layers", "hidden_size", "num_attention_heads", "ffn_hidden_size", "activation",
                "position_embedding", "tie_embeddings", "nsp", "untie_r")


def check_model_fits(path: Path, model: ModelConfig, saved_layout: dict, layout: dict) -> None:
    """Refuse, in one line, a checkpoint whose model (its config.yaml and layout) has other parameter shapes than
    ``model`` (the padded vocabulary may differ with the tensor size: resharding copies the common rows)."""
    import yaml

    saved = (yaml.safe_load((path / "config.yaml").read_text()) or {}).get("model", {})
    fields = SHAPE_FIELDS + (("seq_length",) if model.position_embedding == "learned_absolute" else ())
    for key in fields:  # learned positions have one row per position; rope and relative ones have none
        if key in saved and saved[key] != getattr(model, key):
            raise CheckpointError(f"{path}: model.{key} is {saved[key]!r} in the checkpoint and "
                                  f"{getattr(model, key)!r} in this config; it does not fit this model")
    key = "tokenizer_vocab_size" if saved_layout.get("tensor") != layout.get("tensor") else "vocab_size"
    if key in saved_layout and key in layout and saved_layout[key] != layout[key]:
        raise CheckpointError(f"{path}: vocabulary of {saved_layout[key]} in the checkpoint and {layout[key]} in "
                              "this run (another tokenizer or model.vocab_size?); it does not fit this model")
