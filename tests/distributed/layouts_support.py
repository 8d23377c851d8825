"""Training many parallel layouts in one spawned process group (megatron-core's groups rebuilt between them)."""

from __future__ import annotations

import json

from pretrain.testing import run_distributed


def train_layouts(layouts: dict[str, tuple[str, list[str]]], data_args: list[str], root: str) -> dict[str, dict]:
    """In a spawned process group: train each layout {name: (config, overrides)} in turn; rank 0 returns
    {name: {"metrics": {step: record}, "run_dir": its run directory}}."""
    import torch.distributed as dist
    from megatron.core import parallel_state

    from pretrain import device
    from pretrain.config import load
    from pretrain.parallel.dims import ParallelDims
    from pretrain.train import build

    results = {}
    for i, (name, (config, overrides)) in enumerate(layouts.items()):
        run_dir = f"{root}/{dist.get_world_size()}-{i}"
        cfg = load(config, [*data_args, f"--run.dir={run_dir}", *overrides])
        dims = ParallelDims.from_config(cfg, dist.get_world_size())
        assert build(cfg, dims, device.detect(0, cfg.train.precision)).fit() == 0
        if dist.get_rank() == 0:
            lines = open(f"{run_dir}/metrics.jsonl").read().splitlines()
            results[name] = {"metrics": {r["step"]: r for r in map(json.loads, lines)}, "run_dir": run_dir}
        parallel_state.destroy_model_parallel()
    return results


def run_layouts(jobs_by_world: dict[int, dict[str, tuple[str, list[str]]]], data: dict, root: str) -> dict:
    """Train every world size's layouts (one launch per world size) on the session's data; {name: result}."""
    data_args = [f"--data.train={data['train']}", f"--data.valid={data['valid']}",
                 f"--data.tokenizer={data['tokenizer']}"]
    results = {}
    for world, jobs in jobs_by_world.items():
        results.update(run_distributed(train_layouts, world, args=(jobs, data_args, root), timeout_s=900)[0])
    return results
