"""Trainer: fit / train_step / forward_backward. No model-family code and no DeepSpeed branches live here.

The model comes with its ModelSpec (batch_fn, loss_fn); the engine (pretrain.parallel.engine.TrainEngine) runs a
step's micro-batches forward and backward and the optimizer step the same way for every layout: ZeRO stage,
tensor and pipeline parallelism are its business.
"""

from __future__ import annotations

import random
import time
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
import torch.distributed as dist
from megatron.core import parallel_state
from megatron.core.tensor_parallel.random import get_cuda_rng_tracker

from pretrain import ft
from pretrain.checkpoint import CheckpointManager
from pretrain.config import Config
from pretrain.evaluate import evaluate
from pretrain.metrics import MetricsLogger, names
from pretrain.models import BatchFn, ModelSpec
from pretrain.optim import lr_at
from pretrain.parallel.engine import TrainEngine, verify_replicas


@dataclass
class TrainState:
    """Counters that define where the run is; saved in every checkpoint."""

    step: int = 0  # optimizer steps completed
    tokens: int = 0  # training tokens consumed over all data-parallel ranks


class Trainer:
    """Runs the loop: steps, logging, evaluation, checkpoints and signal-driven stops, in that order."""

    def __init__(self, cfg: Config, spec: ModelSpec, batch_fn: BatchFn, engine: TrainEngine, train_data, valid_data,
                 checkpoints: CheckpointManager,
                 metrics: MetricsLogger, device: torch.device, accumulation: int, flops_per_token: float,
                 config_yaml: str, layout: dict):
        self.cfg, self.spec, self.batch_fn, self.engine = cfg, spec, batch_fn, engine
        self.train_data, self.valid_data = train_data, valid_data
        self.checkpoints, self.metrics, self.device = checkpoints, metrics, device
        self.accumulation, self.flops_per_token = accumulation, flops_per_token
        self.config_yaml, self.layout = config_yaml, layout
        self.state = TrainState()
        self.stop = ft.StopSignal()
        self.dp_group = parallel_state.get_data_parallel_group()
        self.dp_size = parallel_state.get_data_parallel_world_size()

    # -- the loop ------------------------------------------------------------------------------------------------

    def fit(self) -> int:
        """Train to ``train.steps``; returns the process exit code (0, or ft.REQUEUE_EXIT_CODE after a signal)."""
        cfg = self.cfg
        if cfg.ft.save_on_signal:
            self.stop.install()
        self.resume()
        batches = iter(self.train_data)
        while self.state.step < cfg.train.steps:
            record = self.train_step(batches)
            if self._is_eval_step():
                record.update(self.evaluate())
            if record:
                self.metrics.log(record)
            last = self.state.step == cfg.train.steps
            if self._due(cfg.checkpoint.every_steps) or last:
                self.save()
            if cfg.ft.save_on_signal and not last and self.stop.agreed(self.device):
                if not self._due(cfg.checkpoint.every_steps):
                    self.save()
                self.metrics.close()
                return ft.REQUEUE_EXIT_CODE
        self.metrics.close()
        digest = verify_replicas(self.engine.engine)
        if dist.get_rank() == 0:
            print(f"parameters identical across {self.dp_size} data-parallel replicas (sha256 {digest[:16]})",
                  flush=True)
        return 0

    def _due(self, every: int) -> bool:
        return bool(every) and self.state.step % every == 0

    def _is_eval_step(self) -> bool:
        due = self._due(self.cfg.train.eval_every) or self.state.step == self.cfg.train.steps
        return self.valid_data is not None and due

    def _is_log_step(self) -> bool:
        return self._due(self.cfg.train.log_every) or self.state.step == self.cfg.train.steps or self._is_eval_step()

    def train_step(self, data) -> dict[str, Any]:
        """One optimizer step: ``accumulation`` micro batches forward/backward, then the ZeRO optimizer step."""
        start = time.perf_counter()
        lr = lr_at(self.state.step, self.cfg.optim, self.cfg.train.steps)
        for group in self.engine.optimizer.param_groups:
            group["lr"] = lr
        batches = [self.batch_fn(next(data), self.train_data.last_indices, self.device)
                   for _ in range(self.accumulation)]
        loss = self.engine.forward_backward(batches)  # mean over the micro-batches, on every rank
        self.engine.step()  # clip, reduce/partition per ZeRO stage, optimizer.step(), zero_grad
        tokens = sum(batch["num_tokens"] for batch in batches)
        self.state.step += 1
        self.state.tokens += tokens * self.dp_size

        if not self._is_log_step():
            return {}
        # Logged steps only: one all-reduce for the data-parallel mean loss (TP/PP peers already agree). Its
        # .item() waits for the device, so the step time below includes all queued GPU work.
        dist.all_reduce(loss, group=self.dp_group)
        loss_value = loss.item() / self.dp_size
        step_time = time.perf_counter() - start
        tokens_per_s = tokens * self.dp_size / step_time
        return {
            names.STEP: self.state.step,
            names.LOSS: loss_value,
            names.LR: lr,
            names.GRAD_NORM: self.engine.grad_norm(),
            names.TOKENS_PER_S: tokens_per_s,
            names.STEP_TIME_S: step_time,
            names.TOKENS_TOTAL: self.state.tokens,
            names.TFLOPS: tokens_per_s * self.flops_per_token / dist.get_world_size() / 1e12,
            names.SKIPPED_SHARDS: self.train_data.skipped_shards,
            **({names.DATA_FRACTIONS: [round(f, 4) for f in self.train_data.source_fractions()]}
               if len(self.cfg.data.train) > 1 else {}),
        }

    def evaluate(self) -> dict[str, Any]:
        """Validation loss and perplexity on data.valid; merged into the step's metrics record."""
        result = evaluate(self.engine, self.engine.losses, self.batch_fn, self.valid_data, self.device,
                          self.cfg.train.eval_batches, group=self.engine.eval_group)
        return {names.VAL_LOSS: result["loss"], names.VAL_PPL: result["ppl"]}

    # -- checkpoints ---------------------------------------------------------------------------------------------

    def save(self) -> None:
        """Collective checkpoint of engine + this rank's train state (counters, data position, RNG, model
        memory)."""
        train_state = {"trainer": vars(self.state).copy(), "data": self.train_data.state_dict(), "rng": rng_state(),
                       "memory": self.engine.memory_state()}
        self.checkpoints.save(self.state.step, self.engine.engine, train_state, self.config_yaml, self.layout)

    def resume(self) -> None:
        """Continue from checkpoint.load, else from the newest complete checkpoint, else start fresh."""
        path = self.cfg.checkpoint.load or self.checkpoints.latest()
        if not path:
            return
        train_state = self.checkpoints.load(path, self.engine.engine)
        self.state = TrainState(**train_state["trainer"])
        self.train_data.load_state_dict(train_state["data"])
        self.engine.load_memory_state(train_state.get("memory", []))
        set_rng_state(train_state["rng"])
        if dist.get_rank() == 0:
            print(f"resumed from {path} at step {self.state.step}", flush=True)


def rng_state() -> dict[str, Any]:
    """Every generator a step draws from: Python, numpy, torch (CPU + CUDA) and megatron-core's tracker."""
    return {
        "python": random.getstate(),
        "numpy": np.random.get_state(),
        "torch": torch.get_rng_state(),
        "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else None,
        "tracker": get_cuda_rng_tracker().get_states(),
    }


def set_rng_state(state: dict[str, Any]) -> None:
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])
    if state["cuda"] is not None and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])
    get_cuda_rng_tracker().set_states(state["tracker"])
