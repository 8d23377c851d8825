"""Every parallel layout trains like one process: same seed, data and global batch -> the same losses.

Layouts of one world size share a launch (megatron-core's groups are rebuilt between them), so the whole
matrix costs four process launches. Dropout is off: which rank draws which mask differs by layout.
"""

from __future__ import annotations

import json

import pytest

from pretrain.testing import run_distributed
from tests.conftest import TINY_CONFIG

STEPS = 10
COMMON = ["--model.hidden_dropout=0.0", "--model.attention_dropout=0.0", f"--train.steps={STEPS}",
          "--train.micro_batch_size=4", "--train.global_batch_size=16", "--train.log_every=1",
          f"--train.eval_every={STEPS}", "--train.eval_batches=2", "--checkpoint.every_steps=0"]

LAYOUTS = {
    1: {"single": [], "one micro-batch per step": ["--train.micro_batch_size=16"],  # accumulation 4 vs 1
        "full recompute": ["--parallel.activation_checkpointing=full"],
        "selective recompute": ["--parallel.activation_checkpointing=selective"]},
    2: {"TP=2": ["--parallel.tensor=2"],
        "PP=2 1F1B": ["--parallel.pipeline=2"],
        "PP=2 VPP=2 interleaved": ["--parallel.pipeline=2", "--parallel.virtual_pipeline=2"],
        "TP=2 + sequence parallel": ["--parallel.tensor=2", "--parallel.sequence_parallel=true"],
        "DP=2 ZeRO-1": ["--parallel.zero_stage=1"],
        "DP=2 ZeRO-2": ["--parallel.zero_stage=2"],
        "DP=2 ZeRO-3": ["--parallel.zero_stage=3"]},
    4: {"TP=2 x PP=2": ["--parallel.tensor=2", "--parallel.pipeline=2"],
        "TP=2 x DP=2 ZeRO-3": ["--parallel.tensor=2", "--parallel.zero_stage=3"]},
    8: {"TP=2 x PP=2 x DP=2 ZeRO-1": ["--parallel.tensor=2", "--parallel.pipeline=2", "--parallel.zero_stage=1"]},
}


def train_layouts(layouts: dict[str, list[str]], data_args: list[str], root: str) -> dict[str, dict]:
    """In a spawned process group: train each layout in turn; rank 0 returns {name: {step: record}}."""
    import deepspeed
    import torch.distributed as dist
    from megatron.core import parallel_state

    from pretrain import device
    from pretrain.config import load
    from pretrain.parallel import ParallelDims
    from pretrain.train import build

    deepspeed.init_distributed(dist_backend="gloo", auto_mpi_discovery=False)
    results = {}
    for i, (name, overrides) in enumerate(layouts.items()):
        run_dir = f"{root}/{dist.get_world_size()}-{i}"
        cfg = load(TINY_CONFIG, [*COMMON, *data_args, f"--run.dir={run_dir}", *overrides])
        dims = ParallelDims.from_config(cfg, dist.get_world_size())
        assert build(cfg, dims, device.detect(0, cfg.train.precision)).fit() == 0
        if dist.get_rank() == 0:
            lines = open(f"{run_dir}/metrics.jsonl").read().splitlines()
            results[name] = {r["step"]: r for r in map(json.loads, lines)}
        parallel_state.destroy_model_parallel()
    return results


@pytest.fixture(scope="module")
def runs(shakespeare, tmp_path_factory) -> dict[str, dict]:
    root = tmp_path_factory.mktemp("layouts")
    data = [f"--data.train={shakespeare['train']}", f"--data.valid={shakespeare['valid']}",
            f"--data.tokenizer={shakespeare['tokenizer']}"]
    results = {}
    for world, layouts in LAYOUTS.items():
        results.update(run_distributed(train_layouts, world, args=(layouts, data, str(root)), timeout_s=900)[0])
    return results


@pytest.mark.slow
@pytest.mark.parametrize("name", [name for layouts in LAYOUTS.values() for name in layouts if name != "single"])
def test_layout_matches_single_process(runs, name):
    ref, ours = runs["single"], runs[name]
    assert sorted(ours) == sorted(ref) == list(range(1, STEPS + 1))
    for step in ref:
        assert ours[step]["loss"] == pytest.approx(ref[step]["loss"], rel=1e-5), (name, step)
        assert ours[step]["grad_norm"] == pytest.approx(ref[step]["grad_norm"], rel=1e-4), (name, step)
    # eval_batches counts each rank's micro-batches: a larger micro batch or DP size validates on more rows.
    if name != "one micro-batch per step" and "DP=2" not in name:
        assert ours[STEPS]["val_loss"] == pytest.approx(ref[STEPS]["val_loss"], rel=1e-5), name
    assert ref[STEPS]["loss"] < ref[1]["loss"]  # it trains
