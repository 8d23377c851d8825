"""The weights of a checkpoint saved with any tensor / pipeline layout, as one single-process model's state dict.

DeepSpeed writes one ``mp_rank_XX_model_states.pt`` per model-parallel rank, XX = tp_rank + tensor * pp_rank
(megatron-core's rank order puts tensor parallelism fastest). A file holds that rank's model: the module itself
without pipelining, else a ModuleList of its virtual-pipeline chunks (keys ``<chunk>.<name>``), layers numbered
from 0 in every chunk. Chunk v of pipeline rank p holds global layers from (v * pipeline + p) * per_chunk on, the
uniform split ParallelDims enforces. Consolidating renames every key to the whole model's (global layer numbers)
and joins the tensor-parallel shards along the one dimension where a shard is smaller than the whole parameter.

``consolidated_state_dict`` gives every tensor at once (``load_model``); ``ConsolidatedTensors`` one at a time, for
the streaming ``pretrain export hf``: memory holds the tensor asked for, and ``drop_mapped_pages`` hands the file
pages it read back to the kernel, so reading a whole checkpoint does not grow the resident set by its size.
"""

from __future__ import annotations

import ctypes
import mmap
import sys
from pathlib import Path

import torch

from pretrain.checkpoint.safe_load import load_checkpoint_file
from pretrain.errors import CheckpointError
from pretrain.models.layer_names import canonical_name, layer_index, with_layer_index


_libc = ctypes.CDLL(None, use_errno=True) if sys.platform.startswith("linux") else None


def drop_mapped_pages(tensor: torch.Tensor) -> None:
    """Hand the pages of a tensor read from a memory-mapped checkpoint file back to the kernel (Linux; a no-op
    elsewhere). Pages a mapping has read stay in the process's resident set until it is unmapped, so reading a
    whole checkpoint through ``torch.load(mmap=True)`` would grow RSS to the weights' size; after the tensor has
    been copied out, ``madvise(MADV_DONTNEED)`` unmaps them (a later read faults them in from the file again).

    Only for tensors of a read-only file mapping: on anonymous memory MADV_DONTNEED discards the data."""
    if _libc is None or tensor.device.type != "cpu":
        return
    storage = tensor.untyped_storage()
    if storage.nbytes() == 0:
        return
    page = mmap.PAGESIZE
    start = storage.data_ptr() // page * page
    end = -(-(storage.data_ptr() + storage.nbytes()) // page) * page
    _libc.madvise(ctypes.c_void_p(start), ctypes.c_size_t(end - start), 4)  # 4: MADV_DONTNEED


def model_file(path: Path, mp_rank: int) -> Path:
    """The DeepSpeed model-states file of one model-parallel rank."""
    return path / f"mp_rank_{mp_rank:02d}_model_states.pt"


def consolidated_state_dict(path: str | Path, layout: dict, target: dict[str, torch.Tensor], num_layers: int,
                            gated_mlp: bool = False) -> dict[str, torch.Tensor]:
    """``target``'s keys filled from the checkpoint at ``path`` saved with ``layout`` (the commit marker's).

    ``target`` is the single-process model's state dict (names and full shapes); ``gated_mlp`` says that first MLP
    layers hold [gate; up] per tensor-parallel rank. Keys the target lacks (a last stage's copy of a tied
    embedding) are skipped. Raises CheckpointError naming the file or tensor that does not fit.
    """
    shards = _shards_by_name(Path(path), layout, num_layers)
    return {name: _join(shards, name, tuple(like.shape), gated_mlp, Path(path)) for name, like in target.items()
            if not name.endswith("_extra_state")}


class ConsolidatedTensors:
    """The whole model's tensors read one at a time (``get(name)``), for a conversion that streams: the per-rank
    files are memory-mapped, a tensor's tensor-parallel shards are joined into a fresh tensor when asked for, and
    the mapped pages it read are handed back to the kernel right away, so memory holds about one tensor at a time
    however large the checkpoint. ``shapes``: the single-process model's full shape of every tensor to read."""

    def __init__(self, path: str | Path, layout: dict, shapes: dict[str, tuple[int, ...]], num_layers: int,
                 gated_mlp: bool = False):
        self.path, self.shapes, self.gated_mlp = Path(path), shapes, gated_mlp
        self.shards = _shards_by_name(self.path, layout, num_layers)

    def get(self, name: str) -> torch.Tensor:
        """The whole tensor ``name``, in memory of its own (CheckpointError if the checkpoint lacks it)."""
        whole = _join(self.shards, name, self.shapes[name], self.gated_mlp, self.path)
        parts = self.shards[name]
        whole = whole.clone() if any(whole.data_ptr() == part.data_ptr() for part in parts) else whole
        for part in parts:
            drop_mapped_pages(part)
        return whole


def _shards_by_name(path: Path, layout: dict, num_layers: int) -> dict[str, list[torch.Tensor | None]]:
    """Every model tensor of the checkpoint, memory-mapped, as {global name: one tensor per TP rank}."""
    tp, pp = layout["tensor"], layout["pipeline"]
    vpp = layout.get("virtual_pipeline", 1) if pp > 1 else 1
    per_chunk = num_layers // (pp * vpp)
    shards: dict[str, list[torch.Tensor | None]] = {}
    for p in range(pp):
        for t in range(tp):
            for key, value in _module_state(model_file(path, t + tp * p)).items():
                if key.endswith("_extra_state"):
                    continue
                chunk, key = (int(key.split(".", 1)[0]), key.split(".", 1)[1]) if pp > 1 else (0, key)
                name = global_layer_name(canonical_name(key), (chunk * pp + p) * per_chunk)  # older TE saves
                shards.setdefault(name, [None] * tp)[t] = value
    return shards


def _join(shards: dict[str, list[torch.Tensor | None]], name: str, shape: tuple[int, ...], gated_mlp: bool,
          path: Path) -> torch.Tensor:
    parts = shards.get(name)
    if parts is None or any(part is None for part in parts):
        raise CheckpointError(f"{path}: no {name} in the checkpoint's model files (saved by another model?)")
    return join_tp_shards(name, parts, shape, gated_mlp and "linear_fc1" in name, path)


def _module_state(file: Path) -> dict[str, torch.Tensor]:
    if not file.is_file():
        raise CheckpointError(f"{file}: missing model file of this checkpoint's layout")
    # Memory-mapped: the file also holds the optimizer state (ZeRO-0), twice the weights, never read here.
    state = load_checkpoint_file(file, map_location="cpu", mmap=True).get("module")
    if not state:  # ZeRO-3 leaves only partitioned placeholders here
        raise CheckpointError(f"{file}: holds no model weights (a ZeRO-3 checkpoint of another layout?)")
    return state


def global_layer_name(key: str, offset: int) -> str:
    """``key`` with its local layer number shifted by the chunk's first global layer."""
    index = layer_index(key)
    return key if index is None else with_layer_index(key, index + offset)


def join_tp_shards(name: str, parts: list[torch.Tensor], shape: tuple[int, ...], gated: bool, path: Path) -> torch.Tensor:
    """The whole tensor from its tensor-parallel shards (replicated tensors: rank 0's copy)."""
    if tuple(parts[0].shape) == shape:
        return parts[0]
    dims = [d for d in range(len(shape)) if parts[0].shape[d] * len(parts) == shape[d]]
    if len(dims) != 1 or any(part.shape != parts[0].shape for part in parts):
        raise CheckpointError(f"{path}: {name} has shards {[tuple(p.shape) for p in parts]}, which do not make "
                              f"the model's {shape}")
    dim = dims[0]
    if gated:  # each rank holds [its gate part; its up part] (see models/init.py tp_shard)
        halves = [part.chunk(2, dim=dim) for part in parts]
        return torch.cat([h[0] for h in halves] + [h[1] for h in halves], dim=dim)
    return torch.cat(parts, dim=dim)
