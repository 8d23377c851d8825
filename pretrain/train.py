"""``pretrain train``: config → process groups → components → ``Trainer.fit()``. The file to read first.

Works unchanged as a single process, under ``torchrun --nproc_per_node=N`` and under ``srun`` (the launchers
export RANK / WORLD_SIZE / LOCAL_RANK / MASTER_ADDR / MASTER_PORT).
"""

from __future__ import annotations

import logging
import os
import shutil
from pathlib import Path

import torch.distributed as dist

from pretrain import device as device_layer
from pretrain import fault_tolerance as ft
from pretrain import models
from pretrain.config import Config, dump, to_yaml
from pretrain.errors import ConfigError
from pretrain.config.validation import validate_local
from pretrain.parallel import env, preflight, slurm_env
from pretrain.parallel.dims import ParallelDims

logger = logging.getLogger(__name__)


def main(cfg: Config) -> int:
    """Run training to ``cfg.train.steps``; returns the process exit code (pretrain/fault_tolerance/signals.py)."""
    dims, device = start(cfg)
    try:
        return build(cfg, dims, device).fit()
    finally:
        env.shutdown()


def start(cfg: Config) -> tuple[ParallelDims, device_layer.DeviceInfo]:
    """Check ``cfg`` for this launch and join the default process group (not yet megatron-core's groups: those are
    :func:`build`'s); the caller calls ``env.shutdown()`` when done."""
    slurm_env.apply()  # a bare `srun pretrain train` task: SLURM_* → RANK/WORLD_SIZE/... (no-op otherwise)
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    # Bad input fails here, on every rank, in one line, before any process group exists: the layout, the
    # family's own limits, missing paths and ports past 65535.
    dims = ParallelDims.from_config(cfg, world_size)
    models.get(cfg.model.family).check_config(cfg)
    validate_local(cfg, max(int(os.environ.get("LOCAL_WORLD_SIZE", "1")), local_rank + 1))
    device = device_layer.detect(local_rank, cfg.train.precision)
    device_layer.apply_cpu_shims()
    env.init_distributed(device.backend, _startup_timeout_s(cfg))
    return dims, device


def build(cfg: Config, dims: ParallelDims, device: device_layer.DeviceInfo, init=None):
    """Build every component for this rank: process groups, data, model, engine → a ready Trainer.

    ``init(chunks, tokenizer vocab size)`` sets the weights instead of the seeded random init (`pretrain import
    hf`), before the engine copies them into its optimizer state."""
    # Imported here, after the device layer ran: DeepSpeed picks its accelerator when first imported.
    from megatron.core import parallel_state

    from pretrain.checkpoint.manager import CheckpointManager
    from pretrain.metrics import MetricsLogger, prometheus
    from pretrain.models.init import init_weights
    from pretrain.parallel.engine import TrainEngine, build_engine
    from pretrain.trainer import Trainer

    env.init_process_groups(dims, cfg.run.seed, _startup_timeout_s(cfg))
    rank = dist.get_rank()
    run_dir = Path(cfg.run.dir)
    if rank == 0:
        run_dir.mkdir(parents=True, exist_ok=True)
        dump(cfg, run_dir / "config.yaml")
        if cfg.data.tokenizer:  # the tokenizer travels with the run, so its checkpoints decode on their own
            shutil.copyfile(cfg.data.tokenizer, run_dir / "tokenizer.model")
    dist.barrier()

    # Data: one global sample order for the whole job; each data-parallel rank takes its slice of every global
    # batch, so TP/PP peers of one replica read identical batches and the order survives a change of DP size.
    dp_rank, dp_size = parallel_state.get_data_parallel_rank(), parallel_state.get_data_parallel_world_size()
    tokenizer_sha = _sha256(cfg.data.tokenizer) if cfg.data.tokenizer else None
    reader_args = dict(micro_batch_size=cfg.train.micro_batch_size, dp_rank=dp_rank, dp_size=dp_size,
                       seed=cfg.run.seed, num_workers=cfg.data.num_workers, expected_tokenizer_sha256=tokenizer_sha,
                       on_bad_shard=cfg.data.on_bad_shard)
    spec = models.get(cfg.model.family)
    train_data, valid_data = spec.make_readers(cfg, reader_args)
    accumulation = dims.grad_accumulation_steps(cfg.train.micro_batch_size, cfg.train.global_batch_size)
    assert train_data.accumulation == accumulation, (train_data.accumulation, accumulation)
    # Before the model: a job wired wrongly (ranks that disagree, missing nodes) fails here, on every rank alike.
    checked = preflight.run(to_yaml(cfg), train_data.manifest, cfg.ft.preflight_allreduce_mib, device.device)

    # Model and engine.
    vocab_size = models.padded_vocab_size(cfg.model.vocab_size or train_data.manifest["vocab_size"],
                                          cfg.model.make_vocab_size_divisible_by, dims.tensor)
    chunks = [c.to(device.device) for c in spec.build_chunks(cfg.model, cfg.parallel, device.dtype, vocab_size,
                                                             document_masks=cfg.data.reset_at_eos)]
    if init is None:
        init_weights(chunks, cfg.run.seed, cfg.model.init_method_std, cfg.model.num_layers)  # same for every layout
    else:
        init(chunks, cfg.model.vocab_size or train_data.manifest["vocab_size"])
    engine = TrainEngine(build_engine(chunks, cfg, dims, device.dtype), chunks, spec.loss_fn,
                         cfg.model.seq_length, cfg.train.micro_batch_size)
    if (timeout_s := _startup_timeout_s(cfg)) is not None:  # also the groups DeepSpeed made with torch's default
        env.set_collective_timeouts(timeout_s)

    layout = {"tensor": dims.tensor, "pipeline": dims.pipeline, "virtual_pipeline": dims.virtual_pipeline,
              "data": dims.data, "zero_stage": cfg.parallel.zero_stage, "vocab_size": vocab_size,
              "layer_spec": getattr(chunks[0], "layer_spec_name", "local"),
              "tokenizer_vocab_size": cfg.model.vocab_size or train_data.manifest["vocab_size"]}
    if rank == 0:
        n_params = sum(p.numel() for c in chunks for p in c.parameters())
        logger.info("model %s: %.2fM parameters on rank 0 | layout %s | device %s %s | run dir %s", cfg.model.family,
                    n_params / 1e6, layout, device.device, str(device.dtype).removeprefix("torch."), run_dir)
    exporter = prometheus.from_config(cfg, int(os.environ.get("LOCAL_RANK", "0")), rank, layout, to_yaml(cfg),
                                      tokens_per_sample=cfg.model.seq_length, device_name=device.name)
    if exporter is not None:
        exporter.allreduce_bus_bandwidth = checked.bus_bandwidth_gbps
    return Trainer(
        cfg, spec, spec.make_batch_fn(cfg, train_data.manifest), engine, train_data, valid_data,
        checkpoints=CheckpointManager(cfg.checkpoint_dir(), cfg.checkpoint.keep_last, cfg.checkpoint.keep_every,
                                      cfg.checkpoint.async_save, layout),
        metrics=MetricsLogger(run_dir, cfg.metrics, is_writer=rank == 0, exporter=exporter,
                              total_steps=cfg.train.steps,
                              peak_flops=prometheus.peak_flops(cfg.metrics.peak_tflops, device.name)),
        device=device.device,
        accumulation=accumulation,
        flops_per_token=spec.flops_per_token(cfg.model, vocab_size),
        config_yaml=to_yaml(cfg),
    )


def _startup_timeout_s(cfg: Config) -> float | None:
    return ft.startup_collective_timeout_s(cfg.ft.step_timeout_s, cfg.ft.startup_timeout_s, cfg.ft.save_timeout_s)


def _sha256(path: str) -> str:
    from data_pipeline.integrity import file_digests

    if not Path(path).is_file():
        raise ConfigError(f"data.tokenizer: file not found: {path}")
    return file_digests(path, ("sha256",))["sha256"]
