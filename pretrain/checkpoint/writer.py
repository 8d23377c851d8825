"""CheckpointWriter: the files one rank saves for one checkpoint, written now or in a background thread.

DeepSpeed's ``save_checkpoint`` decides what each rank saves (its model-parallel rank's model file on data-parallel
rank 0, its ZeRO partition of the optimizer) and hands every file to the engine's ``checkpoint_engine``. Ours
(:func:`deepspeed_checkpoint_engine`) takes a snapshot instead of writing: tensors are copied
to host memory right away, so training may change the originals as soon as ``save_checkpoint`` returns. ``run()``
(synchronous) or ``start()`` (background thread) then serialise the snapshots, and record each file's size and
sha256 for the commit marker.
"""

from __future__ import annotations

import hashlib
import threading
import time
from pathlib import Path
from typing import Any, Callable

import torch

from pretrain.checkpoint.safe_load import load_checkpoint_file


def host_copy(item: Any) -> Any:
    """``item`` with every tensor in it copied to host memory (own, compact storage), containers rebuilt and
    everything else (torch.Size included: DeepSpeed's zero_to_fp32 needs it) kept as it is."""
    if torch.is_tensor(item):
        return item.detach().to("cpu", copy=True)
    if isinstance(item, dict):
        return type(item)((key, host_copy(value)) for key, value in item.items())
    if type(item) in (list, tuple):
        return type(item)(host_copy(value) for value in item)
    return item


def file_sha256(path: str | Path, chunk: int = 1 << 22) -> str:
    """Hex sha256 of a file, read in 4 MiB pieces."""
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            digest.update(block)
    return digest.hexdigest()


class CheckpointWriter:
    """Snapshots queued by ``add``; written by ``run`` or by a background thread from ``start``.

    ``written`` maps file name to {"bytes", "sha256"} once done. ``delay_s`` is a test hook that keeps the save
    open (after the files, before ``done``) so a test can kill a run mid-save.
    """

    def __init__(self, delay_s: float = 0.0):
        self.delay_s = delay_s
        self.jobs: list[tuple[Any, Path]] = []
        self.written: dict[str, dict[str, Any]] = {}
        self.write_seconds = 0.0
        self._thread: threading.Thread | None = None
        self._error: BaseException | None = None

    def deepspeed_engine(self):
        """An engine to set as ``deepspeed_engine.checkpoint_engine`` for one ``save_checkpoint`` call."""
        return deepspeed_checkpoint_engine(add=self.add)

    def add(self, state: Any, path: Path) -> None:
        """Queue ``state`` for ``path``; its tensors are copied to host memory now."""
        self.jobs.append((host_copy(state), Path(path)))

    def add_text(self, text: str, path: Path) -> None:
        self.jobs.append((text, Path(path)))

    def run(self) -> None:
        """Write every queued snapshot (in the calling thread) and hash it."""
        start = time.perf_counter()
        for state, path in self.jobs:
            path.parent.mkdir(parents=True, exist_ok=True)
            if isinstance(state, str):
                path.write_text(state)
            else:
                torch.save(state, path)
            self.written[path.name] = {"bytes": path.stat().st_size, "sha256": file_sha256(path)}
        self.jobs.clear()  # the host copies are no longer needed
        self.write_seconds = time.perf_counter() - start
        if self.delay_s:
            time.sleep(self.delay_s)

    def start(self) -> None:
        """Write in a background thread; ``done``/``join`` tell when it finished."""
        def target():
            try:
                self.run()
            except BaseException as e:  # re-raised on the training thread by join()
                self._error = e

        self._thread = threading.Thread(target=target, name="checkpoint-writer", daemon=True)
        self._thread.start()

    def done(self) -> bool:
        return self._thread is None or not self._thread.is_alive()

    def join(self) -> None:
        """Wait for the background write; raises what it raised."""
        if self._thread is not None:
            self._thread.join()
        if self._error is not None:
            raise RuntimeError(f"checkpoint write failed: {self._error}") from self._error


def deepspeed_checkpoint_engine(add: Callable[[Any, Path], None] | None = None):
    """DeepSpeed's checkpoint engine, ours: ``save`` hands each file's state to ``add`` (a CheckpointWriter's, which
    snapshots it and writes it later) instead of writing; ``load`` reads through safe_load (weights only, nothing in
    the file runs). Set as ``engine.checkpoint_engine`` around one ``save_checkpoint`` or ``load_checkpoint`` call.
    DeepSpeed is imported here, lazily: nothing that only reads checkpoints or plans a layout needs it."""
    from deepspeed.runtime.checkpoint_engine import TorchCheckpointEngine

    class CheckpointEngine(TorchCheckpointEngine):
        def save(self, state_dict, path: str) -> None:
            if add is None:
                raise RuntimeError("this checkpoint engine only loads")
            add(state_dict, Path(path))

        def load(self, path: str, map_location=None):
            return load_checkpoint_file(path, map_location=map_location)

        def preserves_storage_sharing(self) -> bool:
            return False  # the snapshot already copies every tensor (DeepSpeed would clone the model states again)

    return CheckpointEngine()
