"""Consolidation pieces: TP shards joined back (plain and gated), local layer names made global, bad files named.

The end-to-end check (every layout's checkpoint joins into the single-process weights) is in
tests/distributed/test_parallel_layouts.py; the cases below are those its GPT/BERT layouts do not reach.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from pretrain.errors import CheckpointError
from pretrain.checkpoint.consolidate import global_layer_name, join_tp_shards, consolidated_state_dict, model_file
from pretrain.models.init import tp_shard


def shards(full: torch.Tensor, dim: int, tp: int, gated: bool) -> list[torch.Tensor]:
    """What each TP rank holds, cut the way init.py cuts a fresh model."""
    param = torch.empty(0)
    param.tensor_model_parallel, param.partition_dim = True, dim
    return [tp_shard(full, param, rank, tp, gated) for rank in range(tp)]


@pytest.mark.parametrize("tp", [2, 4])
@pytest.mark.parametrize("gated", [False, True])
def test_tensor_parallel_shards_join_into_the_whole_tensor(tp, gated):
    full = torch.arange(16 * 6, dtype=torch.float32).reshape(16, 6)  # [2 * ffn, h] for a gated first MLP layer
    parts = shards(full, 0, tp, gated)
    assert torch.equal(join_tp_shards("mlp.linear_fc1.weight", parts, (16, 6), gated, Path("ck")), full)
    if gated and tp > 1:  # the plain join would interleave gate and up halves: the gated case is not a no-op
        assert not torch.equal(torch.cat(parts), full)
    row = torch.arange(6 * 8, dtype=torch.float32).reshape(6, 8)  # row-parallel: split along the input dim
    assert torch.equal(join_tp_shards("linear_proj.weight", shards(row, 1, tp, False), (6, 8), False, Path("ck")), row)
    bias = torch.ones(6)  # replicated: rank 0's copy
    assert join_tp_shards("linear_proj.bias", [bias] * tp, (6,), False, Path("ck")) is bias


def test_local_layer_numbers_become_global():
    assert global_layer_name("decoder.layers.0.mlp.linear_fc1.weight", 6) == "decoder.layers.6.mlp.linear_fc1.weight"
    assert global_layer_name("encoder.layers.11.post_mlp_layernorm.bias", 12) == "encoder.layers.23.post_mlp_layernorm.bias"
    assert global_layer_name("embedding.word_embeddings.weight", 4) == "embedding.word_embeddings.weight"


def test_shards_that_do_not_make_the_model_are_named(tmp_path):
    with pytest.raises(CheckpointError, match=r"ck: linear_qkv.weight has shards \[\(3, 4\), \(3, 4\)\]"):
        join_tp_shards("linear_qkv.weight", [torch.zeros(3, 4)] * 2, (5, 4), False, Path("ck"))
    layout = {"tensor": 2, "pipeline": 1}
    torch.save({"module": {"w": torch.zeros(2, 4)}}, model_file(tmp_path, 0))
    with pytest.raises(CheckpointError) as info:  # rank 1's file is missing
        consolidated_state_dict(tmp_path, layout, {"w": torch.zeros(4, 4)}, num_layers=1)
    assert str(info.value) == f"{model_file(tmp_path, 1)}: missing model file of this checkpoint's layout"
