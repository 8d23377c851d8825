"""scripts/gpu_check.sh's judge: checks each step's output and writes gpu_check.json.

Each subcommand but ``finish`` checks one step's result and writes ``--figures FILE`` (JSON: the step's figures
and, when it failed, ``reason``: one line saying what); it exits 1 when the step's result is wrong.

    env      the installed environment: megatron-core/DeepSpeed/WebDataset (and the rest of gpu_wheels/) imported
             from the check's --target folder at the pinned versions, torch and the image's packages from outside it,
             the project from the repository, CUDA present (gpu mode)
    pytest   the junit XML of `pytest -m gpu tests/gpu`: no failures or errors, at least one test passed
    bench    bench/train_step.py --json: per model and side (ours, plain) tokens/s, TFLOP/s and MFU finite,
             tokens/s > 0 and 0 < MFU <= 1
    record   append one step's line (name, ok, seconds, rc, reason, figures) to the steps file
    finish   gpu_check.json from the steps file; prints the summary; exit 1 (with one line on stderr) if any failed

Standard library only (runs before and outside the checked environment, except ``env``).
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import time
import xml.etree.ElementTree as ET
from pathlib import Path

# Distributions that must come from the image (gpu mode) or this machine (dry run), never from gpu_wheels/.
IMAGE_MODULES = {"torch": "torch", "numpy": "numpy", "transformers": "transformers", "sentencepiece": "sentencepiece",
                 "safetensors": "safetensors", "prometheus_client": "prometheus-client", "xxhash": "xxhash",
                 "pytest": "pytest"}
# Modules imported from gpu_wheels/ (the check's --target folder), by the distribution that brings them.
WHEEL_MODULES = {"megatron.core": "megatron-core", "deepspeed": "deepspeed", "webdataset": "webdataset",
                 "pydantic": "pydantic", "yaml": "PyYAML"}
BENCH_SIDES = ("ours", "plain")


class StepFailed(Exception):
    """A step's result is wrong: ``str(e)`` says what in one line; ``figures`` keeps what was measured."""

    def __init__(self, reason: str, figures: dict | None = None):
        super().__init__(reason)
        self.figures = figures or {}


def _inside(path: str | None, folder: Path) -> bool:
    return path is not None and Path(path).resolve().is_relative_to(folder.resolve())


def check_env(args) -> dict:
    import importlib
    import importlib.metadata as md
    import importlib.util

    prefix, repo = Path(args.prefix), Path(args.repo)
    figures: dict = {"python": sys.version.split()[0], "prefix": str(prefix), "from_wheels": {}, "from_image": {}}
    problems = []
    for line in Path(args.requirements).read_text().split():
        name, version = line.split("==")
        try:
            dist = md.distribution(name)
        except md.PackageNotFoundError:
            problems.append(f"{name} not installed")
            continue
        where = str(dist.locate_file(""))
        figures["from_wheels"][name] = dist.version
        if dist.version != version or not _inside(where, prefix):
            problems.append(f"{name} {dist.version} from {where}, expected {version} from {prefix}")
    for module, dist_name in WHEEL_MODULES.items():
        mod = importlib.import_module(module)
        if not _inside(mod.__file__, prefix):
            problems.append(f"{module} imported from {mod.__file__}, not from {prefix}")
    for module, dist_name in IMAGE_MODULES.items():
        try:
            mod = importlib.import_module(module)
        except ImportError as e:
            problems.append(f"{module} missing ({e})")
            continue
        figures["from_image"][dist_name] = getattr(mod, "__version__", None) or md.version(dist_name)
        if _inside(mod.__file__, prefix):
            problems.append(f"{module} imported from the wheels folder {prefix}: gpu_wheels/ must not replace it")
    import torch
    import transformers

    import pretrain

    transformers.GPT2LMHeadModel  # noqa: B018 - lazy: imports the model code (and its dependencies) now

    if not _inside(pretrain.__file__, repo):
        problems.append(f"pretrain imported from {pretrain.__file__}, not from the repository {repo}")
    figures["torch_cuda"] = torch.version.cuda
    figures["cuda_available"] = torch.cuda.is_available()
    figures["transformer_engine"] = importlib.util.find_spec("transformer_engine") is not None
    if torch.cuda.is_available():
        figures["device"] = torch.cuda.get_device_name()
        figures["bf16_supported"] = torch.cuda.is_bf16_supported()
        from pretrain.metrics.prometheus import peak_flops

        peak = peak_flops(0, figures["device"])
        figures["peak_bf16_tflops"] = peak / 1e12 if peak else None
        if peak is None:
            problems.append(f"{figures['device']} has no entry in pretrain.metrics.prometheus.PEAK_FLOPS (MFU unknown)")
    elif args.mode == "gpu":
        problems.append(f"torch {torch.__version__} sees no CUDA device (use --cpu-dry-run on CPU machines)")
    if problems:
        raise StepFailed("; ".join(problems))
    return figures


def check_pytest(args) -> dict:
    """Outcome per test from the junit XML (xunit1: properties a test recorded become figures)."""
    path = Path(args.junit)
    if not path.is_file():
        raise StepFailed(f"no junit XML at {path} (pytest did not get to write it)")
    root = ET.parse(path).getroot()
    suite = root if root.tag == "testsuite" else root.find("testsuite")
    outcome, properties = {}, {}
    for case in root.iter("testcase"):
        name = f"{case.get('classname', '').rsplit('.', 1)[-1]}::{case.get('name')}"
        kinds = {child.tag: child for child in case}
        if "failure" in kinds:
            outcome[name] = "failed"
        elif "error" in kinds:
            outcome[name] = "error"
        elif "skipped" in kinds:
            outcome[name] = "xfailed" if kinds["skipped"].get("type") == "pytest.xfail" else "skipped"
        else:
            outcome[name] = "passed"
        recorded = {p.get("name"): p.get("value") for p in case.iter("property")}
        if recorded:
            properties[name] = recorded
    count = {k: sum(v == k for v in outcome.values()) for k in ("passed", "failed", "error", "skipped", "xfailed")}
    figures = {"tests": len(outcome), **count,
               "seconds": float(suite.get("time", "nan")) if suite is not None else None,
               "outcomes": outcome, "properties": properties}
    bad = [n for n, v in outcome.items() if v in ("failed", "error")]
    if bad:
        raise StepFailed(f"{len(bad)} of {len(outcome)} tests failed: {', '.join(bad)}", figures)
    if not count["passed"]:
        raise StepFailed(f"no test passed ({len(outcome)} collected, {count['skipped']} skipped)", figures)
    return figures


def check_bench(args) -> dict:
    path = Path(args.json)
    if not path.is_file():
        raise StepFailed(f"bench wrote no {path.name} (crashed before the end?)")
    data = json.loads(path.read_text())
    figures = {"device": data.get("device"), "dtype": data.get("dtype"), "models": {}}
    problems = []
    for model, r in data.get("results", {}).items():
        entry = {"shape": r.get("shape"), "params_m": r.get("params_m"), "peak_tflops": r.get("peak_tflops"),
                 "ours_over_plain_time": r.get("ratio")}
        for side in BENCH_SIDES:
            tok_s, tflops, mfu = (r.get(f"{side}_{k}") for k in ("tok_s", "tflops", "mfu"))
            entry[side] = {"tokens_per_s": tok_s, "tflops": tflops, "mfu": mfu}
            values = {"tokens/s": tok_s, "TFLOP/s": tflops, "MFU": mfu}
            bad = [k for k, v in values.items() if not isinstance(v, (int, float)) or not math.isfinite(v)]
            if bad:
                problems.append(f"{model} {side}: non-finite {', '.join(f'{k}={values[k]}' for k in bad)}")
            elif tok_s <= 0:
                problems.append(f"{model} {side}: tokens/s {tok_s:g} <= 0")
            elif not 0 < mfu <= 1:
                problems.append(f"{model} {side}: MFU {mfu:.1%} outside (0, 100%] (peak {r.get('peak_tflops')} "
                                "TFLOP/s)")
        figures["models"][model] = entry
    if not figures["models"]:
        problems.append(f"{path.name} holds no results")
    if problems:
        raise StepFailed("; ".join(problems), figures)
    return figures


def _last_error(output: str | None) -> str | None:
    """The last line of a step's output that reads like its error (pip's "ERROR: ...", a Python exception)."""
    if not output or not Path(output).is_file():
        return None
    lines = [l.strip() for l in Path(output).read_text(errors="replace").splitlines() if l.strip()]
    for line in reversed(lines):
        if line.startswith(("ERROR", "error:")) or (line.split(":")[0].endswith(("Error", "Exception"))
                                                    and " " not in line.split(":")[0]):
            return line[:300]
    return lines[-1][:300] if lines else None


def record(args) -> int:
    """One step's line into the steps file and one status line on stdout; 1 if the step failed."""
    figures = json.loads(Path(args.figures).read_text()) if args.figures and Path(args.figures).is_file() else {}
    reason = figures.pop("reason", None)
    if args.rc in (124, 137):
        reason = f"timed out after {args.limit} s" + (f" ({reason})" if reason else "")
    elif args.rc != 0:  # the command's own error first, then what the judge found (if anything)
        last = _last_error(args.output)
        reason = "; ".join(filter(None, [f"exited with status {args.rc}" + (f": {last}" if last else ""), reason]))
    line = {"step": args.name, "ok": args.rc == 0 and reason is None, "seconds": round(args.seconds, 1),
            "limit_s": args.limit, "rc": args.rc, "reason": reason, "figures": figures}
    with open(args.steps, "a") as f:
        f.write(json.dumps(line) + "\n")
    status = "ok" if line["ok"] else f"FAIL: {reason}"
    print(f"gpu_check: {args.name}: {status} ({line['seconds']:.1f} s)", flush=True)
    return 0 if line["ok"] else 1


def finish(args) -> int:
    steps = [json.loads(l) for l in Path(args.steps).read_text().splitlines()] if Path(args.steps).is_file() else []
    failed = [s for s in steps if not s["ok"]]
    result = {"ok": bool(steps) and not failed, "mode": args.mode, "finished": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
              "seconds": round(sum(s["seconds"] for s in steps), 1),
              "steps": {s["step"]: {k: s[k] for k in ("ok", "seconds", "limit_s", "rc", "reason")} for s in steps},
              "env": next((s["figures"] for s in steps if s["step"] == "preflight"), {}),
              "pytest": next((s["figures"] for s in steps if s["step"] == "pytest"), {}),
              "bench": {m: v for s in steps if s["step"].startswith("bench_")
                        for m, v in s["figures"].get("models", {}).items()}}
    result["not_run"] = args.skipped.split(",") if args.skipped else []
    result["complete"] = not result["not_run"]  # every step of the mode ran (GPU_CHECK_STEPS selects fewer)
    Path(args.out).write_text(json.dumps(result, indent=2) + "\n")
    for model, b in result["bench"].items():
        line = f"gpu_check: bench {model}:"
        for side in BENCH_SIDES:
            s = b.get(side, {})
            if isinstance(s.get("tokens_per_s"), (int, float)):
                line += f" {side} {s['tokens_per_s']:,.0f} tok/s, MFU {s['mfu']:.1%};"
        print(line.rstrip(";"))
    if result["ok"]:
        partial = f"; partial, not run: {', '.join(result['not_run'])}" if result["not_run"] else ""
        print(f"gpu_check: PASS ({len(steps)} steps, {result['seconds']:.0f} s{partial}; {args.out})")
        return 0
    what = "; ".join(f"{s['step']}: {s['reason']}" for s in failed) or "no step ran"
    print(f"gpu_check: FAIL: {what} (log: {args.log})", file=sys.stderr)
    return 1


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    sub = parser.add_subparsers(dest="command", required=True)
    p = sub.add_parser("env")
    p.add_argument("--mode", choices=("gpu", "cpu"), required=True)
    p.add_argument("--prefix", required=True)
    p.add_argument("--repo", required=True)
    p.add_argument("--requirements", required=True)
    p = sub.add_parser("pytest")
    p.add_argument("--junit", required=True)
    p = sub.add_parser("bench")
    p.add_argument("--json", required=True)
    for name in ("env", "pytest", "bench"):
        sub.choices[name].add_argument("--figures", required=True)
    p = sub.add_parser("record")
    p.add_argument("--steps", required=True)
    p.add_argument("--name", required=True)
    p.add_argument("--rc", type=int, required=True)
    p.add_argument("--seconds", type=float, required=True)
    p.add_argument("--limit", type=int, required=True)
    p.add_argument("--figures")
    p.add_argument("--output", help="the step's output, for a reason when it failed without one")
    p = sub.add_parser("finish")
    p.add_argument("--steps", required=True)
    p.add_argument("--out", required=True)
    p.add_argument("--mode", required=True)
    p.add_argument("--log", required=True)
    p.add_argument("--skipped", default="")
    args = parser.parse_args()
    if args.command == "record":
        return record(args)
    if args.command == "finish":
        return finish(args)
    check = {"env": check_env, "pytest": check_pytest, "bench": check_bench}[args.command]
    try:
        figures, code = check(args), 0
    except StepFailed as e:
        figures, code = {**e.figures, "reason": str(e)}, 1
    except Exception as e:  # noqa: BLE001 - a crash of the check itself is that step's failure, in one line
        figures, code = {"reason": f"{type(e).__name__}: {e}"}, 1
    Path(args.figures).write_text(json.dumps(figures, indent=2, default=str) + "\n")
    print(json.dumps(figures, indent=2, default=str))
    return code


if __name__ == "__main__":
    sys.exit(main())
