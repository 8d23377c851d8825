"""``pretrain report RUN_DIR``: one PNG of the run (matplotlib, headless) and a small HTML page that shows it with
the run's summary and resolved config: loss and validation loss, learning rate, throughput (and MFU when the
device's peak is configured), gradient norm, data wait, skipped steps and loss spikes, goodput over the run and its
parts; restarts (where a resumed attempt started) are dashed lines on every plot.

Reads only the run directory: metrics.jsonl (every attempt's records, in order), goodput.jsonl, config.yaml.
"""

from __future__ import annotations

import html
import json
from pathlib import Path
from typing import Any

from pretrain.errors import ConfigError
from pretrain.metrics import goodput, names

PNG_NAME, HTML_NAME = "report.png", "report.html"
GOODPUT_COLOURS = {"productive": "#2ca02c", "startup": "#1f77b4", "checkpoint": "#9467bd", "eval": "#17becf",
                   "data_wait": "#bcbd22", "redone": "#d62728", "skipped": "#ff7f0e", "between_attempts": "#7f7f7f"}


def read_records(run_dir: Path) -> list[dict[str, Any]]:
    """metrics.jsonl's records in file order (a torn last line, from a kill, is skipped)."""
    path = run_dir / "metrics.jsonl"
    if not path.is_file():
        raise ConfigError(f"pretrain report: {path} not found (is {run_dir} a run directory?)")
    records = []
    for line in path.read_text().splitlines():
        try:
            records.append(json.loads(line))
        except ValueError:
            continue
    if not records:
        raise ConfigError(f"pretrain report: {path} holds no logged step yet")
    return records


def restarts(records: list[dict[str, Any]], attempts: list[dict[str, Any]]) -> list[int]:
    """Steps a later attempt resumed from: goodput.jsonl's when present, else where metrics.jsonl's step goes back."""
    if len(attempts) > 1:
        return [a["resumed_from"] for a in attempts[1:]]
    steps = [r[names.STEP] for r in records]
    return [b - 1 for a, b in zip(steps, steps[1:]) if b <= a]


def series(records: list[dict[str, Any]], key: str) -> tuple[list[int], list[float]]:
    """(steps, values) of ``key``; a step logged twice (before a kill and after the resume) keeps the later."""
    latest = {r[names.STEP]: r[key] for r in records if isinstance(r.get(key), (int, float))}
    steps = sorted(latest)
    return steps, [latest[s] for s in steps]


def render_png(run_dir: Path, records, attempts, config: dict[str, Any]) -> Path:
    """The 3×3 figure at ``<run_dir>/report.png``."""
    try:
        import matplotlib
    except ImportError:
        raise ConfigError("pretrain report needs matplotlib: pip install -e '.[report]'") from None
    matplotlib.use("Agg")  # headless: no display on cluster nodes or CI
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(3, 3, figsize=(15, 11), constrained_layout=True)
    fig.suptitle(f"{config.get('run', {}).get('name', run_dir.name)}: {run_dir}", fontsize=13)
    peak = float(config.get("metrics", {}).get("peak_tflops", 0) or 0)
    plots = [
        ("Loss", [(names.LOSS, "train"), (names.VAL_LOSS, "validation")], None),
        ("Learning rate", [(names.LR, "lr")], None),
        ("Throughput (tokens/s)", [(names.TOKENS_PER_S, "tokens/s")], None),
        ("Gradient norm", [(names.GRAD_NORM, "grad norm")], "log"),
        ("Data wait (s per logged step)", [(names.DATA_WAIT_S, "data wait"), (names.STEP_TIME_S, "step time")], None),
        ("Skipped steps, loss spikes (total)", [(names.SKIPPED_STEPS, "skipped steps"),
                                                (names.LOSS_SPIKES, "loss spikes")], None),
    ]
    for ax, (title, keys, scale) in zip(axes.flat, plots):
        for key, label in keys:
            steps, values = series(records, key)
            if steps:
                ax.plot(steps, values, marker="o" if len(steps) < 30 else None, markersize=3, label=label)
        if scale and any(series(records, k)[0] for k, _ in keys):
            ax.set_yscale(scale)
        ax.set_title(title)
        ax.set_xlabel("step")
        if len(keys) > 1:
            ax.legend(loc="best", fontsize=8)
    mfu_ax = axes.flat[2]
    steps, tflops = series(records, names.TFLOPS)
    if peak and steps:  # MFU needs the device's peak: metrics.peak_tflops in the run's config
        twin = mfu_ax.twinx()
        twin.plot(steps, [100 * t / peak for t in tflops], color="#d62728", label="MFU %")
        twin.set_ylabel("MFU %")
    _goodput_over_steps(axes.flat[6], records)
    _goodput_parts(axes.flat[7], attempts)
    _summary_text(axes.flat[8], records, attempts)
    for ax in list(axes.flat)[:7]:
        for step in restarts(records, attempts):
            ax.axvline(step, color="#d62728", linestyle="--", linewidth=1, alpha=0.7)
    axes.flat[0].plot([], [], color="#d62728", linestyle="--", label="restart (resumed from)")
    axes.flat[0].legend(loc="best", fontsize=8)
    path = run_dir / PNG_NAME
    fig.savefig(path, dpi=80)
    plt.close(fig)
    return path


def _goodput_over_steps(ax, records) -> None:
    # A step logged twice (before a kill, after the resume) keeps the later attempt's totals.
    latest = {r[names.STEP]: r[names.GOODPUT_S] for r in records if isinstance(r.get(names.GOODPUT_S), dict)}
    ax.set_title("Goodput over the run (committed productive ÷ all)")
    ax.set_xlabel("step")
    if latest:
        steps = sorted(latest)
        ax.plot(steps, [100 * latest[s]["productive"] / max(sum(latest[s].values()), 1e-9) for s in steps],
                color="#2ca02c")
        ax.set_ylim(0, 100)
        ax.set_ylabel("%")


def _goodput_parts(ax, attempts) -> None:
    ax.set_title("Where the wall time went")
    if not attempts:
        ax.text(0.5, 0.5, "no goodput.jsonl", ha="center", va="center")
        return
    parts = goodput.totals(attempts)
    parts["uncommitted"] = attempts[-1]["uncommitted_s"]
    shown = {k: v for k, v in parts.items() if v > 0}
    kinds = list(shown)
    ax.barh(kinds, [shown[k] for k in kinds], color=[GOODPUT_COLOURS.get(k, "#8c564b") for k in kinds])
    ax.set_xlabel("seconds")
    ax.invert_yaxis()


def _summary_text(ax, records, attempts) -> None:
    ax.axis("off")
    ax.set_title("Summary")
    ax.text(0.0, 1.0, "\n".join(f"{k}: {v}" for k, v in summary(records, attempts).items()), va="top",
            family="monospace", fontsize=9, wrap=True)


def summary(records, attempts) -> dict[str, str]:
    """The numbers the page and the figure show."""
    last = records[-1]
    out = {"steps": f"{last[names.STEP]}", "final loss": f"{series(records, names.LOSS)[1][-1]:.4f}"}
    val = series(records, names.VAL_LOSS)[1]
    if val:
        out["final validation loss"] = f"{val[-1]:.4f}"
    if names.TOKENS_TOTAL in last:
        out["tokens"] = f"{last[names.TOKENS_TOTAL]:,}"
    tps = series(records, names.TOKENS_PER_S)[1]
    if tps:
        out["median tokens/s"] = f"{sorted(tps)[len(tps) // 2]:,.0f}"
    out["skipped steps"] = str(last.get(names.SKIPPED_STEPS, 0))
    out["attempts"] = str(max(len(attempts), 1 + len(restarts(records, attempts))))
    if attempts:
        out["goodput"] = (f"{100 * goodput.goodput_fraction(attempts):.1f}% of "
                          f"{goodput.hms(goodput.wall_s(attempts))}")
    return out


def render_html(run_dir: Path, records, attempts, config_text: str) -> Path:
    """``<run_dir>/report.html``: the PNG, the summary table, the goodput line and the resolved config."""
    rows = "".join(f"<tr><th>{html.escape(k)}</th><td>{html.escape(v)}</td></tr>"
                   for k, v in summary(records, attempts).items())
    line = html.escape(goodput.summary(attempts)) if attempts else "no goodput.jsonl in this run directory"
    page = f"""<!doctype html>
<html><head><meta charset="utf-8"><title>pretrain report: {html.escape(run_dir.name)}</title>
<style>body{{font-family:sans-serif;margin:1.5em;color:#222}} table{{border-collapse:collapse}}
th,td{{text-align:left;padding:.2em .8em;border-bottom:1px solid #ddd}} img{{max-width:100%;border:1px solid #ccc}}
pre{{background:#f6f6f6;padding:1em;overflow:auto}}</style></head>
<body><h1>pretrain run {html.escape(str(run_dir))}</h1>
<table>{rows}</table>
<p><b>{line}</b></p>
<img src="{PNG_NAME}" alt="loss, learning rate, throughput, grad norm, data wait, skipped steps, goodput">
<h2>Config (config.yaml)</h2><pre>{html.escape(config_text)}</pre>
</body></html>
"""
    path = run_dir / HTML_NAME
    path.write_text(page)
    return path


def report(run_dir: str | Path) -> Path:
    """Write report.png and report.html into ``run_dir``; returns the HTML page's path."""
    import yaml

    run_dir = Path(run_dir)
    records = read_records(run_dir)
    attempts = goodput.read(run_dir / goodput.FILE_NAME)
    config_path = run_dir / "config.yaml"
    config_text = config_path.read_text() if config_path.is_file() else ""
    config = yaml.safe_load(config_text) or {} if config_text else {}
    render_png(run_dir, records, attempts, config)
    return render_html(run_dir, records, attempts, config_text)
