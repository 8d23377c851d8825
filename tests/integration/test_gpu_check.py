"""scripts/gpu_wheels.sh and scripts/gpu_check.sh on CPU: the wheels folder (fetched once, then cached), the
check's install from it into a private folder, its steps and their judge, and its failure paths (one line on
stderr, non-zero exit). What the GPU tests assert on a GPU is in tests/gpu/; here they run in the dry run on CPU."""

from __future__ import annotations

import importlib.util
import json
import math
import os
import re
import subprocess
from pathlib import Path

import pytest

from tests.conftest import REPO

WHEELS = REPO / "gpu_wheels"
MAX_MIB = 40


def _run(*args: str, env: dict[str, str] | None = None, timeout: float = 900) -> subprocess.CompletedProcess:
    return subprocess.run(["bash", *args], cwd=REPO, capture_output=True, text=True, timeout=timeout,
                          env={**os.environ, **(env or {})})


def _check(out: Path, *, env: dict[str, str] | None = None, mode: str = "--cpu-dry-run"):
    result = _run("scripts/gpu_check.sh", *([mode] if mode else []), str(out), env=env)
    report = json.loads((out / "gpu_check.json").read_text())
    return result, report


@pytest.fixture(scope="module")
def wheels() -> Path:
    """gpu_wheels/ as scripts/gpu_wheels.sh leaves it (downloads from PyPI the first time, ~15 s; then cached)."""
    result = _run("scripts/gpu_wheels.sh", timeout=600)
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-3000:]
    size = re.search(r"gpu_wheels: (\d+) wheels, ([\d.]+) MiB", result.stdout)
    assert size, result.stdout
    print(result.stdout.strip().splitlines()[-1])  # the size, in pytest -s / -rP output
    assert float(size[2]) <= MAX_MIB
    return WHEELS


def test_wheels_are_the_pinned_set_without_torch_and_cached(wheels):
    names = sorted(p.name for p in wheels.glob("*.whl"))
    assert sum(p.stat().st_size for p in wheels.glob("*.whl")) <= MAX_MIB * 2 ** 20
    assert not [n for n in names if re.match(r"(torch|numpy|nvidia)[-_]", n, re.I)]
    pins = dict(line.split("==") for line in (wheels / "requirements.txt").read_text().split())
    constraints = dict(line.split("==") for line in (REPO / "constraints-cpu.txt").read_text().splitlines()
                       if "==" in line and not line.startswith("#"))
    for name in ("deepspeed", "megatron-core", "webdataset"):
        assert pins[name] == constraints[name]
    # DeepSpeed: a pure wheel built with no ops; megatron-core: the GPU image's Python (3.12) and this one's.
    assert f"deepspeed-{pins['deepspeed']}-py3-none-any.whl" in names
    assert any(n.startswith(f"megatron_core-{pins['megatron-core']}-cp312-") for n in names)
    rerun = _run("scripts/gpu_wheels.sh", timeout=60)
    assert rerun.returncode == 0 and "nothing downloaded" in rerun.stdout, rerun.stdout + rerun.stderr


@pytest.mark.slow
def test_cpu_dry_run_installs_from_the_wheels_and_passes_every_step(wheels, tmp_path):
    result, report = _check(tmp_path / "out")
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-2000:]
    assert result.stderr == "" and result.stdout.strip().splitlines()[-1].startswith("gpu_check: PASS")
    assert report["ok"] and report["complete"] and report["mode"] == "cpu"
    assert list(report["steps"]) == ["install", "preflight", "pytest", "bench_nano", "bench_tiny"]
    for name, step in report["steps"].items():
        assert step["ok"] and step["reason"] is None and 0 < step["seconds"] <= step["limit_s"], (name, step)
    # Installed from gpu_wheels/ (a --target folder in front of site-packages), torch and the rest from outside.
    env = report["env"]
    pins = dict(line.split("==") for line in (wheels / "requirements.txt").read_text().split())
    assert env["from_wheels"] == pins
    assert {"torch", "transformers", "numpy"} <= set(env["from_image"]) and not env["cuda_available"]
    # The GPU tests ran on CPU: training learned, the export matched transformers (figures from the junit XML).
    tests = report["pytest"]
    outcomes = tests["outcomes"]
    assert outcomes["test_gpu_train::test_gpu_bf16_training_learns"] == "passed"
    assert outcomes["test_gpu_export::test_bf16_trained_gpt_exports_to_transformers_with_equal_logits"] == "passed"
    assert tests["failed"] == tests["error"] == 0 and tests["passed"] >= 2
    export = tests["properties"]["test_gpu_export::test_bf16_trained_gpt_exports_to_transformers_with_equal_logits"]
    assert float(export["rel_err_fp32"]) <= 1e-4 and float(export["rel_err_bf16"]) <= 2e-2
    assert (tmp_path / "out" / "pytest_junit.xml").is_file()
    assert "===== " in (tmp_path / "out" / "gpu_check.log").read_text()
    # Bench figures per model and side: finite, MFU against the dry run's nominal 10 TFLOP/s peak.
    assert set(report["bench"]) == {"nano", "tiny"}
    for model, bench in report["bench"].items():
        assert bench["peak_tflops"] == 10.0
        for side in ("ours", "plain"):
            figures = bench[side]
            assert all(math.isfinite(v) for v in figures.values()), (model, side, figures)
            assert figures["tokens_per_s"] > 0 and 0 < figures["mfu"] <= 1


def _one_line(result: subprocess.CompletedProcess) -> str:
    lines = result.stderr.strip().splitlines()
    assert result.returncode == 1 and len(lines) == 1, result.stdout[-2000:] + result.stderr[-2000:]
    assert lines[0].startswith("gpu_check: FAIL: ")
    return lines[0]


def test_missing_wheel_fails_the_install_in_one_line(wheels, tmp_path):
    partial = tmp_path / "wheels"
    partial.mkdir()
    for f in wheels.iterdir():
        if not f.name.startswith("webdataset"):
            (partial / f.name).symlink_to(f)
    result, report = _check(tmp_path / "out", env={"GPU_WHEELS_DIR": str(partial)})
    line = _one_line(result)
    assert line.startswith("gpu_check: FAIL: install: ") and "webdataset==1.0.2" in line, line
    assert not report["ok"] and report["not_run"] == ["preflight", "pytest", "bench_nano", "bench_tiny"]


def test_gpu_mode_on_a_machine_without_cuda_fails_in_preflight(wheels, tmp_path):
    result, report = _check(tmp_path / "out", mode="")
    line = _one_line(result)
    assert line.startswith("gpu_check: FAIL: preflight: ") and "sees no CUDA device" in line, line
    assert report["mode"] == "gpu" and report["steps"]["install"]["ok"]


def test_failed_steps_do_not_stop_later_ones_and_are_named_in_one_line(wheels, tmp_path):
    # pytest replaced by a failing command; the bench judged against an absurd peak (MFU in the millions of %).
    result, report = _check(tmp_path / "out", env={
        "GPU_CHECK_STEPS": "install,preflight,pytest,bench_nano", "GPU_CHECK_FAIL_STEP": "pytest",
        "GPU_CHECK_BENCH_ARGS": "--peak-tflops=1e-6"})
    line = _one_line(result)
    assert "pytest: exited with status 3: ERROR: injected failure" in line, line
    assert "bench_nano: nano ours: MFU" in line and "outside (0, 100%]" in line, line
    assert [s for s, v in report["steps"].items() if not v["ok"]] == ["pytest", "bench_nano"]
    assert report["not_run"] == ["bench_tiny"] and not report["complete"]
    assert report["bench"]["nano"]["ours"]["mfu"] > 1  # the figures are kept, judged wrong


def _judge():
    spec = importlib.util.spec_from_file_location("gpu_check_report", REPO / "scripts" / "gpu_check_report.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.mark.parametrize("ours, reason", [
    ({"tok_s": float("nan"), "tflops": 1.0, "mfu": 0.5}, "non-finite tokens/s=nan"),
    ({"tok_s": 0.0, "tflops": 0.0, "mfu": 0.0}, "tokens/s 0 <= 0"),
    ({"tok_s": 1e5, "tflops": 1.0, "mfu": 0.0}, "MFU 0.0% outside (0, 100%]"),
    ({"tok_s": 1e5, "tflops": 1.0, "mfu": float("inf")}, "non-finite MFU=inf"),
])
def test_bench_judge_refuses_non_finite_and_absurd_figures(tmp_path, ours, reason):
    judge = _judge()
    plain = {"plain_tok_s": 1e5, "plain_tflops": 1.0, "plain_mfu": 0.3}
    bench = tmp_path / "bench.json"
    bench.write_text(json.dumps({"results": {"125m": {**{f"ours_{k}": v for k, v in ours.items()}, **plain}}}))

    class Args:
        json = str(bench)

    with pytest.raises(judge.StepFailed, match=re.escape(f"125m ours: {reason}")):
        judge.check_bench(Args)


def test_pytest_judge_names_failed_tests_and_refuses_all_skipped(tmp_path):
    judge = _judge()
    junit = tmp_path / "junit.xml"

    class Args:
        junit = str(tmp_path / "junit.xml")

    case = '<testcase classname="tests.gpu.test_gpu_train" name="test_{}" time="1.0">{}</testcase>'
    passed, failed, skipped = (case.format("a", ""), case.format("b", '<failure message="x"/>'),
                               case.format("a", '<skipped type="pytest.skip"/>'))
    junit.write_text(f'<testsuites><testsuite time="2.0">{passed}{failed}</testsuite></testsuites>')
    with pytest.raises(judge.StepFailed, match=r"^1 of 2 tests failed: test_gpu_train::test_b$"):
        judge.check_pytest(Args)
    junit.write_text(f'<testsuites><testsuite time="0.0">{skipped}</testsuite></testsuites>')
    with pytest.raises(judge.StepFailed, match=r"^no test passed \(1 collected, 1 skipped\)$"):
        judge.check_pytest(Args)
