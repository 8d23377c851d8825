"""ParallelDims: world = tensor x pipeline x data, checked with the numbers in the message; model/batch checks."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import pytest

from pretrain.errors import ConfigError
from pretrain.config import load
from pretrain.parallel.dims import ParallelDims

REPO = Path(__file__).resolve().parents[2]
TINY = REPO / "configs" / "debug" / "gpt_tiny.yaml"  # hidden 192, 4 heads, seq 128, micro batch 16
G13B = REPO / "configs" / "gpt" / "1.3b.yaml"  # TP 2, 16 heads, micro 4, global 512


def one_line(info) -> str:
    message = str(info.value)
    assert "\n" not in message
    return message


def layout_error(overrides: list[str], world_size: int) -> str:
    """The one-line ConfigError ParallelDims.from_config gives for gpt_tiny with these overrides."""
    with pytest.raises(ConfigError) as info:
        ParallelDims.from_config(load(TINY, overrides), world_size=world_size)
    return one_line(info)


@pytest.mark.parametrize("world, tp, pp, dp", [(1, 1, 1, 1), (8, 2, 2, 2), (8, 8, 1, 1), (12, 2, 3, 2),
                                               (16, 1, 4, 4), (6, 3, 1, 2)])
def test_data_parallel_size_is_derived(world, tp, pp, dp):
    dims = ParallelDims(world_size=world, tensor=tp, pipeline=pp)
    assert dims.data == dp
    assert dims.tensor * dims.pipeline * dims.data == dims.world_size


def test_dims_are_frozen():
    dims = ParallelDims(world_size=8, tensor=2, pipeline=2)
    with pytest.raises(dataclasses.FrozenInstanceError):
        dims.data = 4
    with pytest.raises(TypeError):
        ParallelDims(world_size=8, data=4)  # data is derived, never given


def test_world_not_divisible_by_tensor():
    with pytest.raises(ConfigError) as info:
        ParallelDims(world_size=6, tensor=4)
    message = one_line(info)
    assert "parallel.tensor (4)" in message and "world size 6" in message


def test_world_not_divisible_by_tensor_times_pipeline():
    with pytest.raises(ConfigError) as info:
        ParallelDims(world_size=8, tensor=2, pipeline=3)
    message = one_line(info)
    assert "parallel.tensor (2)" in message and "parallel.pipeline (3)" in message and "= 6" in message
    assert "world size 8" in message


def test_from_config_tiny_and_1_3b():
    dims = ParallelDims.from_config(load(TINY), world_size=4)
    assert (dims.world_size, dims.tensor, dims.pipeline, dims.data) == (4, 1, 1, 4)
    # 1.3B: TP 2 on 16 ranks -> DP 8; 512 = 4 (micro) x 16 (accumulation) x 8 (DP)
    cfg = load(G13B)
    dims = ParallelDims.from_config(cfg, world_size=16)
    assert (dims.tensor, dims.data) == (2, 8)
    assert dims.grad_accumulation_steps(cfg.train.micro_batch_size, cfg.train.global_batch_size) == 16


def test_from_config_world_not_divisible():
    message = layout_error(["--parallel.tensor=2"], world_size=3)
    assert "parallel.tensor (2)" in message and "world size 3" in message


def test_heads_not_divisible_by_tensor():
    message = layout_error(["--parallel.tensor=3"], world_size=3)  # 4 heads over TP 3
    assert message.startswith("model.num_attention_heads (4)") and "parallel.tensor (3)" in message


def test_ffn_not_divisible_by_tensor():
    # Heads (4) split over TP 4 fine; the MLP width 770 does not.
    message = layout_error(["--parallel.tensor=4", "--model.ffn_hidden_size=770"], world_size=4)
    assert message.startswith("model.ffn_hidden_size (770)") and "parallel.tensor (4)" in message
    # The default MLP width (4 * 192 = 768) splits.
    assert ParallelDims.from_config(load(TINY, ["--parallel.tensor=4"]), world_size=4).data == 1


def test_query_groups_not_divisible_by_tensor():
    # 4 heads split over TP 4, but 2 key/value groups do not: megatron-core gives each rank whole groups.
    message = layout_error(["--parallel.tensor=4", "--model.num_query_groups=2"], world_size=4)
    assert message.startswith("model.num_query_groups (2)") and "parallel.tensor (4)" in message
    assert ParallelDims.from_config(load(TINY, ["--parallel.tensor=2", "--model.num_query_groups=2"]),
                                    world_size=2).data == 1


def test_sequence_parallel_needs_seq_length_divisible():
    message = layout_error(["--parallel.tensor=4", "--parallel.sequence_parallel=true", "--model.seq_length=130"],
                           world_size=4)
    assert message.startswith("model.seq_length (130)") and "parallel.tensor (4)" in message
    # Without sequence parallelism the same length is fine.
    cfg = load(TINY, ["--parallel.tensor=4", "--model.seq_length=130"])
    assert ParallelDims.from_config(cfg, world_size=4).tensor == 4


def test_global_batch_not_divisible():
    message = layout_error(["--train.global_batch_size=96"], world_size=4)  # micro 16 x DP 4 = 64 does not divide 96
    assert message.startswith("train.global_batch_size (96)")
    assert "train.micro_batch_size (16)" in message and "data-parallel size (4)" in message and "= 64" in message


def test_global_batch_smaller_than_one_step_is_refused():
    cfg = load(TINY, ["--train.global_batch_size=32"])  # 32 < 16 x 4
    with pytest.raises(ConfigError, match=r"train\.global_batch_size \(32\)"):
        ParallelDims.from_config(cfg, world_size=4)


@pytest.mark.parametrize("world, tp, micro, global_batch, steps", [
    (4, 1, 16, 0, 1),  # 0 = no accumulation
    (4, 1, 16, 64, 1),
    (4, 1, 16, 128, 2),
    (8, 2, 8, 256, 8),  # DP 4: 256 / (8 x 4)
    (1, 1, 3, 12, 4),
    (16, 2, 4, 512, 16),
])
def test_grad_accumulation_steps(world, tp, micro, global_batch, steps):
    dims = ParallelDims(world_size=world, tensor=tp)
    assert dims.grad_accumulation_steps(micro, global_batch) == steps
    if global_batch:
        assert micro * steps * dims.data == global_batch


def test_grad_accumulation_uses_data_parallel_size_not_world():
    # World 8 with TP 4: DP is 2, so global 32 with micro 4 is 4 accumulation steps (not 1 as world 8 would say).
    assert ParallelDims(world_size=8, tensor=4).grad_accumulation_steps(4, 32) == 4
    with pytest.raises(ConfigError, match=r"data-parallel size \(2\) = 8"):
        ParallelDims(world_size=8, tensor=4).grad_accumulation_steps(4, 12)


def test_layers_must_split_over_pipeline_times_virtual_stages():
    # 4 layers over 2 x 4 = 8 chunks
    message = layout_error(["--parallel.pipeline=2", "--parallel.virtual_pipeline=4"], world_size=2)
    assert message.startswith("model.num_layers (4)") and "parallel.pipeline (2)" in message and "= 8" in message
    cfg = load(TINY, ["--parallel.pipeline=2", "--parallel.virtual_pipeline=2", "--train.global_batch_size=64"])
    dims = ParallelDims.from_config(cfg, world_size=4)
    assert (dims.pipeline, dims.virtual_pipeline, dims.data) == (2, 2, 2)


def test_interleaved_schedule_needs_micro_batches_at_least_pipeline():
    # global 32 = micro 16 x DP 2 -> one micro-batch per step, fewer than the 2 pipeline stages
    message = layout_error(["--parallel.pipeline=2", "--parallel.virtual_pipeline=2", "--train.global_batch_size=32"],
                           world_size=4)
    assert message.startswith("train.global_batch_size (32) gives 1 micro-batches") and "(2)" in message
    plain = load(TINY, ["--parallel.pipeline=2", "--train.global_batch_size=32"])  # 1F1B takes one micro-batch
    assert ParallelDims.from_config(plain, world_size=4).data == 2
