"""A real Prometheus server scrapes a real 2-rank training run (torchrun, gpt_tiny, metrics.prometheus.enabled=true).

The server (Debian package `prometheus`, installed by scripts/prometheus_server.sh when missing) runs on 127.0.0.1
with a 1 s scrape and rule interval, started and stopped by PID. Rank 1 hangs inside step HANG_STEP; the hang
watchdog (ft.step_timeout_s) then ends the job. Checked through the server's HTTP API: loss, step, tokens/s and
per-rank step time of both ranks equal what rank 0 wrote to metrics.jsonl for the last step before the hang, no
series carries a step label, and a copy of monitoring/prometheus/pretrain.rules.yml with a 5 s threshold and a 1 s
`for:` has PretrainTrainingStalled firing for both ranks after the run stopped.
"""

from __future__ import annotations

import json
import subprocess
import time
import urllib.parse
import urllib.request
from pathlib import Path

import pytest
import yaml

from pretrain.fault_tolerance import HANG_EXIT_CODE
from pretrain.metrics import names
from pretrain.parallel.env import free_port
from tests.conftest import REPO, TINY_CONFIG, data_overrides, read_metrics, run_cli

pytestmark = [pytest.mark.prometheus, pytest.mark.slow]

SERVER_SCRIPT = REPO / "scripts" / "prometheus_server.sh"
RULES = REPO / "monitoring" / "prometheus" / "pretrain.rules.yml"
HANG_STEP, CHECKPOINT_EVERY = 8, 4
LAST_LOGGED = HANG_STEP - 1


def fast_stall_rules(out: Path) -> Path:
    """The shipped rules with PretrainTrainingStalled at 5 s without a step and `for: 1s` (test copy)."""
    rules = yaml.safe_load(RULES.read_text())
    [stalled] = [r for g in rules["groups"] for r in g["rules"] if r.get("alert") == "PretrainTrainingStalled"]
    assert stalled["expr"].count("> 600)") == 1, stalled["expr"]
    stalled["expr"] = stalled["expr"].replace("> 600)", "> 5)")
    stalled["for"] = "1s"
    out.write_text(yaml.safe_dump(rules, sort_keys=False))
    return out


class Prometheus:
    """The HTTP API of a server started by scripts/prometheus_server.sh."""

    def __init__(self, url: str):
        self.url = url

    def get(self, path: str, **params) -> dict:
        query = f"?{urllib.parse.urlencode(params)}" if params else ""
        with urllib.request.urlopen(f"{self.url}{path}{query}", timeout=10) as response:
            body = json.load(response)
        assert body["status"] == "success", body
        return body["data"]

    def query(self, promql: str) -> dict[str, float]:
        """Instant query → {rank label: value}."""
        return {r["metric"].get("rank", ""): float(r["value"][1])
                for r in self.get("/api/v1/query", query=promql)["result"]}


@pytest.fixture
def prometheus(tmp_path):
    """A Prometheus server scraping ranks 0 and 1 of a run that serves from the returned base port."""
    port = free_port(count=2)
    server_dir = tmp_path / "prometheus"
    server_dir.mkdir()
    rules = fast_stall_rules(server_dir / "rules.yml")
    config = server_dir / "prometheus.yml"
    config.write_text(yaml.safe_dump({
        "global": {"scrape_interval": "1s", "evaluation_interval": "1s"},
        "rule_files": [str(rules)],
        "scrape_configs": [{"job_name": "pretrain",
                            "static_configs": [{"targets": [f"127.0.0.1:{port}", f"127.0.0.1:{port + 1}"]}]}],
    }))
    web_port = free_port(count=2)
    started = subprocess.run(["bash", str(SERVER_SCRIPT), "start", str(server_dir), str(config), str(web_port)],
                             capture_output=True, text=True, timeout=600)
    assert started.returncode == 0, started.stdout + started.stderr
    try:
        yield Prometheus(started.stdout.strip().splitlines()[-1]), port
    finally:
        subprocess.run(["bash", str(SERVER_SCRIPT), "stop", str(server_dir)], timeout=60)


def test_two_rank_run_scraped_and_stall_alert_fires(shakespeare, tmp_path, prometheus):
    server, port = prometheus
    run_dir = tmp_path / "run"
    result = run_cli("train", str(TINY_CONFIG), *data_overrides(shakespeare, run_dir), "--train.steps=30",
                     "--train.log_every=1", f"--checkpoint.every_steps={CHECKPOINT_EVERY}", "--metrics.prometheus.enabled=true",
                     f"--metrics.prometheus.port={port}", "--ft.step_timeout_s=10", "--ft.startup_timeout_s=300",
                     torchrun_nproc=2, timeout=400,
                     env={"PRETRAIN_TEST_FAULTS": f"hang_rank=1,hang_step={HANG_STEP},hang_s=120"})
    output = result.stdout[-3000:] + result.stderr[-3000:]
    assert result.returncode != 0 and str(HANG_EXIT_CODE) in output, output
    logged = read_metrics(run_dir)
    assert max(logged) == LAST_LOGGED, sorted(logged)
    last = logged[LAST_LOGGED]

    # Both ranks' exporters were scraped; the last scraped values are those of the last logged step.
    window = "[10m]"
    step = server.query(f"last_over_time({names.PROM_STEP}{window})")
    assert step == {"0": LAST_LOGGED, "1": LAST_LOGGED}, step
    loss = server.query(f"last_over_time({names.PROM_LOSS}{window})")
    assert loss == {"0": pytest.approx(last[names.LOSS], rel=1e-12), "1": pytest.approx(last[names.LOSS], rel=1e-12)}
    tokens_per_s = server.query(f"last_over_time({names.PROM_TOKENS_PER_S}{window})")
    assert set(tokens_per_s) == {"0", "1"} and all(v > 0 for v in tokens_per_s.values())
    assert tokens_per_s["0"] == pytest.approx(last[names.TOKENS_PER_S], rel=1e-12)
    step_time = server.query(f"last_over_time({names.PROM_LAST_STEP_TIME}{window})")
    assert set(step_time) == {"0", "1"} and step_time["0"] == pytest.approx(last[names.STEP_TIME_S], rel=1e-12)
    observed = server.query(f"last_over_time({names.PROM_STEP_TIME}_count{window})")
    assert observed == {"0": LAST_LOGGED, "1": LAST_LOGGED}, observed
    checkpoint = server.query(f"last_over_time({names.PROM_LAST_CHECKPOINT_STEP}{window})")
    assert checkpoint == {"0": CHECKPOINT_EVERY, "1": CHECKPOINT_EVERY}, checkpoint
    series = server.get("/api/v1/series", **{"match[]": '{__name__=~"pretrain_.+"}'})
    assert series and all({"run", "rank", "node", "model"} <= set(s) and "step" not in s for s in series)
    assert {s["run"] for s in series} == {"gpt_tiny"}

    # The run has stopped short of train.steps: the stall alert (test copy: 5 s, for 1 s) fires for both ranks.
    deadline, firing = time.time() + 60, set()
    while time.time() < deadline and firing != {"0", "1"}:
        alerts = server.get("/api/v1/alerts")["alerts"]
        firing = {a["labels"]["rank"] for a in alerts
                  if a["labels"]["alertname"] == "PretrainTrainingStalled" and a["state"] == "firing"}
        time.sleep(1)
    assert firing == {"0", "1"}, server.get("/api/v1/alerts")
