"""Metrics collector and sinks. Rank 0 writes the console (pretrain.metrics.console) and JSONL; every rank feeds its
Prometheus exporter (if on). Numbers come from what the loop already computed."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from pretrain.config import MetricsConfig
from pretrain.metrics import names, sinks
from pretrain.metrics.console import Console


class MetricsLogger:
    """Console line and ``metrics.jsonl`` record per logged step, written by the writer rank (global rank 0);
    ``exporter`` (pretrain.metrics.prometheus.PrometheusExporter, one per rank) gets every rank's records."""

    def __init__(self, run_dir: Path, cfg: MetricsConfig, is_writer: bool, exporter=None, total_steps: int = 0,
                 peak_flops: float | None = None):
        self.cfg, self.is_writer, self.exporter = cfg, is_writer, exporter
        self._jsonl = open(Path(run_dir) / "metrics.jsonl", "a") if (is_writer and cfg.jsonl) else None
        # total_steps: train.steps (progress and ETA); peak_flops: one device's peak FLOP/s (MFU on the console).
        self.console = Console(total_steps, peak_flops) if (is_writer and cfg.console) else None
        self.sinks = sinks.from_config(Path(run_dir), cfg) if is_writer else []  # TensorBoard, W&B (never fatal)

    def log(self, record: dict[str, Any]) -> None:
        """Emit one record (a training step or an evaluation)."""
        if self.exporter is not None:
            self.exporter.update(record)
        if not self.is_writer:
            return
        if self._jsonl:
            self._jsonl.write(json.dumps(record) + "\n")
            self._jsonl.flush()
        for sink in self.sinks:
            sink.log(record)
        if self.console is not None:
            self.console.log(record)

    def close(self) -> None:
        """Close the JSONL file, the console's bar, and stop serving /metrics."""
        if self._jsonl:
            self._jsonl.close()
        for sink in self.sinks:
            sink.close()
        if self.console is not None:
            self.console.close()
        if self.exporter is not None:
            self.exporter.close()

