"""Benchmark (not a test): what goodput accounting and each metrics sink cost per logged step, in this process.

    python bench/metrics_sinks.py [--records 300] [--step-s 0.212]

Each part gets the same realistic record (the keys a gpt_tiny log step carries, goodput totals included) --records
times in a fresh run directory, after a few warm-up calls; reported: median and mean microseconds per logged step,
and the mean as a share of a --step-s step (the demo's gpt_tiny step on CPU-2, BENCHMARKS.md) when every step is
logged (train.log_every=1, the worst case) and at the demo's log_every=10.

* goodput: the ledger's ``step_done`` + ``update`` (commit bookkeeping, one appended JSON line, the run totals);
* console: the plain line (stdout not a terminal) written to a file;
* jsonl: MetricsLogger's metrics.jsonl line (for scale: what every run already pays);
* tensorboard: ``TensorBoardSink.log`` (add_scalar per number, flush);
* wandb: ``WandbSink.log`` in offline mode (the record is handed to W&B's service process).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import tempfile
import time
from pathlib import Path

from pretrain.config import MetricsConfig
from pretrain.config.sections import WandbConfig
from pretrain.metrics import goodput, names, sinks
from pretrain.metrics.console import Console


def record(step: int) -> dict:
    return {names.STEP: step, names.LOSS: 4.8123, names.LR: 2.1e-3, names.GRAD_NORM: 0.91,
            names.TOKENS_PER_S: 9650.0, names.STEP_TIME_S: 0.212, names.DATA_WAIT_S: 0.002,
            names.FORWARD_BACKWARD_S: 0.15, names.OPTIMIZER_S: 0.06, names.TOKENS_TOTAL: 2048 * step,
            names.TFLOPS: 0.05, names.SKIPPED_SHARDS: 0, names.SKIPPED_STEPS: 0, names.LOSS_SPIKES: 0,
            names.GOODPUT_S: {k: 1.0 * step for k in goodput.KINDS}, names.GOODPUT_UNCOMMITTED_S: 0.5}


def timed(fn, n: int, warmup: int = 5) -> list[float]:
    for i in range(warmup):
        fn(i + 1)
    out = []
    for i in range(n):
        start = time.perf_counter()
        fn(warmup + i + 1)
        out.append(time.perf_counter() - start)
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--records", type=int, default=300)
    parser.add_argument("--step-s", type=float, default=0.212)
    args = parser.parse_args()
    root = Path(tempfile.mkdtemp(prefix="bench-sinks-"))
    results = {}

    ledger = goodput.GoodputLedger(root / goodput.FILE_NAME)
    ledger.resumed(0)

    def account(step: int) -> None:
        ledger.step_done(step, 0.2, 0.002, applied=True)
        ledger.update(record(step), {names.LAST_CHECKPOINT_STEP: step - step % 50} if step >= 50 else {})

    results["goodput"] = timed(account, args.records)
    ledger.close()

    with open(root / "console.txt", "w") as stream:
        console = Console(100_000, stream=stream)
        results["console"] = timed(lambda s: console.log(record(s)), args.records)

    with open(root / "metrics.jsonl", "w") as jsonl:
        def write(step: int) -> None:
            jsonl.write(json.dumps(record(step)) + "\n")
            jsonl.flush()

        results["jsonl"] = timed(write, args.records)

    tensorboard = sinks.TensorBoardSink(root)
    results["tensorboard"] = timed(lambda s: tensorboard.log(record(s)), args.records)
    tensorboard.close()

    os.environ.setdefault("WANDB_SILENT", "true")
    wandb = sinks.WandbSink(root, WandbConfig(enabled=True, mode="offline"))
    results["wandb"] = timed(lambda s: wandb.log(record(s)), args.records)
    wandb.close()

    baseline = timed(record, args.records)  # building the record dict itself, subtracted from every part
    base = statistics.mean(baseline)
    print(f"{'part':<12} {'median µs':>10} {'mean µs':>9} {'% of step (log_every=1)':>24} {'(log_every=10)':>15}")
    for name, times in results.items():
        mean = statistics.mean(times) - base
        print(f"{name:<12} {1e6 * (statistics.median(times) - base):>10.0f} {1e6 * mean:>9.0f} "
              f"{100 * mean / args.step_s:>23.3f}% {100 * mean / args.step_s / 10:>14.4f}%")
    print(f"(record construction, subtracted: {1e6 * base:.1f} µs; run directory {root})")


if __name__ == "__main__":
    main()
