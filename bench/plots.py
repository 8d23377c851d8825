"""Benchmark plots for BENCHMARKS.md (not a test): PNGs and the numbers behind them under docs/img/.

    python bench/plots.py [--run-dir RUN] [--only loss,throughput] [--out docs/img]

1. loss_curve_demo.png: training loss per logged step and validation loss (perplexity on the right axis) of
   `pretrain demo --train.eval_every=50`, run into a temporary directory (or read from --run-dir, an existing run
   directory with metrics.jsonl). 2. throughput_vs_size.png: tokens/s and model TFLOP/s against parameter count
   for a sweep of GPT sizes, one process, fp32, with bench/train_step.py's contenders (ours: the components
   `pretrain train` builds; the plain-PyTorch GPT with SDPA and with unfused attention), alternating in one process.
Each PNG's title names the machine and the command; the numbers are saved next to it as JSON.
"""

from __future__ import annotations

import argparse
import json
import os
import pathlib
import platform
import subprocess
import sys
import tempfile
import time

REPO = pathlib.Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "bench"))

DEMO_COMMAND = ["pretrain", "demo", "--train.eval_every=50"]
#: Sweep shapes: name: (layers, hidden, heads, micro batch); seq 128 and vocab 2048 (the bench data), b x s = 1024
#: tokens per step for every size. Head dim 64 but for the smallest two (64 would leave them one or two heads).
SWEEP = {
    "L2-h128": (2, 128, 2, 8),
    "L4-h192": (4, 192, 4, 8),
    "L4-h384": (4, 384, 6, 8),
    "L8-h512": (8, 512, 8, 8),
    "L8-h704": (8, 704, 11, 8),
}


def machine() -> str:
    """One line naming the machine the numbers come from."""
    import torch

    return (f"{os.cpu_count()} CPU cores ({platform.machine()}), Python {platform.python_version()}, "
            f"torch {torch.__version__}, {torch.get_num_threads()} threads")


# ----------------------------------------------------------------------------------------------------------------
# 1. Loss curve of the demo run
# ----------------------------------------------------------------------------------------------------------------


def run_demo(out_dir: pathlib.Path) -> pathlib.Path:
    """`pretrain demo --train.eval_every=50` into ``out_dir`` (the real CLI, as a user runs it); its run dir."""
    cmd = [sys.executable, "-m", "pretrain", *DEMO_COMMAND[1:2], "--dir", str(out_dir), *DEMO_COMMAND[2:]]
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")]))
    result = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True)
    if result.returncode != 0:
        raise SystemExit(f"{' '.join(cmd)} failed ({result.returncode}):\n"
                         f"{result.stdout[-2000:]}{result.stderr[-2000:]}")
    return out_dir / "run"


def read_metrics(run_dir: pathlib.Path) -> list[dict]:
    """metrics.jsonl of a run directory, one record per logged step (a step logged twice keeps the last)."""
    path = run_dir / "metrics.jsonl"
    if not path.is_file():
        raise SystemExit(f"{path}: no metrics file (is --run-dir a run directory?)")
    by_step = {r["step"]: r for r in map(json.loads, path.read_text().splitlines())}
    return [by_step[s] for s in sorted(by_step)]


def plot_loss(records: list[dict], out: pathlib.Path, title: str) -> dict:
    """loss_curve_demo.png (+ .json): training loss per logged step, validation loss where evaluated."""
    import matplotlib.pyplot as plt
    import numpy as np

    steps = [r["step"] for r in records]
    evals = [r for r in records if "val_loss" in r]
    fig, ax = plt.subplots(figsize=(7, 4.2), dpi=120)
    ax.plot(steps, [r["loss"] for r in records], label="training loss (logged steps)", color="tab:blue")
    if evals:
        ax.plot([r["step"] for r in evals], [r["val_loss"] for r in evals], "o-", color="tab:orange",
                label="validation loss (held-out plays)")
        last = evals[-1]
        ax.annotate(f"ppl {last['val_ppl']:.0f}", (last["step"], last["val_loss"]), textcoords="offset points",
                    xytext=(-10, 10), ha="right", color="tab:orange")
        # perplexity = e^loss; the clip keeps matplotlib's probing of the axis limits off log(0)
        ppl = ax.secondary_yaxis("right", functions=(np.exp, lambda v: np.log(np.clip(v, 1e-9, None))))
        ppl.set_ylabel("validation perplexity")
    ax.set(xlabel="step", ylabel="cross-entropy (nats/token)", title=title)
    ax.title.set_fontsize(9)
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(out / "loss_curve_demo.png")
    plt.close(fig)
    keys = ("step", "loss", "val_loss", "val_ppl", "tokens_per_s", "step_time_s")
    summary = {"title": title, "records": [{k: r[k] for k in keys if k in r} for r in records]}
    (out / "loss_curve_demo.json").write_text(json.dumps(summary, indent=1) + "\n")
    return summary


# ----------------------------------------------------------------------------------------------------------------
# 2. Throughput against model size
# ----------------------------------------------------------------------------------------------------------------


def sweep(rounds: int, steps: int, work: pathlib.Path) -> list[dict]:
    """bench/train_step.py's comparison for every SWEEP shape (registered in its SHAPES), plus FLOPs per token."""
    import train_step
    from bundled_data import build_data
    from megatron.core import parallel_state

    from pretrain import device as device_layer
    from pretrain.config import load
    from pretrain.models.gpt import flops_per_token
    from pretrain.parallel.env import init_distributed, shutdown

    data = build_data(work, vocab_size=2048, seq_length=128)
    device_layer.apply_cpu_shims()
    init_distributed("gloo")
    rows = []
    try:
        for name, shape in SWEEP.items():
            train_step.SHAPES[name] = shape
            start = time.perf_counter()
            row = train_step.compare(name, data, rounds, steps, work)
            layers, hidden, heads, _ = shape
            model = load(REPO / "configs/debug/gpt_tiny.yaml", [f"--model.num_layers={layers}",
                         f"--model.hidden_size={hidden}", f"--model.num_attention_heads={heads}"]).model
            row.update(name=name, flops_per_token=flops_per_token(model, 2048), seconds=time.perf_counter() - start)
            rows.append(row)
            print(f"{name}: {row['params_m']:.1f}M params, ours {row['ours_tok_s']:,.0f} tokens/s, plain "
                  f"{row['plain_tok_s']:,.0f} ({row['seconds']:.0f} s)", flush=True)
            parallel_state.destroy_model_parallel()
    finally:
        shutdown()
    return rows


def plot_throughput(rows: list[dict], out: pathlib.Path, title: str) -> dict:
    """throughput_vs_size.png (+ .json): tokens/s (left) and model TFLOP/s (right) against parameters."""
    import matplotlib.pyplot as plt

    params = [r["params_m"] for r in rows]
    fig, (tok, tfl) = plt.subplots(1, 2, figsize=(10, 4.2), dpi=120)
    contenders = (("ours", "ours (megatron-core + DeepSpeed + Trainer)", "o-"),
                  ("plain", "plain PyTorch, SDPA attention", "s--"),
                  ("plain_unfused", "plain PyTorch, unfused attention", "^:"))
    for key, label, style in contenders:
        if any(f"{key}_tok_s" not in r for r in rows):
            continue  # train_step.py leaves the unfused baseline out on CUDA
        tok.plot(params, [r[f"{key}_tok_s"] for r in rows], style, label=label)
        tfl.plot(params, [r[f"{key}_tok_s"] * r["flops_per_token"] / 1e12 for r in rows], style, label=label)
    tok.set(xscale="log", yscale="log", xlabel="parameters (M)", ylabel="tokens/s")
    tfl.set(xscale="log", xlabel="parameters (M)", ylabel="model TFLOP/s (6N + attention, per token)")
    tfl.set_ylim(bottom=0)
    for ax in (tok, tfl):
        ax.grid(alpha=0.3, which="both")
    tok.legend(fontsize=8)
    fig.suptitle(title, fontsize=9)
    fig.tight_layout()
    fig.savefig(out / "throughput_vs_size.png")
    plt.close(fig)
    tflops = [{f"{key}_tflops": r[f"{key}_tok_s"] * r["flops_per_token"] / 1e12 for key, _, _ in contenders
               if f"{key}_tok_s" in r} for r in rows]
    summary = {"title": title, "rows": [{**r, **t} for r, t in zip(rows, tflops)]}
    (out / "throughput_vs_size.json").write_text(json.dumps(summary, indent=1) + "\n")
    return summary


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--run-dir", default=None, help="plot this run's metrics.jsonl instead of running the demo")
    parser.add_argument("--only", default="loss,throughput", help="which plots: loss, throughput or both")
    parser.add_argument("--out", default=str(REPO / "docs" / "img"))
    parser.add_argument("--rounds", type=int, default=4, help="alternating rounds per contender (throughput)")
    parser.add_argument("--steps", type=int, default=2, help="timed steps per round (throughput)")
    parser.add_argument("--dir", default="/tmp/pretrain-bench-plots", help="work directory (bench data, runs)")
    args = parser.parse_args()
    import matplotlib

    matplotlib.use("Agg")
    out, work = pathlib.Path(args.out), pathlib.Path(args.dir)
    out.mkdir(parents=True, exist_ok=True)
    work.mkdir(parents=True, exist_ok=True)
    only = set(args.only.split(","))
    started = time.perf_counter()
    if "loss" in only:
        if args.run_dir:
            records, command = read_metrics(pathlib.Path(args.run_dir)), f"metrics of {args.run_dir}"
        else:
            with tempfile.TemporaryDirectory(dir=work, prefix="demo-") as demo_dir:  # a fresh run, not a resume
                records, command = read_metrics(run_demo(pathlib.Path(demo_dir))), " ".join(DEMO_COMMAND)
        summary = plot_loss(records, out, f"{machine()}\n{command}")
        last = [r for r in summary["records"] if "val_loss" in r][-1:]
        print(f"loss curve: {len(summary['records'])} logged steps, final validation "
              f"{last[0]['val_loss']:.3f} (ppl {last[0]['val_ppl']:.0f})" if last else "no validation logged")
        print(f"loss curve done after {time.perf_counter() - started:.0f} s", flush=True)
    if "throughput" in only:
        rows = sweep(args.rounds, args.steps, work)
        plot_throughput(rows, out, f"{machine()}, fp32, one process\npython bench/plots.py --only throughput "
                                   f"--rounds {args.rounds} --steps {args.steps} (b 8 x s 128, median step)")
    print(f"wrote {out} in {time.perf_counter() - started:.0f} s")


if __name__ == "__main__":
    os.environ.setdefault("DS_ACCELERATOR", "cpu")
    main()
