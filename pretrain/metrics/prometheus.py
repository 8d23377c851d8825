"""Prometheus exporter: every rank serves ``/metrics`` on ``metrics.prometheus.host:port + local_rank``.

Training only hands over the record it already built on a log step (``update``: a dict copy, one histogram
observation, a timestamp; no device syncs, no collectives). Everything else (gauges, counters, memory) is
assembled on the scrape thread when Prometheus asks, so exposing costs the loop next to nothing.
"""

from __future__ import annotations

import hashlib
import os
import socket
import threading
import time
from typing import Any, Iterator

from prometheus_client import CollectorRegistry, Histogram, start_http_server
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, InfoMetricFamily
from prometheus_client.registry import Collector

from pretrain.config import ConfigError
from pretrain.metrics import names

#: Dense bf16 tensor-core peak FLOP/s per device, matched by substring of torch.cuda.get_device_name() in this
#: order (more specific names first). metrics.peak_tflops overrides it; CPUs have no entry (MFU absent).
PEAK_FLOPS = (
    ("H200", 989e12),
    ("H100 PCIe", 756e12),
    ("H100", 989e12),
    ("A100", 312e12),
    ("L40S", 362e12),
    ("V100", 125e12),  # fp16 tensor cores (no bf16)
)

#: Step-time histogram buckets (seconds): from small GPU steps to slow CPU ones.
STEP_TIME_BUCKETS = (0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0, 300.0)

# Record key → (Prometheus name, help, scale) for the gauges set from the last logged record.
_GAUGES = (
    (names.STEP, names.PROM_STEP, "Optimizer steps completed (last logged step).", 1.0),
    (names.LOSS, names.PROM_LOSS, "Training loss (data-parallel mean) of the last logged step.", 1.0),
    (names.VAL_LOSS, names.PROM_VAL_LOSS, "Validation loss of the last evaluation.", 1.0),
    (names.LR, names.PROM_LR, "Learning rate of the last logged step.", 1.0),
    (names.GRAD_NORM, names.PROM_GRAD_NORM, "Gradient norm of the last logged step.", 1.0),
    (names.TOKENS_PER_S, names.PROM_TOKENS_PER_S, "Training tokens per second, all data-parallel ranks.", 1.0),
    (names.TFLOPS, names.PROM_FLOPS, "Model FLOP/s per device.", 1e12),
    (names.STEP_TIME_S, names.PROM_LAST_STEP_TIME, "Wall time of the last logged step on this rank.", 1.0),
    (names.DATA_WAIT_S, names.PROM_DATA_WAIT, "Seconds the last logged step waited for its batches.", 1.0),
    (names.FORWARD_BACKWARD_S, names.PROM_FORWARD_BACKWARD, "Forward+backward seconds of the last logged step.",
     1.0),
    (names.OPTIMIZER_S, names.PROM_OPTIMIZER, "Optimizer seconds of the last logged step.", 1.0),
    (names.CHECKPOINT_SAVE_S, names.PROM_CHECKPOINT_SAVE, "Seconds from start to commit of the last checkpoint.",
     1.0),
    (names.CHECKPOINT_BLOCKING_S, names.PROM_CHECKPOINT_BLOCKING, "Seconds the last save blocked the loop.", 1.0),
    (names.LAST_CHECKPOINT_STEP, names.PROM_LAST_CHECKPOINT_STEP, "Step of the last committed checkpoint.", 1.0),
    (names.LAST_CHECKPOINT_TIME, names.PROM_LAST_CHECKPOINT_TIME, "Unix time of the last checkpoint commit.", 1.0),
)
# Record key → (Prometheus counter name without _total, help): run totals, kept in the checkpoint.
_COUNTERS = (
    (names.TOKENS_TOTAL, names.PROM_TOKENS_TOTAL, "Training tokens consumed by the run (all ranks)."),
    (names.SKIPPED_STEPS, names.PROM_SKIPPED_STEPS, "Steps whose update was skipped (NaN/Inf or loss spike)."),
    (names.LOSS_SPIKES, names.PROM_LOSS_SPIKES, "Steps whose loss was a spike."),
    (names.SKIPPED_SHARDS, names.PROM_SKIPPED_SHARDS, "Corrupt or missing data shards skipped."),
)


def peak_flops(configured_tflops: float, device_name: str | None) -> float | None:
    """Peak FLOP/s per device: metrics.peak_tflops if set, else the PEAK_FLOPS entry for ``device_name``."""
    if configured_tflops > 0:
        return configured_tflops * 1e12
    for key, value in PEAK_FLOPS:
        if device_name and key in device_name:
            return value
    return None


def restart_count() -> int:
    """How often the launcher restarted this job: SLURM_RESTART_COUNT (requeue) or TORCHELASTIC_RESTART_COUNT."""
    for var in ("SLURM_RESTART_COUNT", "TORCHELASTIC_RESTART_COUNT"):
        if os.environ.get(var, "").isdigit():
            return int(os.environ[var])
    return 0


class _RecordCollector(Collector):
    """Builds the gauge and counter families from the last record when scraped (on the HTTP thread)."""

    def __init__(self, exporter: "PrometheusExporter"):
        self.exporter = exporter

    def collect(self) -> Iterator:
        ex = self.exporter
        record, labels = ex.record, ex.label_values
        keys = list(names.PROM_LABELS)

        def gauge(name: str, doc: str, value: float | None) -> Iterator:
            if value is not None:
                family = GaugeMetricFamily(name, doc, labels=keys)
                family.add_metric(labels, float(value))
                yield family

        for key, name, doc, scale in _GAUGES:
            if key in record:
                yield from gauge(name, doc, record[key] * scale)
        for key, name, doc in _COUNTERS:
            if key in record:
                family = CounterMetricFamily(name.removesuffix("_total"), doc, labels=keys)
                family.add_metric(labels, float(record[key]))
                yield family
        if names.TOKENS_PER_S in record:
            samples = record[names.TOKENS_PER_S] / ex.tokens_per_sample
            yield from gauge(names.PROM_SAMPLES_PER_S, "Training samples (sequences) per second, all ranks.",
                             samples)
        if ex.peak is not None and names.TFLOPS in record:
            yield from gauge(names.PROM_MFU, "Model FLOP utilisation: model FLOP/s / device peak.",
                             record[names.TFLOPS] * 1e12 / ex.peak)
        yield from gauge(names.PROM_TARGET_STEPS, "Steps the run trains to (train.steps).", ex.target_steps)
        yield from gauge(names.PROM_LAST_STEP_TIMESTAMP, "Unix time of the last logged step (liveness).",
                         ex.last_step_time)
        yield from gauge(names.PROM_HOST_RSS, "Resident host memory of this rank's process.", _host_rss())
        for name, doc, value in _device_memory():
            yield from gauge(name, doc, value)
        restarts = CounterMetricFamily(names.PROM_RESTARTS.removesuffix("_total"),
                                       "Restarts of the job by its launcher.", labels=keys)
        restarts.add_metric(labels, float(ex.restarts))
        yield restarts
        info = InfoMetricFamily(names.PROM_BUILD_INFO.removesuffix("_info"), "Version, config hash, world layout.",
                                labels=keys)
        info.add_metric(labels, ex.build_info)
        yield info


def _host_rss() -> float | None:
    try:
        import psutil
    except ImportError:  # psutil is a dependency; stay quiet if an odd install lacks it
        return None
    return float(psutil.Process().memory_info().rss)


def _device_memory() -> list[tuple[str, str, float]]:
    """CUDA caching-allocator counters (host-side reads, no synchronisation); empty on CPU."""
    import torch

    if not (torch.cuda.is_available() and torch.cuda.is_initialized()):
        return []
    return [(names.PROM_DEVICE_MEM_ALLOCATED, "Device memory held by tensors.", torch.cuda.memory_allocated()),
            (names.PROM_DEVICE_MEM_RESERVED, "Device memory reserved by the caching allocator.",
             torch.cuda.memory_reserved()),
            (names.PROM_DEVICE_MEM_PEAK, "Peak device memory held by tensors.", torch.cuda.max_memory_allocated())]


class PrometheusExporter:
    """One rank's ``/metrics`` endpoint. ``update(record)`` on every log step; ``close()`` at the end."""

    def __init__(self, *, host: str, port: int, run: str, rank: int, model: str, config_yaml: str,
                 layout: dict[str, Any], tokens_per_sample: int, peak: float | None, target_steps: int,
                 node: str | None = None):
        from pretrain import __version__

        self.label_values = [run, str(rank), node or socket.gethostname(), model]
        self.tokens_per_sample = max(1, tokens_per_sample)
        self.peak, self.target_steps = peak, target_steps
        self.restarts = restart_count()
        self.build_info = {"version": __version__,
                           "config_hash": hashlib.sha256(config_yaml.encode()).hexdigest()[:16],
                           **{f"layout_{k}": str(v) for k, v in sorted(layout.items())}}
        self.record: dict[str, Any] = {}
        self.last_step_time: float | None = None
        self.registry = CollectorRegistry(auto_describe=True)
        self.step_time = Histogram(names.PROM_STEP_TIME, "Wall time of logged training steps on this rank.",
                                   list(names.PROM_LABELS), buckets=STEP_TIME_BUCKETS,
                                   registry=self.registry).labels(*self.label_values)
        self.registry.register(_RecordCollector(self))
        self._lock = threading.Lock()
        try:
            self.server, self.thread = start_http_server(port, addr=host, registry=self.registry)
        except OSError as e:
            raise ConfigError(f"metrics.prometheus.port: cannot serve /metrics on {host}:{port} ({e.strerror}); "
                              "ranks use metrics.prometheus.port + LOCAL_RANK") from None
        self.address = (host, self.server.server_port)

    def update(self, record: dict[str, Any]) -> None:
        """Take the numbers of one logged record (a training step, possibly with evaluation results)."""
        merged = {**self.record, **record}  # keeps val_loss and checkpoint numbers between their updates
        self.record = merged  # one reference swap: the scrape thread sees either the old or the new dict
        if names.STEP_TIME_S in record:
            self.step_time.observe(record[names.STEP_TIME_S])
            self.last_step_time = time.time()

    def close(self) -> None:
        """Stop serving (Prometheus marks the series stale; the stall alert reads their last values)."""
        with self._lock:
            if self.server is not None:
                self.server.shutdown()
                self.server.server_close()
                self.server = None


def from_config(cfg, local_rank: int, rank: int, layout: dict[str, Any], config_yaml: str,
                tokens_per_sample: int, device_name: str | None) -> PrometheusExporter | None:
    """The exporter for this rank when ``metrics.prometheus.enabled``, else None."""
    m = cfg.metrics
    if not m.prometheus.enabled:
        return None
    return PrometheusExporter(host=m.prometheus.host, port=m.prometheus.port + local_rank, run=cfg.run.name,
                              rank=rank, model=cfg.model.family, config_yaml=config_yaml, layout=layout,
                              tokens_per_sample=tokens_per_sample, peak=peak_flops(m.peak_tflops, device_name),
                              target_steps=cfg.train.steps)
