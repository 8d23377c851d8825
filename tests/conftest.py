"""Shared fixtures: the bundled corpus prepared once per session, and a way to run the real CLI."""

from __future__ import annotations

import contextlib
import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Iterator

import pytest

REPO = Path(__file__).resolve().parents[1]
TINY_CONFIG = REPO / "configs" / "debug" / "gpt_tiny.yaml"

# Under pytest-xdist each worker has about one core of the 2-core CI machine: one intra-op thread in each test
# process and in the runs it starts (they inherit it), instead of two threads per process on a busy core.
if int(os.environ.get("PYTEST_XDIST_WORKER_COUNT", "1")) > 1:
    os.environ.setdefault("OMP_NUM_THREADS", "1")


#: Modules that spend much of their time waiting on daemons and hosts (Slurm requeues, rendezvous timeouts, polls):
#: started first, their waits overlap the CPU-bound modules instead of ending the run alone.
WAITING_MODULES = ("tests/multinode/", "tests/slurm/")


def pytest_collection_modifyitems(config, items):
    """Order modules for the workers (tests keep their order within a module): the waiting modules, then the other
    modules with slow tests, then the rest. scripts/test.sh runs --dist loadscope --no-loadscope-reorder, so the
    workers take whole modules in this order: the long ones start early and the short ones fill in at the end,
    instead of a long module starting last while the other workers idle (xdist's default order is by test count)."""
    slow = {item.nodeid.split("::")[0] for item in items if item.get_closest_marker("slow")}

    def rank(item) -> tuple[bool, bool]:
        module = item.nodeid.split("::")[0]
        return not module.startswith(WAITING_MODULES), module not in slow

    items.sort(key=rank)


#: Characters of held-out text the tests validate on: the opening of the first held-out play, ~150 sequences of 128
#: tokens (9 batches of gpt_tiny's 16). The whole held-out split (3 plays, ~1,300 sequences) made every test run's
#: final validation pass ~12 s of CPU; the CLI's own validation code is the same for any length.
VALID_CHARS = 40_000


@contextlib.contextmanager
def built_once(tmp_path_factory, name: str) -> Iterator[Path]:
    """A directory shared by every pytest-xdist worker of this run (their base temp directories' parent), held
    under a file lock inside the ``with``: the first worker to arrive builds it, the others find it built."""
    from filelock import FileLock

    root = tmp_path_factory.getbasetemp()
    if os.environ.get("PYTEST_XDIST_WORKER"):
        root = root.parent
    with FileLock(str(root / f"{name}.lock")):
        yield root / name


@pytest.fixture(scope="session")
def shakespeare(tmp_path_factory) -> dict[str, Path]:
    """Tokenizer + train/valid shards of the bundled corpus at gpt_tiny's sequence length (real data, ~10 s, once
    per run); valid is the opening VALID_CHARS of the first held-out play. Tests copy what they damage."""
    from data_pipeline.corpus import extract_bundled
    from data_pipeline.shards import prepare_shards
    from data_pipeline.tokenizer import train_tokenizer

    with built_once(tmp_path_factory, "shakespeare") as out:
        paths = {"tokenizer": out / "tokenizer.model", "train": out / "train", "valid": out / "valid"}
        if not (out / "built").is_file():
            splits = extract_bundled(out / "corpus")
            first_play = json.loads(splits["valid"].read_text().splitlines()[0])
            splits["valid"].write_text(json.dumps({**first_play, "text": first_play["text"][:VALID_CHARS]}) + "\n")
            tokenizer = train_tokenizer([str(splits["train"])], str(out / "tokenizer"), vocab_size=1024)
            assert Path(tokenizer) == paths["tokenizer"], tokenizer
            for split in ("train", "valid"):
                prepare_shards([str(splits[split])], str(tokenizer), str(paths[split]), seq_length=128,
                               samples_per_shard=4, sequences_per_sample=64, prefix=split)
            (out / "built").touch()
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
