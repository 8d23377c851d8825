"""Value checks of a whole Config that need no world size (those live in ParallelDims): ``validate`` on every load;
``validate_local`` (paths on this machine, this node's ports) where a run starts, before any process group."""

from __future__ import annotations

import math
import os
from pathlib import Path

from pretrain.config.sections import Config
from pretrain.errors import ConfigError


def _require(ok: bool, key: str, message: str) -> None:
    if not ok:
        raise ConfigError(f"{key}: {message}")


def validate(cfg: Config) -> None:
    """Value checks that need no world size (those live in ParallelDims)."""
    m, t, o, p = cfg.model, cfg.train, cfg.optim, cfg.parallel
    for key, value in [("model.num_layers", m.num_layers), ("model.hidden_size", m.hidden_size),
                       ("model.num_attention_heads", m.num_attention_heads), ("model.seq_length", m.seq_length),
                       ("model.make_vocab_size_divisible_by", m.make_vocab_size_divisible_by),
                       ("train.steps", t.steps), ("train.micro_batch_size", t.micro_batch_size),
                       ("train.log_every", t.log_every), ("parallel.tensor", p.tensor),
                       ("parallel.pipeline", p.pipeline), ("parallel.virtual_pipeline", p.virtual_pipeline)]:
        _require(value > 0, key, f"must be > 0, got {value}")
    for key, value in [("model.ffn_hidden_size", m.ffn_hidden_size), ("model.vocab_size", m.vocab_size),
                       ("train.global_batch_size", t.global_batch_size), ("train.eval_every", t.eval_every),
                       ("train.eval_batches", t.eval_batches), ("optim.warmup_steps", o.warmup_steps),
                       ("optim.decay_steps", o.decay_steps), ("checkpoint.every_steps", cfg.checkpoint.every_steps),
                       ("checkpoint.keep_last", cfg.checkpoint.keep_last),
                       ("checkpoint.keep_every", cfg.checkpoint.keep_every), ("data.num_workers", cfg.data.num_workers)]:
        _require(value >= 0, key, f"must be >= 0, got {value}")
    _require(m.hidden_size % m.num_attention_heads == 0, "model.num_attention_heads",
             f"{m.num_attention_heads} does not divide model.hidden_size {m.hidden_size}")
    _require(m.num_query_groups >= 0 and (m.num_query_groups == 0 or m.num_attention_heads % m.num_query_groups == 0),
             "model.num_query_groups", f"{m.num_query_groups} must be 0 (one per head) or divide "
             f"model.num_attention_heads {m.num_attention_heads}")
    _require(0 < m.rope_theta < math.inf, "model.rope_theta", f"must be a finite number > 0, got {m.rope_theta}")
    _require(m.rope_scaling_factor == 0 or 1 <= m.rope_scaling_factor < math.inf, "model.rope_scaling_factor",
             f"must be 0 (no scaling) or a finite number >= 1, got {m.rope_scaling_factor}")
    if m.rope_scaling_factor:
        _require(m.family == "gpt" and m.position_embedding == "rope", "model.rope_scaling_factor",
                 f"{m.rope_scaling_factor} needs model.family=gpt and model.position_embedding=rope, got "
                 f"{m.family} and {m.position_embedding}")
        _require(0 < m.rope_low_freq_factor < m.rope_high_freq_factor < math.inf, "model.rope_high_freq_factor",
                 f"must exceed model.rope_low_freq_factor > 0 (got low {m.rope_low_freq_factor}, high "
                 f"{m.rope_high_freq_factor})")
        _require(m.rope_original_max_position_embeddings > 0, "model.rope_original_max_position_embeddings",
                 f"must be > 0, got {m.rope_original_max_position_embeddings}")
    if m.family != "gpt":
        for key, value, default in [("normalization", m.normalization, "layernorm"),
                                    ("num_query_groups", m.num_query_groups, 0),
                                    ("add_bias_linear", m.add_bias_linear, True)]:
            _require(value == default, f"model.{key}", f"{value!r} is a GPT option; model.family={m.family} "
                     f"supports {default!r} only")
    for key, value in [("model.mem_length", m.mem_length), ("model.clamp_len", m.clamp_len)]:
        _require(value >= 0, key, f"must be >= 0, got {value}")
    for key, value in [("model.eval_mem_length", m.eval_mem_length), ("model.eval_clamp_len", m.eval_clamp_len)]:
        _require(value >= -1, key, f"must be >= 0, or -1 for the training value; got {value}")
    for key, value in [("model.hidden_dropout", m.hidden_dropout), ("model.attention_dropout", m.attention_dropout),
                       ("model.mask_prob", m.mask_prob), ("model.short_seq_prob", m.short_seq_prob)]:
        _require(0.0 <= value < 1.0, key, f"must be in [0, 1), got {value}")
    for key, value in [("optim.lr", o.lr), ("optim.eps", o.eps), ("model.init_method_std", m.init_method_std),
                       ("model.layernorm_epsilon", m.layernorm_epsilon)]:
        _require(0 < value < math.inf, key, f"must be a finite number > 0, got {value}")
    for key, value in [("optim.beta1", o.beta1), ("optim.beta2", o.beta2)]:
        _require(0 <= value < 1, key, f"must be in [0, 1), got {value}")
    _require(0 <= o.weight_decay < math.inf, "optim.weight_decay", f"must be a finite number >= 0, got {o.weight_decay}")
    _require(o.decay_steps == 0 or o.decay_steps > o.warmup_steps, "optim.decay_steps",
             f"must be 0 or > optim.warmup_steps ({o.warmup_steps}), got {o.decay_steps}")
    _require(0 <= o.min_lr <= o.lr, "optim.min_lr", f"must be in [0, optim.lr={o.lr}], got {o.min_lr}")
    _require(0 <= o.clip_grad < math.inf, "optim.clip_grad", f"must be a finite number >= 0, got {o.clip_grad}")
    _require(p.virtual_pipeline == 1 or p.pipeline > 1, "parallel.virtual_pipeline",
             f"{p.virtual_pipeline} needs parallel.pipeline > 1 (interleaving splits each pipeline stage)")
    _require(p.zero_stage <= 1 or p.pipeline == 1, "parallel.zero_stage",
             f"{p.zero_stage} needs parallel.pipeline 1 (got {p.pipeline}): ZeRO-2/3 partition gradients inside "
             "DeepSpeed's backward, which the pipeline schedule bypasses; use zero_stage 0 or 1 with pipelines")
    _require(not p.sequence_parallel or p.tensor > 1, "parallel.sequence_parallel", "needs parallel.tensor > 1")
    _require(bool(cfg.data.train), "data.train", "is required (a directory written by `pretrain data prepare`)")
    for i, source in enumerate(cfg.data.train):
        _require(bool(source.path), f"data.train[{i}].path", "is required")
        _require(0 < source.weight < math.inf, f"data.train[{i}].weight", f"must be > 0, got {source.weight}")
    _require(cfg.data.shuffle_window_blocks > 0, "data.shuffle_window_blocks",
             f"must be > 0, got {cfg.data.shuffle_window_blocks}")
    for key, value in [("ft.step_timeout_s", cfg.ft.step_timeout_s), ("ft.startup_timeout_s", cfg.ft.startup_timeout_s),
                       ("ft.save_timeout_s", cfg.ft.save_timeout_s), ("ft.spike_zscore", cfg.ft.spike_zscore),
                       ("ft.preflight_allreduce_mib", cfg.ft.preflight_allreduce_mib)]:
        _require(0 <= value < math.inf, key, f"must be a finite number >= 0 (0 disables), got {value}")
    _require(cfg.ft.max_skipped_in_a_row >= 0, "ft.max_skipped_in_a_row",
             f"must be >= 0, got {cfg.ft.max_skipped_in_a_row}")
    _require(cfg.ft.spike_window >= 2, "ft.spike_window", f"must be >= 2, got {cfg.ft.spike_window}")
    _require(1 <= cfg.metrics.prometheus.port <= 65535, "metrics.prometheus.port",
             f"must be in [1, 65535], got {cfg.metrics.prometheus.port}")
    _require(bool(cfg.metrics.prometheus.host), "metrics.prometheus.host", "must not be empty")
    _require(0 <= cfg.metrics.peak_tflops < math.inf, "metrics.peak_tflops",
             f"must be a finite number >= 0 (0: look up the GPU), got {cfg.metrics.peak_tflops}")



def validate_local(cfg: Config, local_world_size: int = 1) -> None:
    """Checks against this machine, run by every rank before any process group exists (``pretrain train``): every
    local path the run reads exists, and this node's Prometheus ports fit. Raises a one-line ConfigError naming the
    key and the value, instead of a traceback (or a hang of the peers) once the job has started.

    Only local paths are checked (plain paths and ``file:`` URLs); ``pipe:``, http and other URLs are left to
    webdataset, which opens them when read. Shard patterns (``data.train[i].shards``) are left to the reader too:
    under ``data.on_bad_shard=skip`` a missing shard is skipped by design. Outputs (``run.dir``,
    ``checkpoint.dir``) may be missing (they are created) but must not be files.
    """
    from data_pipeline.shards import MANIFEST_NAME
    from data_pipeline.stream import is_local, local_path

    def shard_source(key: str, location: str) -> None:
        if not location or not is_local(location):
            return
        path = local_path(location)
        _require(path.exists(), key, f"not found: {location}")
        _require(path.is_file() or (path / MANIFEST_NAME).is_file(), key,
                 f"no {MANIFEST_NAME} in {location} (a directory written by `pretrain data prepare`)")

    for i, source in enumerate(cfg.data.train):
        shard_source(f"data.train[{i}].path", source.path)
    shard_source("data.valid", cfg.data.valid)
    if cfg.data.tokenizer:  # rank 0 copies it into the run directory, every rank hashes it
        tokenizer = Path(cfg.data.tokenizer)
        _require(tokenizer.exists(), "data.tokenizer", f"file not found: {tokenizer}")
        _require(tokenizer.is_file(), "data.tokenizer", f"not a file: {tokenizer}")
        _require(os.access(tokenizer, os.R_OK), "data.tokenizer", f"not readable: {tokenizer}")
    if cfg.checkpoint.load:
        load = Path(cfg.checkpoint.load)
        _require(load.exists(), "checkpoint.load", f"checkpoint directory not found: {load}")
        _require(load.is_dir(), "checkpoint.load", f"not a directory: {load}")
    for key, value in [("run.dir", cfg.run.dir), ("checkpoint.dir", cfg.checkpoint.dir)]:
        _require(not value or not Path(value).exists() or Path(value).is_dir(), key,
                 f"exists and is not a directory: {value}")
    prom = cfg.metrics.prometheus
    last_port = prom.port + local_world_size - 1  # local rank r serves on port + r
    _require(not prom.enabled or last_port <= 65535, "metrics.prometheus.port",
             f"{prom.port} + LOCAL_RANK (up to {local_world_size - 1} on this node) reaches {last_port}, past 65535; "
             f"use a base port <= {65536 - local_world_size}")
