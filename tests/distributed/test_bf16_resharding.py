"""bf16 checkpoints load into other layouts and resume in their own: ZeRO-1 in bf16 is DeepSpeed's BF16_Optimizer
now (fp32 gradient accumulation, pretrain/parallel/grads.py) and ZeRO-0 keeps FP16_UnfusedOptimizer's format;
resharding (pretrain.checkpoint.reshard) reads and sets the fp32 masters and AdamW moments of both, and DeepSpeed's
own loader (with the allow-listed unpickler, pretrain/checkpoint/safe_load.py) resumes both.

As tests/distributed/test_resharding.py in fp32: layout A trains 3 steps saving at 2 and 3, layout B loads A's step
2 and takes step 3, and B's step 3 must be A's: loss and gradient norm (the loaded weights), fp32 masters and AdamW
moments after the step (which hold only if the masters and moments came along; reset moments would move every
weight by ~lr = 4.5e-4 and leave exp_avg at a tenth of A's). Measured:

  B                             loss       max |master diff|   moments (max diff / max)
  DP 2->1, ZeRO 1->0            6e-8 rel   1.2e-7              3.1e-7
  TP 2->1, ZeRO 0->1            2.4e-6     3.5e-4              7.9e-3
  resumed in its own layout     bitwise    0                   0

TP 2->1 changes bf16 arithmetic (a TP rank's GEMMs round their partial sums), so its step-3 gradient differs by
bf16 noise: its masters are held to 2 lr (an element whose gradient is noise may step either way; a misplaced shard
is ~0.02 off) and its moments to 2^-5, which reset moments miss by far; the others, whose per-micro-batch arithmetic
does not change, to 1e-6 and 1e-5.
"""

from __future__ import annotations

from pathlib import Path

import math

import pytest
import torch

from tests.conftest import TINY_CONFIG, run_cli, value_after
from tests.distributed.layouts_support import run_layouts

COMMON = ["--model.hidden_dropout=0.0", "--model.attention_dropout=0.0", "--train.steps=3",
          "--train.micro_batch_size=4", "--train.global_batch_size=16", "--train.log_every=1",
          "--checkpoint.every_steps=2", "--checkpoint.keep_last=0", "--data.valid=", "--train.precision=bf16"]
#: Layouts A by world size (world size 1's train first in its launch, then the loaded layouts B).
SAVED = {2: {"DP=2 ZeRO-1": ["--parallel.zero_stage=1"], "TP=2 ZeRO-0": ["--parallel.tensor=2"]},
         1: {"ZeRO-1": ["--parallel.zero_stage=1"], "ZeRO-0": []}}
#: Layouts B, world size 1: case -> (layout A it loads, its own overrides).
LOADED = {"DP 2->1, ZeRO 1->0": ("DP=2 ZeRO-1", []),
          "TP 2->1, ZeRO 0->1": ("TP=2 ZeRO-0", ["--parallel.zero_stage=1"]),
          "ZeRO-1 resumed by DeepSpeed": ("ZeRO-1", ["--parallel.zero_stage=1"]),
          "ZeRO-0 resumed by DeepSpeed": ("ZeRO-0", [])}


@pytest.fixture(scope="module")
def runs(shakespeare, tmp_path_factory) -> dict[str, dict]:
    root = str(tmp_path_factory.mktemp("bf16_resharding"))
    saved = run_layouts({2: {name: (str(TINY_CONFIG), [*COMMON, *o]) for name, o in SAVED[2].items()}},
                        shakespeare, f"{root}/saved")
    # layouts_support names run directories <root>/<world size>-<index in its launch>
    step_2 = {name: f"{root}/saved/2-{i}/checkpoints/step_2" for i, name in enumerate(SAVED[2])}
    step_2 |= {name: f"{root}/one/1-{i}/checkpoints/step_2" for i, name in enumerate(SAVED[1])}
    jobs = {name: (str(TINY_CONFIG), [*COMMON, *o]) for name, o in SAVED[1].items()}
    jobs |= {case: (str(TINY_CONFIG), [*COMMON, *o, f"--checkpoint.load={step_2[source]}"])
             for case, (source, o) in LOADED.items()}
    return saved | run_layouts({1: jobs}, shakespeare, f"{root}/one")


def fp32_state(checkpoint: Path) -> dict[str, dict[str, torch.Tensor]]:
    """{global name: {"value": fp32 master, "exp_avg": ..., "exp_avg_sq": ...}} of a PP = 1 checkpoint, its TP
    shards joined: what resharding reads (its reader, per ZeRO-0 / ZeRO-1 file format)."""
    import deepspeed  # noqa: F401  (the allow-list names DeepSpeed's types once it is imported)

    from pretrain.checkpoint.format import read_marker
    from pretrain.checkpoint.consolidate import join_tp_shards
    from pretrain.checkpoint.reshard import _read_mp_rank

    layout = read_marker(checkpoint)["layout"]
    assert layout["pipeline"] == 1
    ranks = [_read_mp_rank(checkpoint, layout, tp)[0] for tp in range(layout["tensor"])]
    out = {}
    for name in ranks[0]:
        parts = [rank[name].load() for rank in ranks]
        out[name] = {}
        for key in ("value", "exp_avg", "exp_avg_sq"):
            shards = [getattr(part, key) for part in parts]
            shape = list(shards[0].shape)
            if len(shards) > 1 and not all(torch.equal(shards[0], t) for t in shards[1:]):  # a TP-sharded tensor
                dim = 0 if "linear_proj" not in name and "linear_fc2" not in name else 1
                shape[dim] *= len(shards)
            out[name][key] = join_tp_shards(name, shards, tuple(shape), False, checkpoint)
    return out


@pytest.mark.slow
@pytest.mark.parametrize("case", list(LOADED))
def test_loaded_bf16_layout_continues_like_the_saved_one(runs, case):
    saved, loaded = runs[LOADED[case][0]], runs[case]
    assert sorted(loaded["metrics"]) == [3]
    ours, ref = loaded["metrics"][3], saved["metrics"][3]
    assert ours["loss"] == pytest.approx(ref["loss"], rel=1e-4), case
    assert ours["grad_norm"] == pytest.approx(ref["grad_norm"], rel=1e-3), case
    a = fp32_state(Path(saved["run_dir"]) / "checkpoints" / "step_3")
    b = fp32_state(Path(loaded["run_dir"]) / "checkpoints" / "step_3")
    assert a.keys() == b.keys()
    worst = max((a[n][k] - b[n][k]).abs().max().item() for n in a for k in ("value",))
    moments = max(((a[n][k] - b[n][k]).abs().max() / a[n][k].abs().max().clamp_min(1e-30)).item()
                  for n in a for k in ("exp_avg", "exp_avg_sq"))
    print(f"{case}: step-3 loss {ours['loss']:.7f} vs {ref['loss']:.7f}; max |master diff| {worst:.2e}; "
          f"moments {moments:.2e}")
    master_bound, moments_bound = (2 * 4.5e-4, 2**-5) if "TP" in case else (1e-6, 1e-5)
    assert worst < master_bound and moments < moments_bound, case


def test_a_bf16_tp2_checkpoint_evaluates_in_bf16(runs, shakespeare):
    """`pretrain eval` builds the model in the checkpoint's precision throughout: torch's LayerNorm and position
    embedding in bf16 like megatron-core's linears (DeepSpeed held all of it in bf16 in training)."""
    checkpoint = Path(runs["TP=2 ZeRO-0"]["run_dir"]) / "checkpoints" / "step_3"
    result = run_cli("eval", "--checkpoint", str(checkpoint), "--data", str(shakespeare["valid"]),
                     "--max-batches", "2")
    assert result.returncode == 0, result.stderr[-3000:]
    # 3 steps from a uniform start: about ln(1024) = 6.93, and finite
    assert abs(value_after(result.stdout, "val loss") - math.log(1024)) < 0.5, result.stdout
