"""Builds monitoring/grafana/pretrain.json, the Grafana dashboard for pretrain runs (run it after editing).

    python monitoring/grafana/build_dashboard.py

Panels read only series the exporter serves (pretrain.metrics.names PROM_*) or the recording rules in
monitoring/prometheus/pretrain.rules.yml; every query is filtered by the ``$run`` variable.
tests/unit/test_metrics_monitoring.py checks that the JSON file is this script's output and validates it against
the vendored Grafana dashboard schema.
"""

from __future__ import annotations

import json
import pathlib

OUT = pathlib.Path(__file__).with_name("pretrain.json")
DATASOURCE = {"type": "prometheus", "uid": "${datasource}"}
RUN = '{run=~"$run"}'


def thresholds(orange: float, red: float) -> dict:
    """Green below ``orange`` seconds, then orange, red from ``red`` (Grafana reads the first step as the base)."""
    return {"thresholds": {"mode": "absolute", "steps": [{"value": 0, "color": "green"},
                                                         {"value": orange, "color": "orange"},
                                                         {"value": red, "color": "red"}]}}


class Layout:
    """Appends panels left to right in rows of the 24-column grid."""

    def __init__(self):
        self.panels: list[dict] = []
        self.y = 0  # top of the current row's panels
        self.height = 0  # height of the current row's panels

    def row(self, title: str, height: int) -> None:
        """A row header; the panels after it go at the next ``height`` grid units."""
        self.y += self.height
        self.panels.append({"type": "row", "title": title, "id": len(self.panels) + 1, "collapsed": False,
                            "panels": [], "gridPos": {"h": 1, "w": 24, "x": 0, "y": self.y}})
        self.y += 1
        self.height = height

    def panel(self, title: str, description: str, queries: list[tuple[str, str]], unit: str, x: int, w: int,
              kind: str = "timeseries", defaults: dict | None = None) -> None:
        """A panel of ``kind`` at column ``x`` with (PromQL, legend) ``queries``."""
        self.panels.append({
            "type": kind, "title": title, "description": description, "id": len(self.panels) + 1,
            "datasource": DATASOURCE, "gridPos": {"h": self.height, "w": w, "x": x, "y": self.y},
            "targets": [{"datasource": DATASOURCE, "refId": chr(ord("A") + i), "expr": expr, "legendFormat": legend}
                        for i, (expr, legend) in enumerate(queries)],
            "fieldConfig": {"defaults": {"unit": unit, **(defaults or {})}, "overrides": []}, "options": {}})


def dashboard() -> dict:
    """The dashboard as a dict (Grafana dashboard JSON model, schemaVersion 39)."""
    d = Layout()
    d.row("Overview", 4)
    d.panel("Step", "Last logged optimizer step.", [(f"max by (run) (pretrain_step{RUN})", "{{run}}")],
            "none", 0, 4, "stat")
    d.panel("Target steps", "train.steps.", [(f"max by (run) (pretrain_target_steps{RUN})", "{{run}}")],
            "none", 4, 4, "stat")
    d.panel("Since last step", "Seconds since the last logged step on the slowest rank (liveness).",
            [(f"time() - min by (run) (pretrain_last_step_timestamp_seconds{RUN})", "{{run}}")], "s", 8, 4,
            "stat", thresholds(300, 600))
    d.panel("Checkpoint age", "Seconds since the last committed checkpoint.",
            [(f"time() - max by (run) (pretrain_last_checkpoint_timestamp_seconds{RUN})", "{{run}}")], "s", 12, 4,
            "stat", thresholds(3600, 7200))
    d.panel("Skipped steps", "Updates skipped (NaN/Inf or loss spike) over the run.",
            [(f"max by (run) (pretrain_skipped_steps_total{RUN})", "{{run}}")], "none", 16, 4, "stat")
    d.panel("Restarts", "Restarts by the launcher (SLURM_RESTART_COUNT / TORCHELASTIC_RESTART_COUNT).",
            [(f"max by (run) (pretrain_restarts_total{RUN})", "{{run}}")], "none", 20, 4, "stat")

    d.row("Training", 8)
    d.panel("Loss", "Training loss (data-parallel mean) and validation loss.",
            [(f"max by (run) (pretrain_loss{RUN})", "train {{run}}"),
             (f"max by (run) (pretrain_validation_loss{RUN})", "valid {{run}}")], "none", 0, 8)
    d.panel("Learning rate", "Learning rate of the logged steps.",
            [(f"max by (run) (pretrain_learning_rate{RUN})", "{{run}}")], "none", 8, 8)
    d.panel("Gradient norm", "Gradient norm before clipping.",
            [(f"max by (run) (pretrain_grad_norm{RUN})", "{{run}}")], "none", 16, 8)

    d.row("Throughput", 8)
    d.panel("Tokens/s", "Job tokens per second (5-minute average over ranks) and samples per second.",
            [(f"run:pretrain_tokens_per_second:avg5m{RUN}", "tokens/s {{run}}"),
             (f"avg by (run) (pretrain_samples_per_second{RUN})", "samples/s {{run}}")], "none", 0, 8)
    d.panel("MFU", "Model FLOP utilisation per rank (absent on CPU unless metrics.peak_tflops is set).",
            [(f"pretrain_mfu_ratio{RUN}", "rank {{rank}}")], "percentunit", 8, 8)
    d.panel("TFLOP/s per device", "Model FLOP/s per device.",
            [(f"pretrain_model_flops_per_second{RUN}", "rank {{rank}}")], "flops", 16, 8)

    d.row("Stragglers and step time", 8)
    d.panel("Step time per rank", "Mean logged step time per rank (5 min): a line above the others is a straggler.",
            [(f"run_rank:pretrain_step_time_seconds:mean5m{RUN}", "rank {{rank}}")], "s", 0, 8)
    d.panel("Slowest / median rank", "Slowest rank's mean step time over the median rank's; 1.0 is balanced.",
            [(f"run:pretrain_step_time_seconds:slowest_ratio{RUN}", "{{run}}")], "none", 8, 8)
    d.panel("Step time split", "Data wait, forward/backward and optimizer seconds of the last logged step.",
            [(f"pretrain_data_wait_seconds{RUN}", "data wait rank {{rank}}"),
             (f"pretrain_forward_backward_seconds{RUN}", "fwd/bwd rank {{rank}}"),
             (f"pretrain_optimizer_seconds{RUN}", "optimizer rank {{rank}}")], "s", 16, 8)

    d.row("Data, memory, checkpoints", 8)
    d.panel("Data wait share", "Share of each step spent waiting for batches, per rank (10 min).",
            [(f"run_rank:pretrain_data_wait_ratio:avg10m{RUN}", "rank {{rank}}")], "percentunit", 0, 6)
    d.panel("Memory", "Device memory allocated/reserved/peak per rank (GPU) and host RSS.",
            [(f"pretrain_device_memory_allocated_bytes{RUN}", "allocated rank {{rank}}"),
             (f"pretrain_device_memory_reserved_bytes{RUN}", "reserved rank {{rank}}"),
             (f"pretrain_device_memory_peak_bytes{RUN}", "peak rank {{rank}}"),
             (f"pretrain_host_memory_rss_bytes{RUN}", "host RSS rank {{rank}}")], "bytes", 6, 6)
    d.panel("Checkpoint save", "Seconds from save start to commit, and seconds the save blocked training.",
            [(f"max by (run) (pretrain_checkpoint_save_seconds{RUN})", "save {{run}}"),
             (f"max by (run) (pretrain_checkpoint_blocking_seconds{RUN})", "blocking {{run}}")], "s", 12, 6)
    d.panel("Skipped steps and shards", "Skipped updates, loss spikes and skipped data shards over the run.",
            [(f"max by (run) (pretrain_skipped_steps_total{RUN})", "skipped steps"),
             (f"max by (run) (pretrain_loss_spikes_total{RUN})", "loss spikes"),
             (f"max by (run) (pretrain_skipped_shards_total{RUN})", "skipped shards")], "none", 18, 6)

    d.row("Goodput", 8)
    d.panel("Goodput", "Share of the run's wall time (all attempts) spent on steps that a committed checkpoint "
            "holds (pretrain.metrics.goodput); exported by rank 0.",
            [(f'sum by (run) (pretrain_goodput_seconds_total{{kind="productive",run=~"$run"}}) / '
              f"sum by (run) (pretrain_goodput_seconds_total{RUN})", "{{run}}")], "percentunit", 0, 6, "stat",
            {"min": 0, "max": 1, "thresholds": {"mode": "absolute", "steps": [
                {"value": 0, "color": "red"}, {"value": 0.8, "color": "orange"}, {"value": 0.9, "color": "green"}]}})
    d.panel("Where the time went", "Seconds of wall time per 5 minutes by kind: productive steps, startup, "
            "checkpoint blocking, evaluation, data wait, steps redone after a kill, skipped steps, time between "
            "attempts; the uncommitted steps since the last checkpoint on top.",
            [(f"sum by (kind) (increase(pretrain_goodput_seconds_total{RUN}[5m]))", "{{kind}}"),
             (f"max by (run) (pretrain_goodput_uncommitted_seconds{RUN})", "uncommitted {{run}}")], "s", 6, 18,
            defaults={"custom": {"stacking": {"mode": "normal", "group": "A"}, "fillOpacity": 60, "lineWidth": 1}})

    return {
        "uid": "pretrain-training", "title": "pretrain: training run",
        "description": "Loss, throughput, MFU, per-rank step time, data wait, memory, checkpoints and skipped steps "
                       "of pretrain runs (metrics.prometheus.enabled=true).",
        "tags": ["pretrain", "training"], "timezone": "utc", "editable": True, "graphTooltip": 1,
        "time": {"from": "now-6h", "to": "now"}, "refresh": "30s", "schemaVersion": 39, "version": 1,
        "templating": {"list": [
            {"type": "datasource", "name": "datasource", "label": "Prometheus", "query": "prometheus"},
            {"type": "query", "name": "run", "label": "Run", "datasource": DATASOURCE,
             "query": "label_values(pretrain_step, run)", "refresh": 2, "multi": True, "sort": 1},
        ]},
        "annotations": {"list": []},
        "panels": d.panels,
    }


def render() -> str:
    """The file's text: 2-space indented JSON with a final newline."""
    return json.dumps(dashboard(), indent=2) + "\n"


if __name__ == "__main__":
    OUT.write_text(render())
    print(f"wrote {OUT}")
