"""`pretrain train CFG --dry-run --world-size N` through the real CLI: the 1.3B plan at 64 and 512 GPUs."""

from __future__ import annotations

import subprocess
import sys
import time

import pytest

from tests.conftest import REPO, cli_env, run_cli

G13B = "configs/gpt/1.3b.yaml"
# At 512 GPUs the shipped micro batch 4 x DP 256 = 1024 sequences overshoots the global batch of 512; two
# sequences per GPU keep the 1M-token step without gradient accumulation.
AT_512 = ["--train.micro_batch_size=2"]


def rows(stdout: str) -> dict[str, str]:
    """Table rows as {label: value}: labels and values are separated by two or more spaces."""
    table = {}
    for line in stdout.splitlines():
        if line.startswith("  "):
            key, _, value = line.strip().partition("  ")
            table[key] = value.strip()
    return table


@pytest.mark.parametrize("world, extra, dp, accumulation, micro", [
    (64, [], "32", "4", "4"),
    (512, AT_512, "256", "1", "2"),
])
def test_1_3b_plan_prints_the_table_and_fits(world, extra, dp, accumulation, micro):
    start = time.monotonic()
    result = run_cli("train", G13B, "--dry-run", "--world-size", str(world), *extra, timeout=120)
    assert result.returncode == 0, result.stdout + result.stderr
    assert time.monotonic() - start < 60  # arithmetic only: interpreter and imports dominate
    table = rows(result.stdout)
    assert table["world size"] == str(world) and table["tensor parallel (TP)"] == "2"
    assert table["pipeline parallel (PP)"] == "1" and table["data parallel (DP)"] == dp
    assert table["ZeRO stage"] == "1" and table["accumulation steps"] == accumulation
    assert table["micro batch"].startswith(micro) and table["global batch"].startswith("512")
    assert table["tokens per step"] == "1,048,576"
    assert table["total parameters"].startswith("1,316,081,664")  # parameters, padded vocab 50432 at TP 2
    assert table["per rank, largest stage"].startswith("660,287,488")
    parts = [float(table[key]) for key in ("params", "grads", "optimizer", "activations")]
    assert all(part > 0 for part in parts) and float(table["total"]) == pytest.approx(sum(parts), abs=0.02)
    assert float(table["total"]) < 72  # 80 GiB less the 10% reserve
    assert table["GPU budget"].endswith("fits")
    print(result.stdout)  # shown with -s: the acceptance table


def test_1_3b_at_512_without_override_is_refused_before_any_work():
    result = run_cli("train", G13B, "--dry-run", "--world-size", "512", timeout=120)
    assert result.returncode == 2 and result.stdout == ""
    assert result.stderr == ("error: train.global_batch_size (512) is not divisible by train.micro_batch_size (4) x "
                             "data-parallel size (256) = 1024\n")


def test_dry_run_builds_nothing_distributed():
    """No process group, no DeepSpeed, no model build, no data read: the config's data paths need not exist."""
    script = (
        "import sys, torch.distributed as dist\n"
        "from pretrain.cli import main\n"
        f"code = main(['train', {G13B!r}, '--dry-run', '--world-size', '64', '--data.train=/nonexistent'])\n"
        "assert code == 0, code\n"
        "assert not dist.is_initialized()\n"
        "assert 'deepspeed' not in sys.modules, 'deepspeed imported'\n"
        "from megatron.core import parallel_state\n"
        "assert not parallel_state.model_parallel_is_initialized()\n"
    )
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120, cwd=REPO,
                            env=cli_env())
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-2000:]


@pytest.mark.parametrize("config, world, params, dp", [
    # Meta's published counts: Llama 3.2 1B 1,235,814,400 (tied); Llama 3 / 3.1 8B 8,030,261,248, here + 2 x 256 x 4096
    # for the vocabulary padded to 128512 at TP 4 (input and untied output rows).
    ("configs/llama/3.2-1b.yaml", 8, "1,235,814,400", "8"),
    ("configs/llama/3.1-8b.yaml", 64, "8,032,358,400", "16"),
])
def test_llama_presets_plan_with_metas_parameter_counts(config, world, params, dp):
    result = run_cli("train", config, "--dry-run", "--world-size", str(world), timeout=120)
    assert result.returncode == 0, result.stdout + result.stderr
    table = rows(result.stdout)
    assert table["total parameters"].startswith(params) and table["data parallel (DP)"] == dp
    assert table["GPU budget"].endswith("fits")
