"""Shared fixtures: the bundled corpus prepared once per session, and a way to run the real CLI."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
TINY_CONFIG = REPO / "configs" / "debug" / "gpt_tiny.yaml"


@pytest.fixture(scope="session")
def shakespeare(tmp_path_factory) -> dict[str, Path]:
    """Tokenizer + train/valid shards of the bundled corpus at gpt_tiny's sequence length (real data, ~10 s)."""
    from data_pipeline.corpus import extract_bundled
    from data_pipeline.shards import prepare_shards
    from data_pipeline.tokenizer import train_tokenizer

    out = tmp_path_factory.mktemp("shakespeare")
    splits = extract_bundled(out / "corpus")
    tokenizer = train_tokenizer([str(splits["train"])], str(out / "tokenizer"), vocab_size=1024)
    paths = {"tokenizer": Path(tokenizer)}
    for split in ("train", "valid"):
        prepare_shards([str(splits[split])], str(tokenizer), str(out / split), seq_length=128,
                       samples_per_shard=4, sequences_per_sample=64, prefix=split)
        paths[split] = out / split
    return paths


def data_overrides(data: dict[str, Path], run_dir: Path) -> list[str]:
    """CLI overrides pointing gpt_tiny.yaml at the session's data and a test run directory."""
    return [f"--data.train={data['train']}", f"--data.valid={data['valid']}",
            f"--data.tokenizer={data['tokenizer']}", f"--run.dir={run_dir}"]


def cli_env() -> dict[str, str]:
    env = dict(os.environ, PYTHONUNBUFFERED="1")
    env["PYTHONPATH"] = os.pathsep.join([str(REPO), env.get("PYTHONPATH", "")])
    return env


def run_cli(*args: str, timeout: float = 600, torchrun_nproc: int = 0,
            env: dict[str, str] | None = None) -> subprocess.CompletedProcess:
    """Run ``pretrain ARGS`` (optionally under ``torchrun --nproc_per_node=N``, with ``env`` added to the
    environment, e.g. PRETRAIN_TEST_FAULTS) and capture its output."""
    if torchrun_nproc:
        cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={torchrun_nproc}",
               "-m", "pretrain", *args]
    else:
        cmd = [sys.executable, "-m", "pretrain", *args]
    return subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, cwd=REPO,
                          env={**cli_env(), **(env or {})})


def one_line_error(result: subprocess.CompletedProcess) -> str:
    """The one ``error:`` line a refused command ends with (exit code 2, no traceback, no warning or error logged
    before it; INFO progress lines of the work done before the refusal may precede it); returns the line."""
    lines = result.stderr.strip().splitlines()
    assert result.returncode == 2 and lines and lines[-1].startswith("error: "), result.stderr[-3000:]
    others = [line for line in lines[:-1] if line.startswith("error: ") or " WARNING " in line or " ERROR " in line
              or "Traceback" in line]
    assert not others, result.stderr[-3000:]
    return lines[-1]


def train_tiny(data: dict[str, Path], run_dir: Path, *args: str) -> Path:
    """`pretrain train` of gpt_tiny.yaml on the session's data into ``run_dir``; fails the test unless it finished."""
    result = run_cli("train", str(TINY_CONFIG), *args, *data_overrides(data, run_dir))
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    return run_dir


def read_metrics(run_dir: Path) -> dict[int, dict]:
    """metrics.jsonl as {step: record}; a step logged twice (before a kill and after resume) keeps the last."""
    records = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    return {r["step"]: r for r in records}


def value_after(text: str, label: str) -> float:
    """The number printed right after ``label`` in CLI output (e.g. "val loss 5.1234")."""
    return float(text.split(label, 1)[1].split()[0])
