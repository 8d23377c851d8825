"""Benchmark (not a test): how long training blocks per checkpoint save, synchronous vs asynchronous.

    python bench/checkpoint.py [--layers 8] [--hidden 512] [--steps 16] [--every 4] [--nproc 1]

Trains the same GPT (bundled corpus, built once under --dir) twice, side by side in one run: with
checkpoint.async false and true, saving every --every steps. Reads back from each run's metrics.jsonl and output:

* blocking: seconds the training loop spent in the save call (metric checkpoint_blocking_s): the whole write when
  synchronous; the host copy of the state (and DeepSpeed's bookkeeping) when asynchronous;
* write: seconds rank 0's writer took for its files (torch.save + sha256), and the resulting MB/s;
* step time of the steps right after a save vs the median step (async writes compete for the same cores here);
* the wall time of the whole run.
"""

from __future__ import annotations

import argparse
import json
import os
import pathlib
import re
import statistics
import subprocess
import sys
import time

REPO = pathlib.Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "bench"))
from bundled_data import build_data  # noqa: E402

_COMMITTED = re.compile(r"^checkpoint step_\d+ committed: ([\d.]+) MB; rank 0 wrote its share in ([\d.]+) s",
                        re.M)


def run(mode: str, args, data: dict, out: pathlib.Path) -> dict:
    run_dir = out / f"run-{mode}"
    subprocess.run(["rm", "-rf", str(run_dir)], check=True)
    launcher = ([sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={args.nproc}"]
                if args.nproc > 1 else [sys.executable])
    cmd = [*launcher, "-m", "pretrain", "train", str(REPO / "configs/debug/gpt_tiny.yaml"),
           f"--run.dir={run_dir}", f"--data.train={data['train']}", "--data.valid=",
           f"--data.tokenizer={data['tokenizer']}", f"--model.num_layers={args.layers}",
           f"--model.hidden_size={args.hidden}", "--model.num_attention_heads=8", "--model.seq_length=256",
           f"--train.steps={args.steps}", "--train.log_every=1", "--train.micro_batch_size=4",
           f"--checkpoint.every_steps={args.every}", "--checkpoint.keep_last=1",
           f"--checkpoint.async={'true' if mode == 'async' else 'false'}"]
    start = time.perf_counter()
    result = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, env={**os.environ, "PYTHONPATH": str(REPO)})
    wall = time.perf_counter() - start
    if result.returncode != 0:
        sys.exit(f"{mode} run failed:\n{result.stdout[-2000:]}\n{result.stderr[-2000:]}")
    records = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    saves = [r for r in records if "checkpoint_blocking_s" in r]
    after_save = [r["step_time_s"] for r in records if r["step"] - 1 in {s["step"] for s in saves}]
    commits = [(float(mb), float(s)) for mb, s in _COMMITTED.findall(result.stdout)]
    return {
        "blocking_s": statistics.median(r["checkpoint_blocking_s"] for r in saves),
        "write_s": statistics.median(s for _, s in commits),
        "mb": commits[0][0],
        "step_s": statistics.median(r["step_time_s"] for r in records[1:]),
        "step_after_save_s": statistics.median(after_save) if after_save else float("nan"),
        "wall_s": wall,
        "saves": len(saves),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--layers", type=int, default=8)
    parser.add_argument("--hidden", type=int, default=512)
    parser.add_argument("--steps", type=int, default=16)
    parser.add_argument("--every", type=int, default=4)
    parser.add_argument("--nproc", type=int, default=1)
    parser.add_argument("--dir", default="/tmp/pretrain-bench-checkpoint")
    args = parser.parse_args()
    out = pathlib.Path(args.dir)
    out.mkdir(parents=True, exist_ok=True)
    data = build_data(out, vocab_size=8192, seq_length=256)
    results = {mode: run(mode, args, data, out) for mode in ("sync", "async")}
    sync = results["sync"]
    print(f"GPT {args.layers} layers x d{args.hidden}, {args.nproc} process(es); checkpoint {sync['mb']:.0f} MB "
          f"(model + AdamW state), {sync['saves']} saves per run")
    print("| mode | blocking per save (s) | write (s) | MB/s | median step (s) | step after a save (s) | "
          "run wall (s) |\n|---|---:|---:|---:|---:|---:|---:|")
    for mode, r in results.items():
        print(f"| {mode} | {r['blocking_s']:.3f} | {r['write_s']:.3f} | {r['mb'] / r['write_s']:.0f} | "
              f"{r['step_s']:.3f} | {r['step_after_save_s']:.3f} | {r['wall_s']:.1f} |")
    print(f"async blocks {sync['blocking_s'] / results['async']['blocking_s']:.1f}x less per save")


if __name__ == "__main__":
    main()
