"""The Prometheus exporter over real HTTP: names, labels, values from the record, MFU, restarts, errors."""

from __future__ import annotations

import logging
import socket
import time
import urllib.request

import pytest
from prometheus_client.parser import text_string_to_metric_families

from pretrain.errors import ConfigError
from pretrain.config import MetricsConfig, load
from pretrain.metrics import MetricsLogger, names
from pretrain.metrics.prometheus import PrometheusExporter, from_config, peak_flops, restart_count
from tests.conftest import TINY_CONFIG

RECORD = {names.STEP: 20, names.LOSS: 4.25, names.LR: 2e-3, names.GRAD_NORM: 0.75, names.TOKENS_PER_S: 2560.0,
          names.STEP_TIME_S: 0.8, names.TOKENS_TOTAL: 40960, names.TFLOPS: 0.02, names.SKIPPED_SHARDS: 1,
          names.SKIPPED_STEPS: 2, names.LOSS_SPIKES: 1, names.DATA_WAIT_S: 0.05, names.FORWARD_BACKWARD_S: 0.6,
          names.OPTIMIZER_S: 0.15, names.CHECKPOINT_SAVE_S: 1.5, names.LAST_CHECKPOINT_STEP: 20,
          names.LAST_CHECKPOINT_TIME: 1.7e9}
LABELS = {"run": "unit", "rank": "3", "node": "node7", "model": "gpt"}


def make_exporter(**overrides) -> PrometheusExporter:
    args = dict(host="127.0.0.1", port=0, run="unit", rank=3, model="gpt", config_yaml="run: {}\n",
                layout={"tensor": 2, "data": 4}, tokens_per_sample=128, peak=None, target_steps=100, node="node7")
    return PrometheusExporter(**{**args, **overrides})


def scrape(exporter: PrometheusExporter) -> dict[str, tuple[dict, float]]:
    """GET /metrics → {sample name: (labels, value)} (histogram buckets keyed by name + le)."""
    host, port = exporter.address
    text = urllib.request.urlopen(f"http://{host}:{port}/metrics", timeout=5).read().decode()
    samples = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            key = sample.name + (f"@{sample.labels['le']}" if "le" in sample.labels else "")
            samples[key] = (sample.labels, sample.value)
    return samples


def test_exporter_serves_the_record_with_run_labels_and_no_step_label():
    exporter = make_exporter()
    try:
        assert names.PROM_LOSS not in scrape(exporter)  # nothing logged yet: no made-up values
        exporter.update(RECORD)
        samples = scrape(exporter)
    finally:
        exporter.close()
    expected = {names.PROM_STEP: 20, names.PROM_LOSS: 4.25, names.PROM_LR: 2e-3, names.PROM_GRAD_NORM: 0.75,
                names.PROM_TOKENS_PER_S: 2560.0, names.PROM_SAMPLES_PER_S: 20.0, names.PROM_FLOPS: 0.02e12,
                names.PROM_LAST_STEP_TIME: 0.8, names.PROM_DATA_WAIT: 0.05, names.PROM_FORWARD_BACKWARD: 0.6,
                names.PROM_OPTIMIZER: 0.15, names.PROM_TOKENS_TOTAL: 40960, names.PROM_SKIPPED_STEPS: 2,
                names.PROM_LOSS_SPIKES: 1, names.PROM_SKIPPED_SHARDS: 1, names.PROM_CHECKPOINT_SAVE: 1.5,
                names.PROM_LAST_CHECKPOINT_STEP: 20, names.PROM_LAST_CHECKPOINT_TIME: 1.7e9,
                names.PROM_TARGET_STEPS: 100, names.PROM_RESTARTS: 0,
                f"{names.PROM_STEP_TIME}_count": 1, f"{names.PROM_STEP_TIME}_sum": 0.8,
                f"{names.PROM_STEP_TIME}_bucket@0.5": 0, f"{names.PROM_STEP_TIME}_bucket@1.0": 1}
    for name, value in expected.items():
        assert samples[name][1] == pytest.approx(value, rel=1e-12), name
    assert samples[names.PROM_HOST_RSS][1] > 1e6  # a Python process with torch imported
    assert time_close(samples[names.PROM_LAST_STEP_TIMESTAMP][1])
    assert names.PROM_MFU not in samples  # no peak known (CPU, nothing configured)
    info_labels = samples[names.PROM_BUILD_INFO][0]
    assert info_labels["layout_tensor"] == "2" and info_labels["layout_data"] == "4"
    assert len(info_labels["config_hash"]) == 16 and info_labels["version"]
    for name, (labels, _) in samples.items():
        assert {k: labels[k] for k in LABELS} == LABELS, name
        assert "step" not in labels, name
    assert all(name.startswith(names.PROM_PREFIX) for name in samples)


def time_close(timestamp: float) -> bool:
    return abs(time.time() - timestamp) < 60


def test_values_persist_between_updates_and_mfu_uses_the_peak():
    exporter = make_exporter(peak=100e12)
    try:
        exporter.update({**RECORD, names.VAL_LOSS: 4.5})
        exporter.update({k: v for k, v in RECORD.items() if k != names.LAST_CHECKPOINT_STEP} | {names.STEP: 21})
        samples = scrape(exporter)
    finally:
        exporter.close()
    assert samples[names.PROM_STEP][1] == 21
    assert samples[names.PROM_VAL_LOSS][1] == 4.5  # evaluations are rarer than log steps
    assert samples[names.PROM_LAST_CHECKPOINT_STEP][1] == 20
    assert samples[names.PROM_MFU][1] == pytest.approx(0.02e12 / 100e12)
    assert samples[f"{names.PROM_STEP_TIME}_count"][1] == 2


def test_non_writer_rank_feeds_its_exporter_but_writes_no_jsonl(tmp_path):
    exporter = make_exporter()
    logger = MetricsLogger(tmp_path, MetricsConfig(console=False), is_writer=False, exporter=exporter)
    try:
        logger.log(RECORD)
        assert scrape(exporter)[names.PROM_LOSS][1] == 4.25
    finally:
        logger.close()
    assert not (tmp_path / "metrics.jsonl").exists()
    with pytest.raises(OSError):  # close() stopped the server
        urllib.request.urlopen(f"http://127.0.0.1:{exporter.address[1]}/metrics", timeout=2)


def test_port_in_use_warns_once_and_the_rank_trains_without_exporter(caplog):
    """A taken port (another job's exporter on the node) costs this rank its /metrics, not the run."""
    cfg = load(TINY_CONFIG, ["--metrics.prometheus.enabled=true"])
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        with pytest.raises(OSError):  # the exporter itself refuses; from_config decides what that means
            make_exporter(port=port)
        cfg.metrics.prometheus.port = port - 2  # local rank 2 serves on port + 2
        with caplog.at_level(logging.WARNING, logger="pretrain.metrics.prometheus"):
            exporter = from_config(cfg, local_rank=2, rank=5, layout={}, config_yaml="", tokens_per_sample=128,
                                   device_name=None)
    assert exporter is None
    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warnings) == 1 and "\n" not in warnings[0], warnings
    assert warnings[0].startswith(f"rank 5: metrics.prometheus: cannot serve /metrics on 127.0.0.1:{port} (")
    assert "trains without a Prometheus exporter" in warnings[0]


def test_exporter_failures_counter_starts_at_zero():
    exporter = make_exporter()
    try:
        assert scrape(exporter)[names.PROM_EXPORTER_FAILURES][1] == 0
    finally:
        exporter.close()


def test_peak_flops_table_override_and_cpu():
    assert peak_flops(0.0, None) is None  # CPU: no MFU unless configured
    assert peak_flops(0.0, "NVIDIA H100 80GB HBM3") == 989e12
    assert peak_flops(0.0, "NVIDIA H100 PCIe") == 756e12
    assert peak_flops(0.0, "NVIDIA A100-SXM4-80GB") == 312e12
    assert peak_flops(0.0, "Some Future GPU") is None
    assert peak_flops(123.0, "NVIDIA H100 80GB HBM3") == 123e12


def test_restart_count_from_launcher_env(monkeypatch):
    for var in ("SLURM_RESTART_COUNT", "TORCHELASTIC_RESTART_COUNT"):
        monkeypatch.delenv(var, raising=False)
    assert restart_count() == 0
    monkeypatch.setenv("TORCHELASTIC_RESTART_COUNT", "2")
    assert restart_count() == 2
    monkeypatch.setenv("SLURM_RESTART_COUNT", "5")
    assert restart_count() == 5
    exporter = make_exporter()
    try:
        assert scrape(exporter)[names.PROM_RESTARTS][1] == 5
    finally:
        exporter.close()


@pytest.mark.parametrize("override, message", [
    ("--metrics.prometheus.port=0", r"^metrics\.prometheus\.port: must be in \[1, 65535\], got 0$"),
    ("--metrics.prometheus.host=", r"^metrics\.prometheus\.host: must not be empty$"),
    ("--metrics.peak_tflops=-1", r"^metrics\.peak_tflops: must be a finite number >= 0"),
])
def test_bad_prometheus_config_is_refused(override, message):
    with pytest.raises(ConfigError, match=message):
        load(TINY_CONFIG, [override])


def test_data_read_bytes_is_served_as_a_job_wide_counter():
    exporter = make_exporter()
    try:
        exporter.update({**RECORD, names.DATA_READ_BYTES: 123_456_789})
        samples = scrape(exporter)
    finally:
        exporter.close()
    assert samples[names.PROM_DATA_READ_BYTES][1] == 123_456_789


def test_preflight_bus_bandwidth_is_served_in_bytes_per_second_once_measured():
    exporter = make_exporter()
    try:
        assert names.PROM_ALLREDUCE_BUS_BANDWIDTH not in scrape(exporter)  # one rank: nothing measured
        exporter.allreduce_bus_bandwidth = 12.5  # GB/s, as build() sets it from the preflight
        labels, value = scrape(exporter)[names.PROM_ALLREDUCE_BUS_BANDWIDTH]
    finally:
        exporter.close()
    assert value == 12.5e9 and labels == LABELS
