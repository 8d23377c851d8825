"""Trainer: fit / train_step / forward_backward. No model-family code and no DeepSpeed branches live here.

The model comes with its ModelSpec (batch_fn, loss_fn); the engine (pretrain.parallel.engine.TrainEngine) runs a
step's micro-batches forward and backward and the optimizer step the same way for every layout: ZeRO stage,
tensor and pipeline parallelism are its business.
"""

from __future__ import annotations

import logging
import math
import random
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.distributed as dist
from megatron.core import parallel_state
from megatron.core.tensor_parallel.random import get_cuda_rng_tracker

from pretrain import device as device_layer
from pretrain import fault_tolerance as ft
from pretrain.checkpoint.manager import CheckpointManager
from pretrain.config import Config
from pretrain.evaluate import evaluate
from pretrain.metrics import MetricsLogger, names
from pretrain.metrics.goodput import GoodputLedger
from pretrain.models.spec import BatchFn, ModelSpec
from pretrain.optim import lr_at
from pretrain.parallel.engine import TrainEngine, verify_replicas

logger = logging.getLogger(__name__)


@dataclass
class TrainState:
    """Counters that define where the run is, and the spike detector's loss window; saved in every checkpoint.
    Fields added later have defaults, so older checkpoints still load."""

    step: int = 0  # optimizer steps completed
    tokens: int = 0  # training tokens consumed over all data-parallel ranks
    skipped_steps: int = 0  # steps whose update was skipped (non-finite loss or grad norm, or a skipped loss spike)
    loss_spikes: int = 0  # steps whose loss was a spike (ft.spike_zscore), skipped or not
    recent_losses: tuple[float, ...] = field(default=())  # the spike detector's window (ft.spike_window)


class Trainer:
    """Runs the loop: steps, logging, evaluation, checkpoints and signal-driven stops, in that order."""

    def __init__(self, cfg: Config, spec: ModelSpec, batch_fn: BatchFn, engine: TrainEngine, train_data, valid_data,
                 checkpoints: CheckpointManager,
                 metrics: MetricsLogger, device: torch.device, accumulation: int, flops_per_token: float,
                 config_yaml: str):
        self.cfg, self.spec, self.batch_fn, self.engine = cfg, spec, batch_fn, engine
        self.train_data, self.valid_data = train_data, valid_data
        self.checkpoints, self.metrics, self.device = checkpoints, metrics, device
        self.accumulation, self.flops_per_token = accumulation, flops_per_token
        self.config_yaml = config_yaml
        self.state = TrainState()
        self.stop = ft.StopSignal()
        self.dp_group = parallel_state.get_data_parallel_group()
        self.dp_size = parallel_state.get_data_parallel_world_size()
        self.rank = dist.get_rank()
        self.faults = ft.TestFaults.from_env()
        self.watchdog = ft.Watchdog(cfg.ft.step_timeout_s, cfg.ft.startup_timeout_s, cfg.ft.save_timeout_s,
                                    rank=self.rank, hang_dir=Path(cfg.run.dir) / ft.HANG_DIR)
        self.watchdog.beat(1, "startup (resume, first step)")
        self.skipped_in_a_row = 0
        self.goodput = GoodputLedger.for_run(cfg.run.dir, is_writer=self.rank == 0)

    # -- the loop ------------------------------------------------------------------------------------------------

    def fit(self) -> int:
        """Train to ``train.steps``; returns the process exit code (0, or ft.REQUEUE_EXIT_CODE after a signal)."""
        try:
            return self._fit()
        finally:
            self.watchdog.close()
            self.goodput.finish(self.checkpoints.last_commit)

    def _fit(self) -> int:
        cfg = self.cfg
        if cfg.ft.save_on_signal:
            self.stop.install()
        self.resume()
        self.goodput.resumed(self.state.step)
        batches = iter(self.train_data)
        while self.state.step < cfg.train.steps:
            record = self.train_step(batches)
            if self._is_eval_step():
                record.update(self.evaluate())
                self.goodput.mark("eval")
            self.checkpoints.poll()  # commits an async save once every rank has written it
            last = self.state.step == cfg.train.steps
            stop = cfg.ft.save_on_signal and not last and self.stop.agreed(self.device)
            if self._due(cfg.checkpoint.every_steps) or last or stop:
                self.save()
                self.goodput.mark("checkpoint")
                if record:
                    record[names.CHECKPOINT_BLOCKING_S] = self.checkpoints.stats["blocking_s"]
            if record and self.checkpoints.last_commit:  # set by the save (sync) or a later poll (async)
                record.update(self.checkpoints.last_commit)
            self.goodput.update(record, self.checkpoints.last_commit)  # settles commits; totals on log steps
            if record:
                self.metrics.log(record)
            if stop:
                self._finish()
                return ft.REQUEUE_EXIT_CODE
        self._finish()
        digest = verify_replicas(self.engine.engine)
        if dist.get_rank() == 0:
            logger.info("parameters identical across %d data-parallel replicas (sha256 %s)", self.dp_size,
                        digest[:16])
        return 0

    def _finish(self) -> None:
        """Commit the save still being written (async) and close the metric sinks."""
        with self.watchdog.saving(self.state.step):
            self.checkpoints.wait()
        self.metrics.close()

    def _due(self, every: int) -> bool:
        return bool(every) and self.state.step % every == 0

    def _is_eval_step(self) -> bool:
        due = self._due(self.cfg.train.eval_every) or self.state.step == self.cfg.train.steps
        return self.valid_data is not None and due

    def _is_log_step(self) -> bool:
        return self._due(self.cfg.train.log_every) or self.state.step == self.cfg.train.steps or self._is_eval_step()

    def train_step(self, data) -> dict[str, Any]:
        """One optimizer step: ``accumulation`` micro batches forward/backward, then the ZeRO optimizer step, which
        every rank skips alike for a non-finite loss or gradient norm (ft.nan_policy) or a loss spike
        (ft.spike_policy=skip)."""
        start = time.perf_counter()
        step = self.state.step + 1  # the step this call completes, as logged
        self.watchdog.beat(step, "forward/backward")
        lr = lr_at(self.state.step, self.cfg.optim, self.cfg.train.steps)
        for group in self.engine.optimizer.param_groups:
            group["lr"] = lr
        batches = [self.batch_fn(next(data), self.train_data.last_indices, self.device)
                   for _ in range(self.accumulation)]
        data_ready = time.perf_counter()
        with ft.injected_faults(self.faults, self.engine, step, self.rank):
            loss = self.engine.forward_backward(batches)  # mean over the micro-batches, on every rank
        # One all-reduce per step for the data-parallel mean loss (TP/PP peers already agree): the same number on
        # every rank, so every rank makes the same skip decision.
        dist.all_reduce(loss, group=self.dp_group)
        loss_value = loss.item() / self.dp_size
        backward_done = time.perf_counter()  # the .item() above waited for the forward/backward's device work
        spike = self._is_spike(step, loss_value)
        self.watchdog.note("optimizer step")
        skip = not math.isfinite(loss_value) or (spike and self.cfg.ft.spike_policy == "skip")
        applied = self.engine.step(skip=skip)  # clip, reduce/partition per ZeRO stage, update, zero_grad
        grad_norm = self.engine.grad_norm()
        tokens = sum(batch["num_tokens"] for batch in batches)
        self.state.step += 1
        self.state.tokens += tokens * self.dp_size
        self.state.recent_losses = ft.push_loss(self.state.recent_losses, loss_value, self.cfg.ft.spike_window)
        self._count_skip(step, applied, loss_value, grad_norm)
        self.watchdog.step_completed(step)
        self.goodput.step_done(step, time.perf_counter() - start, data_ready - start, applied)

        if not (self._is_log_step() or spike or not applied):
            return {}
        # The loss's .item() came before the update; this one waits for the update's queued device work too, so
        # the step time includes it.
        torch.zeros((), device=self.device).item()
        step_time = time.perf_counter() - start
        tokens_per_s = tokens * self.dp_size / step_time
        # Summed over every rank (TP/PP peers read their batches too): what the job read from the filesystem.
        read_bytes = torch.tensor([self.train_data.bytes_read], dtype=torch.int64, device=self.device)
        dist.all_reduce(read_bytes)
        return {
            names.STEP: self.state.step,
            names.LOSS: loss_value,
            names.LR: lr,
            names.GRAD_NORM: grad_norm,
            names.TOKENS_PER_S: tokens_per_s,
            names.STEP_TIME_S: step_time,
            names.DATA_WAIT_S: data_ready - start,
            names.FORWARD_BACKWARD_S: backward_done - data_ready,
            names.OPTIMIZER_S: step_time - (backward_done - start),
            names.TOKENS_TOTAL: self.state.tokens,
            names.TFLOPS: tokens_per_s * self.flops_per_token / dist.get_world_size() / 1e12,
            names.SKIPPED_SHARDS: self.train_data.skipped_shards,
            names.DATA_READ_BYTES: int(read_bytes.item()),
            names.SKIPPED_STEPS: self.state.skipped_steps,
            names.LOSS_SPIKES: self.state.loss_spikes,
            **({names.DATA_FRACTIONS: [round(f, 4) for f in self.train_data.source_fractions()]}
               if len(self.cfg.data.train) > 1 else {}),
        }

    def _is_spike(self, step: int, loss: float) -> bool:
        """Whether ``loss`` is a spike against the previous ft.spike_window losses (judged once the window is
        full); counted and warned about on rank 0."""
        cfg, window = self.cfg.ft, self.state.recent_losses
        if not cfg.spike_zscore or len(window) < cfg.spike_window:
            return False
        z = ft.loss_zscore(window, loss)
        if not z > cfg.spike_zscore:  # NaN (a non-finite loss) is the NaN guard's business, not a spike
            return False
        self.state.loss_spikes += 1
        if self.rank == 0:
            logger.warning("step %d: loss %.4f is a spike (%.1f standard deviations above the last %d steps' mean; "
                           "ft.spike_policy=%s)", step, loss, z, len(window), cfg.spike_policy)
        return True

    def _count_skip(self, step: int, applied: bool, loss: float, grad_norm: float) -> None:
        """Count a skipped update; stop the run (ft.NonFiniteStep) under ft.nan_policy=abort or after
        ft.max_skipped_in_a_row skipped steps in a row."""
        cfg = self.cfg.ft
        if applied:
            self.skipped_in_a_row = 0
            return
        self.state.skipped_steps += 1
        self.skipped_in_a_row += 1
        non_finite = not (math.isfinite(loss) and math.isfinite(grad_norm))
        what = (f"non-finite loss ({loss})" if not math.isfinite(loss) else
                f"non-finite gradient norm ({grad_norm})" if non_finite else f"loss spike ({loss:.4f})")
        if non_finite and cfg.nan_policy == "abort":
            raise ft.NonFiniteStep(f"step {step}: {what}; update not applied; stopping (ft.nan_policy=abort)",
                                   self.rank)
        if cfg.max_skipped_in_a_row and self.skipped_in_a_row >= cfg.max_skipped_in_a_row:
            raise ft.NonFiniteStep(f"step {step}: {self.skipped_in_a_row} updates skipped in a row, the last for "
                                   f"{what}; stopping (ft.max_skipped_in_a_row={cfg.max_skipped_in_a_row})",
                                   self.rank)
        if self.rank == 0:
            logger.warning("step %d: %s; update skipped on every rank (%d skipped so far)", step, what,
                           self.state.skipped_steps)

    def evaluate(self) -> dict[str, Any]:
        """Validation loss and perplexity on data.valid; merged into the step's metrics record."""
        def losses(batches):
            self.watchdog.beat(self.state.step, "evaluation")  # each group of batches gets the step timeout
            return self.engine.losses(batches)

        result = evaluate(self.engine, losses, self.batch_fn, self.valid_data, self.device,
                          self.cfg.train.eval_batches, group=self.engine.eval_group)
        return {names.VAL_LOSS: result["loss"], names.VAL_PPL: result["ppl"]}

    # -- checkpoints ---------------------------------------------------------------------------------------------

    def save(self) -> None:
        """Collective checkpoint of engine + this rank's train state (counters, data position, RNG, model
        memory)."""
        train_state = {"trainer": vars(self.state).copy(), "data": self.train_data.state_dict(), "rng": rng_state(),
                       "memory": self.engine.memory_state()}
        with self.watchdog.saving(self.state.step):  # ft.save_timeout_s instead of the step's
            self.checkpoints.save(self.state.step, self.engine.engine, train_state, self.config_yaml)

    def resume(self) -> None:
        """Continue from the run's own newest checkpoint that verifies, else from checkpoint.load (which only seeds
        a run without checkpoints of its own, so a requeued run keeps its progress), else start fresh. Rank 0
        chooses; every rank loads that one. A checkpoint.load that fails verification is refused; one of the
        run's own is skipped."""
        found = self.checkpoints.resume_point(self.cfg.checkpoint.load)  # verified once, here
        if found is None:
            if self.rank == 0:
                logger.info("starting from step 0: no checkpoint of this run in %s, and no checkpoint.load",
                            self.checkpoints.root)
            return
        path = found.path
        train_state = self.checkpoints.load(path, found.marker, self.engine, self.cfg.model)
        self.state = TrainState(**train_state["trainer"])
        self.train_data.load_state_dict(train_state["data"])
        self.engine.load_memory_state(train_state.get("memory", []))
        set_rng_state(train_state["rng"])
        if self.rank == 0:
            # Logged once loaded, so a refusal stays the one line of stderr.
            logger.info("resumed from %s at step %d (marker sha256 %s): %s", path, self.state.step,
                        found.digest[:16], found.reason)


def rng_state() -> dict[str, Any]:
    """Every generator a step draws from: Python, numpy, torch (CPU + CUDA) and megatron-core's tracker."""
    return {
        "python": random.getstate(),
        "numpy": np.random.get_state(),
        "torch": torch.get_rng_state(),
        "cuda": torch.cuda.get_rng_state_all() if device_layer.cuda_available() else None,
        "tracker": get_cuda_rng_tracker().get_states(),
    }


def set_rng_state(state: dict[str, Any]) -> None:
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])
    if state["cuda"] is not None and device_layer.cuda_available():
        torch.cuda.set_rng_state_all(state["cuda"])
    if "tracker" in state:  # absent after resharding: the new layout's ranks keep their own seeded streams
        get_cuda_rng_tracker().set_states(state["tracker"])
