"""Prometheus exporter: every rank serves ``/metrics`` on ``metrics.prometheus.host:port + local_rank``.

Training only hands over the record it already built on a log step (``update``: a dict copy, one histogram
observation, a timestamp; no device syncs, no collectives). Everything else (gauges, counters, memory) is
assembled on the scrape thread when Prometheus asks, so exposing costs the loop next to nothing. A rank whose
exporter cannot start warns and trains without one (``from_config``); the others count it in a metric.
"""

from __future__ import annotations

import hashlib
import logging
import os
import socket
import threading
import time
from typing import Any, Iterator

from prometheus_client import CollectorRegistry, Histogram, start_http_server
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, InfoMetricFamily
from prometheus_client.registry import Collector

from pretrain.metrics import names

logger = logging.getLogger(__name__)

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
    (names.DATA_READ_BYTES, names.PROM_DATA_READ_BYTES, "Bytes all ranks' training data readers read from shard "
     "files (job-wide: the same number on every rank; read with max())."),
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
        if names.GOODPUT_S in record:  # rank 0 only: the run's account over all attempts
            goodput = CounterMetricFamily(names.PROM_GOODPUT.removesuffix("_total"),
                                          "Seconds of the run's wall time (all attempts) by kind "
                                          "(pretrain.metrics.goodput.KINDS).", labels=[*keys, "kind"])
            for kind, seconds in record[names.GOODPUT_S].items():
                goodput.add_metric([*labels, kind], float(seconds))
            yield goodput
            yield from gauge(names.PROM_GOODPUT_UNCOMMITTED, "Seconds of steps since the last committed checkpoint "
                             "(productive once one commits, redone after a crash).",
                             record.get(names.GOODPUT_UNCOMMITTED_S))
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
        failures = CounterMetricFamily(names.PROM_EXPORTER_FAILURES.removesuffix("_total"),
                                       "Ranks of the job whose exporter could not start (they serve no /metrics); "
                                       "the same job-wide number on every serving rank.", labels=keys)
        failures.add_metric(labels, float(ex.exporter_failures))
        yield failures
        if ex.allreduce_bus_bandwidth is not None:
            yield from gauge(names.PROM_ALLREDUCE_BUS_BANDWIDTH, "Bus bandwidth (bytes/s) of the preflight's timed "
                             "all-reduce at startup (ft.preflight_allreduce_mib per rank).",
                             ex.allreduce_bus_bandwidth * 1e9)
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

    from pretrain import device

    if not (device.cuda_available() and torch.cuda.is_initialized()):
        return []
    return [(names.PROM_DEVICE_MEM_ALLOCATED, "Device memory held by tensors.", torch.cuda.memory_allocated()),
            (names.PROM_DEVICE_MEM_RESERVED, "Device memory reserved by the caching allocator.",
             torch.cuda.memory_reserved()),
            (names.PROM_DEVICE_MEM_PEAK, "Peak device memory held by tensors.", torch.cuda.max_memory_allocated())]


class PrometheusExporter:
    """One rank's ``/metrics`` endpoint. ``update(record)`` on every log step; ``close()`` at the end. Raises
    OSError when ``host:port`` cannot be served (``from_config`` decides what that means for the run)."""

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
        #: Ranks of the job without an exporter (set by from_config once every rank has tried to start one).
        self.exporter_failures = 0
        #: GB/s of the preflight's timed all-reduce (set by build(); None: not measured).
        self.allreduce_bus_bandwidth: float | None = None
        self.registry = CollectorRegistry(auto_describe=True)
        self.step_time = Histogram(names.PROM_STEP_TIME, "Wall time of logged training steps on this rank.",
                                   list(names.PROM_LABELS), buckets=STEP_TIME_BUCKETS,
                                   registry=self.registry).labels(*self.label_values)
        self.registry.register(_RecordCollector(self))
        self._lock = threading.Lock()
        # An OSError (port in use, address not on this host) goes to the caller: from_config trains on without it.
        self.server, self.thread = start_http_server(port, addr=host, registry=self.registry)
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
    """The exporter for this rank when ``metrics.prometheus.enabled``, else None. Collective when enabled (every
    rank calls it: build()).

    An exporter that cannot start (its port is taken, e.g. by another job on the node, or the host is not an
    address of this machine) is no reason to lose the run: that rank warns once and trains without one (None).
    One all-reduce at startup counts such ranks over the job; every rank that does serve exports the total as
    ``pretrain_prometheus_exporter_failures_total``, so a dashboard or alert sees the gap, and rank 0 logs it.
    """
    m = cfg.metrics
    if not m.prometheus.enabled:
        return None
    host, port = m.prometheus.host, m.prometheus.port + local_rank
    try:
        exporter = PrometheusExporter(host=host, port=port, run=cfg.run.name, rank=rank, model=cfg.model.family,
                                      config_yaml=config_yaml, layout=layout, tokens_per_sample=tokens_per_sample,
                                      peak=peak_flops(m.peak_tflops, device_name), target_steps=cfg.train.steps)
    except OSError as e:
        logger.warning("rank %d: metrics.prometheus: cannot serve /metrics on %s:%d (%s); this rank trains without "
                       "a Prometheus exporter (ranks serve on metrics.prometheus.port + LOCAL_RANK)", rank, host, port,
                       e.strerror or e)
        exporter = None
    failures = _job_total(exporter is None)
    if exporter is not None:
        exporter.exporter_failures = failures
    if rank == 0 and failures:
        logger.warning("metrics.prometheus: %d rank(s) of the job serve no /metrics (counted in %s on the others)",
                       failures, names.PROM_EXPORTER_FAILURES)
    return exporter


def _job_total(failed: bool) -> int:
    """How many ranks of the job failed (one all-reduce; just this rank without a process group)."""
    import torch
    import torch.distributed as dist

    if not dist.is_initialized():
        return int(failed)
    # NCCL reduces only CUDA tensors (build() has set this rank's device); gloo and mixed backends take CPU ones.
    device = torch.device("cuda", torch.cuda.current_device()) if dist.get_backend() == "nccl" else "cpu"
    count = torch.tensor([int(failed)], dtype=torch.int64, device=device)
    dist.all_reduce(count)
    return int(count.item())
