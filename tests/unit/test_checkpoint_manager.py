"""CheckpointWriter snapshots and hashes; CheckpointManager verification, fallback and pruning (no process group)."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch

from pretrain.checkpoint import CheckpointError, CheckpointManager
from pretrain.checkpoint.manager import MARKER
from pretrain.checkpoint.writer import CheckpointWriter, file_sha256


def test_writer_saves_the_state_as_it_was_when_added(tmp_path):
    weight = torch.arange(4.0)
    writer = CheckpointWriter()
    writer.add({"w": weight, "step": 3}, tmp_path / "a.pt")
    weight.add_(100)  # training goes on while the write is pending
    writer.start()
    writer.join()
    assert writer.done()
    saved = torch.load(tmp_path / "a.pt")
    assert torch.equal(saved["w"], torch.arange(4.0)) and saved["step"] == 3
    meta = writer.written["a.pt"]
    assert meta == {"bytes": (tmp_path / "a.pt").stat().st_size, "sha256": file_sha256(tmp_path / "a.pt")}


def test_writer_reraises_a_failed_background_write(tmp_path):
    (tmp_path / "blocker").write_text("a file where the writer needs a directory")
    writer = CheckpointWriter()
    writer.add({"w": torch.ones(2)}, tmp_path / "blocker" / "a.pt")
    writer.start()
    with pytest.raises(RuntimeError, match="checkpoint write failed"):
        writer.join()


def _fake_checkpoint(root: Path, step: int) -> Path:
    """A committed directory with two files and a marker listing their sizes and checksums."""
    path = root / f"step_{step}"
    path.mkdir(parents=True)
    torch.save({"w": torch.randn(64)}, path / "mp_rank_00_model_states.pt")
    (path / "config.yaml").write_text("model: {}\n")
    files = {p.name: {"bytes": p.stat().st_size, "sha256": file_sha256(p)} for p in sorted(path.iterdir())}
    (path / MARKER).write_text(json.dumps({"step": step, "world_size": 1, "layout": {}, "files": files}))
    return path


def _truncate(file: Path) -> None:
    file.write_bytes(file.read_bytes()[:-10])


def _flip_byte(file: Path) -> None:
    data = bytearray(file.read_bytes())
    data[len(data) // 2] ^= 0xFF
    file.write_bytes(bytes(data))


@pytest.mark.parametrize("damage, message", [
    (lambda p: _truncate(p / "mp_rank_00_model_states.pt"), "the marker says"),
    (lambda p: _flip_byte(p / "mp_rank_00_model_states.pt"), "sha256 does not match"),
    (lambda p: (p / "mp_rank_00_model_states.pt").unlink(), "missing"),
    (lambda p: (p / MARKER).unlink(), "not a complete checkpoint"),
    (lambda p: (p / MARKER).write_text("{not json"), "unreadable commit marker"),
])
def test_a_damaged_checkpoint_is_refused_in_one_line_and_resume_falls_back(tmp_path, damage, message):
    manager = CheckpointManager(tmp_path)
    older, newest = _fake_checkpoint(tmp_path, 2), _fake_checkpoint(tmp_path, 4)
    assert manager.verify(newest)["step"] == 4
    damage(newest)
    with pytest.raises(CheckpointError, match=message) as error:
        manager.verify(newest)
    assert "\n" not in str(error.value) and "step_4" in str(error.value)
    assert manager.latest_verified() == (older, manager.verify(older))
    assert newest.exists()  # refusing loses nothing: the directory stays for a human to look at


def test_keep_last_prunes_all_but_the_newest_and_the_permanent_ones(tmp_path):
    for step in range(1, 8):
        _fake_checkpoint(tmp_path, step)
    (tmp_path / "step_8").mkdir()  # uncommitted: neither counted nor pruned here
    CheckpointManager(tmp_path, keep_last=2, keep_every=3)._prune()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["step_3", "step_6", "step_7", "step_8"]


def test_newest_complete_checkpoint_ignores_directories_without_a_marker(tmp_path):
    _fake_checkpoint(tmp_path, 2)
    shutil.copytree(tmp_path / "step_2", tmp_path / "step_9")
    (tmp_path / "step_9" / MARKER).unlink()
    manager = CheckpointManager(tmp_path)
    assert manager.complete_steps() == [2] and manager.latest() == tmp_path / "step_2"
