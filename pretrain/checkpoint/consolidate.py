"""The weights of a checkpoint saved with any tensor / pipeline layout, as one single-process model's state dict.

DeepSpeed writes one ``mp_rank_XX_model_states.pt`` per model-parallel rank, XX = tp_rank + tensor * pp_rank
(megatron-core's rank order puts tensor parallelism fastest). A file holds that rank's model: the module itself
without pipelining, else a ModuleList of its virtual-pipeline chunks (keys ``<chunk>.<name>``), layers numbered
from 0 in every chunk. Chunk v of pipeline rank p holds global layers from (v * pipeline + p) * per_chunk on, the
uniform split ParallelDims enforces. Consolidating renames every key to the whole model's (global layer numbers)
and joins the tensor-parallel shards along the one dimension where a shard is smaller than the whole parameter.
"""

from __future__ import annotations

from pathlib import Path

import torch

from pretrain.checkpoint.safe_load import load_checkpoint_file
from pretrain.errors import CheckpointError
from pretrain.models.layer_names import canonical_name, layer_index, with_layer_index

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
    path = Path(path)
    tp, pp = layout["tensor"], layout["pipeline"]
    vpp = layout.get("virtual_pipeline", 1) if pp > 1 else 1
    per_chunk = num_layers // (pp * vpp)
    shards: dict[str, list[torch.Tensor | None]] = {}  # global name -> one tensor per TP rank
    for p in range(pp):
        for t in range(tp):
            for key, value in _module_state(model_file(path, t + tp * p)).items():
                if key.endswith("_extra_state"):
                    continue
                chunk, key = (int(key.split(".", 1)[0]), key.split(".", 1)[1]) if pp > 1 else (0, key)
                name = global_layer_name(canonical_name(key), (chunk * pp + p) * per_chunk)  # older TE saves
                shards.setdefault(name, [None] * tp)[t] = value
    state = {}
    for name, like in target.items():
        if name.endswith("_extra_state"):
            continue
        parts = shards.get(name)
        if parts is None or any(part is None for part in parts):
            raise CheckpointError(f"{path}: no {name} in the checkpoint's model files (saved by another model?)")
        state[name] = join_tp_shards(name, parts, tuple(like.shape), gated_mlp and "linear_fc1" in name, path)
    return state


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
