"""`pretrain train` with damaged, unfitting or malicious checkpoints, and checkpoint.load across restarts: automatic
resume falls back (and pruning keeps what it wrote), explicit loads refuse, a pickle that would run code is refused
by every loader, and a restarted run continues from its own checkpoints rather than the one it was seeded from."""

from __future__ import annotations

import json
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from tests.conftest import REPO, TINY_CONFIG, cli_env, data_overrides, one_line_error, run_cli, train_tiny

RUN_ARGS = ["--train.steps=4", "--train.log_every=1", "--checkpoint.every_steps=2", "--checkpoint.keep_last=0"]


@pytest.fixture(scope="module")
def saved_run(shakespeare, tmp_path_factory) -> Path:
    """gpt_tiny for 4 steps with checkpoints at steps 2 and 4."""
    return train_tiny(shakespeare, tmp_path_factory.mktemp("saved"), *RUN_ARGS)


def _copy(run_dir: Path, tmp_path: Path, name: str = "run") -> Path:
    return Path(shutil.copytree(run_dir, tmp_path / name))


def _flip_byte(file: Path) -> None:
    data = bytearray(file.read_bytes())
    data[len(data) // 2] ^= 0xFF
    file.write_bytes(bytes(data))


def test_auto_resume_skips_a_truncated_checkpoint_and_pruning_keeps_what_it_wrote(shakespeare, saved_run, tmp_path):
    """Falls back from the corrupt step_4 to step_2, then saves step_3 < 4: keep_last=1 must keep step_3 (counting
    the corrupt step_4 as the newest deleted the checkpoint just written and left only the corrupt one)."""
    run_dir = _copy(saved_run, tmp_path)
    checkpoints = run_dir / "checkpoints"
    shard = checkpoints / "step_4" / "mp_rank_00_model_states.pt"
    shard.write_bytes(shard.read_bytes()[: shard.stat().st_size // 2])
    result = run_cli("train", str(TINY_CONFIG), *RUN_ARGS, "--train.steps=3", "--checkpoint.keep_last=1",
                     *data_overrides(shakespeare, run_dir))
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    warning = next(line for line in result.stderr.splitlines() if "skipping checkpoint" in line)
    assert "WARNING" in warning and "step_4" in warning and "truncated" in warning, warning
    assert f"resumed from {checkpoints / 'step_2'} at step 2" in result.stderr
    assert sorted(p.name for p in checkpoints.glob("step_*")) == ["step_3", "step_4"]  # step_4: for a human
    assert (checkpoints / "step_3" / "COMMITTED").is_file() and (checkpoints / "latest").read_text() == "step_3\n"


@pytest.mark.parametrize("damage, message", [
    (lambda ckpt: _flip_byte(ckpt / "mp_rank_00_model_states.pt"), "sha256 does not match"),
    (lambda ckpt: (ckpt / "COMMITTED").unlink(), "not a complete checkpoint"),
])
def test_explicit_load_of_a_damaged_checkpoint_is_refused(shakespeare, saved_run, tmp_path, damage, message):
    checkpoint = _copy(saved_run, tmp_path, "seed") / "checkpoints" / "step_4"
    damage(checkpoint)
    result = run_cli("train", str(TINY_CONFIG), *RUN_ARGS, f"--checkpoint.load={checkpoint}",
                     *data_overrides(shakespeare, tmp_path / "run"))  # a new run: checkpoint.load is what it uses
    line = one_line_error(result)
    assert message in line and "step_4" in line, line


def test_a_checkpoint_of_another_model_shape_is_refused(shakespeare, saved_run, tmp_path):
    run_dir = _copy(saved_run, tmp_path)
    result = run_cli("train", str(TINY_CONFIG), *RUN_ARGS, "--model.hidden_size=128",
                     *data_overrides(shakespeare, run_dir))
    assert "model.hidden_size is 192 in the checkpoint and 128 in this config" in one_line_error(result)


def _steps_logged(run_dir: Path) -> int:
    try:
        lines = (run_dir / "metrics.jsonl").read_text().splitlines()
        return json.loads(lines[-1])["step"] if lines else 0
    except (OSError, ValueError):  # not there yet, or a line half written
        return 0


def test_a_restart_continues_from_its_own_checkpoint_not_checkpoint_load(shakespeare, saved_run, tmp_path):
    """Seeded from another run's step_2 (checkpoint.load), stopped by SIGTERM later (saves, exits 75); the very
    same command again continues from the run's own newer checkpoint (going back to step_2 lost the progress)."""
    from pretrain.fault_tolerance import REQUEUE_EXIT_CODE

    run_dir, seed = tmp_path / "run", saved_run / "checkpoints" / "step_2"
    command = [sys.executable, "-m", "pretrain", "train", str(TINY_CONFIG), *RUN_ARGS, "--train.steps=12",
               "--checkpoint.every_steps=0", f"--checkpoint.load={seed}", *data_overrides(shakespeare, run_dir)]
    proc = subprocess.Popen(command, cwd=REPO, env=cli_env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True)
    deadline = time.monotonic() + 300
    while _steps_logged(run_dir) < 4:  # two steps past the seed
        assert proc.poll() is None and time.monotonic() < deadline, proc.communicate()[1][-3000:]
        time.sleep(0.05)
    proc.send_signal(signal.SIGTERM)
    stdout, stderr = proc.communicate(timeout=300)
    assert proc.returncode == REQUEUE_EXIT_CODE, stdout[-3000:] + stderr[-3000:]
    assert f"resumed from {seed} at step 2" in stderr
    assert "checkpoint.load, since" in stderr and "has no complete checkpoint yet" in stderr, stderr[-3000:]
    stopped = _steps_logged(run_dir)
    assert stopped >= 4 and (run_dir / "checkpoints" / f"step_{stopped}" / "COMMITTED").is_file()

    again = subprocess.run(command, cwd=REPO, env=cli_env(), capture_output=True, text=True, timeout=600)
    assert again.returncode == 0, again.stdout[-3000:] + again.stderr[-3000:]
    assert f"resumed from {run_dir / 'checkpoints' / f'step_{stopped}'} at step {stopped}" in again.stderr
    assert "the newest complete checkpoint of this run" in again.stderr and "only seeds" in again.stderr
    assert f"resumed from {seed}" not in again.stderr


class _TouchFile:
    """Unpickling this runs ``os.system("touch PATH")``: what a malicious checkpoint would carry."""

    def __init__(self, path: Path):
        self.path = str(path)

    def __reduce__(self):
        import os

        return os.system, (f"touch {self.path}",)


def _plant(checkpoint: Path, name: str, payload) -> None:
    """Add ``payload`` to one file of ``checkpoint`` and re-write the commit marker's size and sha256 for it: an
    attacker who ships a checkpoint ships a matching marker."""
    from pretrain.checkpoint.writer import file_sha256

    file = checkpoint / name
    state = torch.load(file, weights_only=False)  # our own, untampered file
    state["extra"] = payload
    torch.save(state, file)
    marker = json.loads((checkpoint / "COMMITTED").read_text())
    marker["files"][name] = {"bytes": file.stat().st_size, "sha256": file_sha256(file)}
    (checkpoint / "COMMITTED").write_text(json.dumps(marker))


@pytest.mark.parametrize("command", [
    "train",  # same layout: DeepSpeed's load_checkpoint reads the file
    "train --parallel.zero_stage=1",  # another layout: resharding reads it
    "generate",  # inference: consolidation reads it
])
def test_a_checkpoint_whose_pickle_runs_code_is_refused_and_nothing_runs(shakespeare, saved_run, tmp_path,
                                                                        command):
    pwned = tmp_path / "pwned"
    checkpoint = _copy(saved_run, tmp_path, "downloaded") / "checkpoints" / "step_4"
    _plant(checkpoint, "mp_rank_00_model_states.pt", _TouchFile(pwned))
    if command == "generate":
        result = run_cli("generate", "--checkpoint", str(checkpoint), "--prompt", "ROMEO.", "--max-new-tokens", "2")
    else:
        result = run_cli(*command.split(), str(TINY_CONFIG), *RUN_ARGS, f"--checkpoint.load={checkpoint}",
                         *data_overrides(shakespeare, tmp_path / "run"))
    line = one_line_error(result)
    assert f"{checkpoint / 'mp_rank_00_model_states.pt'}: refused to unpickle posix.system" in line, line
    assert not pwned.exists()
