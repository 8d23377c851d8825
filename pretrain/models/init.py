"""Layout-independent initialisation: one seed gives the same model whatever the TP / PP / VPP layout.

megatron-core draws a parameter from the global RNG in build order (CPU) or from per-TP-rank streams (GPU), so
a layer's initial weights depend on which pipeline stage built it and on how many tensor-parallel ranks share
it: a PP=2 run would start from a different model than PP=1, and no parallel run could be checked against the
single-process one. Here every parameter is drawn whole from a generator seeded by (seed, its name in the full
model), and each rank keeps its tensor-parallel shard. The distributions are megatron-core's: normal(0, std) for
weights, std / sqrt(2 * num_layers) for the two projections that write into the residual stream (attention
output, second MLP layer), ones for norm weights, zeros for biases.
"""

from __future__ import annotations

import hashlib
import math

import torch
from megatron.core import parallel_state

from pretrain.models.layer_names import LAYER, canonical_name, layer_index, with_layer_index

_RESIDUAL_OUT = ("linear_proj.weight", "linear_fc2.weight")


def init_weights(chunks: list[torch.nn.Module], seed: int, std: float, num_layers: int) -> None:
    """Re-initialise every parameter of this rank's model chunks, independently of the parallel layout."""
    tp_rank = parallel_state.get_tensor_model_parallel_rank()
    tp_size = parallel_state.get_tensor_model_parallel_world_size()
    with torch.no_grad():
        for chunk in chunks:
            gated = getattr(getattr(chunk, "config", None), "gated_linear_unit", False)
            for local_name, param in chunk.named_parameters():
                name = full_model_name(chunk, local_name)
                full = _draw(name, _full_shape(param, tp_size), seed, std, num_layers)
                param.copy_(tp_shard(full, param, tp_rank, tp_size, gated and "linear_fc1" in name))


def full_model_name(chunk: torch.nn.Module, local_name: str) -> str:
    """The parameter's name in the whole single-stage model: global layer numbers, canonical (layer-spec
    independent) names, and a last stage's copy of the tied word embedding named as the embedding itself (both
    start from the same values)."""
    local_name = canonical_name(local_name)  # TE and local layers start from the same values
    index = layer_index(local_name)
    if index is not None:  # decoder.layers.<i> (GPT, Transformer-XL) or encoder.layers.<i> (BERT)
        block = chunk.get_submodule(LAYER.match(local_name)["prefix"].rstrip("."))
        return with_layer_index(local_name, block.layers[index].layer_number - 1)
    if local_name == "output_layer.weight" and getattr(chunk, "share_embeddings_and_output_weights", False):
        return "embedding.word_embeddings.weight"
    return local_name


def _full_shape(param: torch.Tensor, tp_size: int) -> list[int]:
    shape = list(param.shape)
    if getattr(param, "tensor_model_parallel", False):
        shape[param.partition_dim] *= tp_size
    return shape


def _draw(name: str, shape: list[int], seed: int, std: float, num_layers: int) -> torch.Tensor:
    """The full parameter, on CPU (so CPU and GPU runs start alike), from a generator seeded by its name."""
    if len(shape) == 1:  # norm weights and biases
        return torch.ones(shape) if name.endswith("weight") and "norm" in name else torch.zeros(shape)
    generator = torch.Generator().manual_seed(
        int.from_bytes(hashlib.sha256(f"{seed}:{name}".encode()).digest()[:8], "little") & (2**63 - 1))
    scale = std / math.sqrt(2.0 * num_layers) if name.endswith(_RESIDUAL_OUT) else std
    return torch.empty(shape).normal_(0.0, scale, generator=generator)


def tp_shard(full: torch.Tensor, param: torch.Tensor, rank: int, size: int, gated: bool) -> torch.Tensor:
    """This TP rank's part of ``full``. A gated MLP's first layer holds [gate; up] per rank, so its gate and up
    halves are split separately (a contiguous split would hand rank 0 the whole gate)."""
    if not getattr(param, "tensor_model_parallel", False) or size == 1:
        return full
    dim = param.partition_dim
    if gated:
        gate, up = full.chunk(2, dim=dim)
        return torch.cat([gate.chunk(size, dim=dim)[rank], up.chunk(size, dim=dim)[rank]], dim=dim)
    return full.chunk(size, dim=dim)[rank]
