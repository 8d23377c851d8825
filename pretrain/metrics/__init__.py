"""Metrics collector and sinks. Rank 0 writes console + JSONL; every rank feeds its Prometheus exporter (if on).
Numbers come from what the loop already computed."""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any

from pretrain.config import MetricsConfig
from pretrain.metrics import names


class MetricsLogger:
    """Console line and ``metrics.jsonl`` record per logged step, written by the writer rank (global rank 0);
    ``exporter`` (pretrain.metrics.prometheus.PrometheusExporter, one per rank) gets every rank's records."""

    def __init__(self, run_dir: Path, cfg: MetricsConfig, is_writer: bool, exporter=None):
        self.cfg, self.is_writer, self.exporter = cfg, is_writer, exporter
        self._jsonl = open(Path(run_dir) / "metrics.jsonl", "a") if (is_writer and cfg.jsonl) else None

    def log(self, record: dict[str, Any]) -> None:
        """Emit one record (a training step or an evaluation)."""
        if self.exporter is not None:
            self.exporter.update(record)
        if not self.is_writer:
            return
        if self._jsonl:
            self._jsonl.write(json.dumps(record) + "\n")
            self._jsonl.flush()
        if self.cfg.console:
            print(format_line(record), file=sys.stdout, flush=True)

    def close(self) -> None:
        """Close the JSONL file and stop serving /metrics."""
        if self._jsonl:
            self._jsonl.close()
        if self.exporter is not None:
            self.exporter.close()


def format_line(record: dict[str, Any]) -> str:
    """``step 10 | loss 5.1234 | lr 1.00e-03 | ...`` in a fixed key order, then any extra keys."""
    parts = [f"{names.STEP} {record[names.STEP]}"]
    for key, value in record.items():
        if key == names.STEP:
            continue
        if isinstance(value, float):
            text = f"{value:.2e}" if key == names.LR else f"{value:.4f}" if abs(value) < 100 else f"{value:.0f}"
        else:
            text = str(value)
        parts.append(f"{key} {text}")
    return " | ".join(parts)
