"""Benchmark (not a test): training with the Prometheus exporter off vs on, side by side.

    python bench/metrics.py [--steps 60] [--repeats 2] [--scrape-interval 1.0]

Trains configs/debug/gpt_tiny.yaml (bundled corpus, one process) with metrics.prometheus.enabled false and true,
alternating off/on --repeats times, every step logged (train.log_every=1: the exporter's worst case). While the
exporter is on, a scraper thread here GETs /metrics every --scrape-interval seconds, as Prometheus would (1 s is
the integration test's interval; production scrapes are usually 15-30 s). Reported:

* end to end: median step_time_s of each run's metrics.jsonl (steps 2..N; step 1 includes warm-up) and the
  on/off difference in % (on 2 shared cores run-to-run noise, ±10% here, dominates it, either sign);
* direct cost: the exporter's update() per logged step and one full scrape (render + HTTP, client included, so an
  upper bound of what the training process's server thread spends), measured in this process; as a share of the
  median step: (update + scrape × step / interval) / step. This is the overhead figure checked against 1%.
"""

from __future__ import annotations

import argparse
import json
import os
import pathlib
import statistics
import subprocess
import sys
import threading
import time
import urllib.request

REPO = pathlib.Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "bench"))
from bundled_data import build_data  # noqa: E402

from pretrain.parallel.env import free_port  # noqa: E402



class Scraper(threading.Thread):
    """GETs http://127.0.0.1:PORT/metrics every ``interval`` s until stopped; counts answered scrapes."""

    def __init__(self, port: int, interval: float):
        super().__init__(daemon=True)
        self.url, self.interval = f"http://127.0.0.1:{port}/metrics", interval
        self.answered, self.stopped = 0, threading.Event()

    def run(self) -> None:
        while not self.stopped.wait(self.interval):
            try:
                urllib.request.urlopen(self.url, timeout=5).read()
                self.answered += 1
            except OSError:  # not serving yet (imports, model build) or already closed
                pass


def train(exporter_on: bool, args, data: dict, out: pathlib.Path, index: int) -> dict:
    run_dir = out / f"run-{'on' if exporter_on else 'off'}-{index}"
    subprocess.run(["rm", "-rf", str(run_dir)], check=True)
    port = free_port()
    cmd = [sys.executable, "-m", "pretrain", "train", str(REPO / "configs/debug/gpt_tiny.yaml"),
           f"--run.dir={run_dir}", f"--data.train={data['train']}", "--data.valid=",
           f"--data.tokenizer={data['tokenizer']}", f"--train.steps={args.steps}", "--train.log_every=1",
           "--checkpoint.every_steps=0", "--metrics.console=false",
           f"--metrics.prometheus.enabled={'true' if exporter_on else 'false'}", f"--metrics.prometheus.port={port}"]
    scraper = Scraper(port, args.scrape_interval) if exporter_on else None
    if scraper:
        scraper.start()
    result = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True,
                            env={**os.environ, "PYTHONPATH": str(REPO)})
    if scraper:
        scraper.stopped.set()
        scraper.join()
    if result.returncode != 0:
        sys.exit(f"run failed:\n{result.stdout[-2000:]}\n{result.stderr[-2000:]}")
    records = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    return {"step_s": statistics.median(r["step_time_s"] for r in records[1:]),
            "scrapes": scraper.answered if scraper else 0}


def direct_costs(samples: int = 2000) -> tuple[float, float]:
    """Seconds per exporter.update() and per full scrape of a populated exporter, measured in this process."""
    sys.path.insert(0, str(REPO))
    from pretrain.metrics import names
    from pretrain.metrics.prometheus import PrometheusExporter

    exporter = PrometheusExporter(host="127.0.0.1", port=0, run="bench", rank=0, model="gpt",
                                  config_yaml="bench", layout={"data": 1}, tokens_per_sample=128, peak=None,
                                  target_steps=samples)
    record = {names.STEP: 1, names.LOSS: 5.0, names.LR: 1e-3, names.GRAD_NORM: 1.0, names.TOKENS_PER_S: 1e4,
              names.STEP_TIME_S: 0.2, names.TOKENS_TOTAL: 2048, names.TFLOPS: 0.1, names.SKIPPED_SHARDS: 0,
              names.SKIPPED_STEPS: 0, names.LOSS_SPIKES: 0, names.DATA_WAIT_S: 0.01,
              names.FORWARD_BACKWARD_S: 0.15, names.OPTIMIZER_S: 0.04}
    try:
        start = time.perf_counter()
        for step in range(samples):
            exporter.update({**record, names.STEP: step})
        update_s = (time.perf_counter() - start) / samples
        url = f"http://127.0.0.1:{exporter.address[1]}/metrics"
        urllib.request.urlopen(url).read()  # warm
        start = time.perf_counter()
        for _ in range(200):
            urllib.request.urlopen(url).read()
        scrape_s = (time.perf_counter() - start) / 200
    finally:
        exporter.close()
    return update_s, scrape_s


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--steps", type=int, default=60)
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--scrape-interval", type=float, default=1.0)
    parser.add_argument("--dir", default="/tmp/pretrain-bench-metrics")
    args = parser.parse_args()
    out = pathlib.Path(args.dir)
    out.mkdir(parents=True, exist_ok=True)
    data = build_data(out, vocab_size=2048, seq_length=128)
    runs = {False: [], True: []}
    for index in range(args.repeats):
        for exporter_on in (False, True):
            runs[exporter_on].append(train(exporter_on, args, data, out, index))
    update_s, scrape_s = direct_costs()
    off = statistics.median(r["step_s"] for r in runs[False])
    on = statistics.median(r["step_s"] for r in runs[True])
    print(f"gpt_tiny, 1 process, {args.steps} steps x {args.repeats} runs each, every step logged; "
          f"scrape every {args.scrape_interval:g} s")
    print("| exporter | median step (s) | runs' medians (s) | scrapes answered |\n|---|---:|---|---:|")
    for exporter_on, label in ((False, "off"), (True, "on")):
        medians = ", ".join(f"{r['step_s']:.4f}" for r in runs[exporter_on])
        print(f"| {label} | {statistics.median(r['step_s'] for r in runs[exporter_on]):.4f} | {medians} | "
              f"{sum(r['scrapes'] for r in runs[exporter_on])} |")
    print(f"end to end: on vs off {100 * (on - off) / off:+.2f}% of step time "
          "(shared cores: run-to-run noise dominates this number)")
    overhead = (update_s + scrape_s * off / args.scrape_interval) / off
    print(f"direct: update() {update_s * 1e6:.1f} us per logged step, one scrape {scrape_s * 1e3:.2f} ms; "
          f"overhead {100 * overhead:.3f}% of the {off:.3f} s step (limit 1%): "
          f"{'OK' if overhead <= 0.01 else 'OVER'}")


if __name__ == "__main__":
    main()
