"""CheckpointWriter snapshots and hashes; CheckpointManager verification, fallback, the choice between the run's
own checkpoints and checkpoint.load, and pruning (no process group)."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch

from pretrain.errors import CheckpointError
from pretrain.checkpoint.manager import CheckpointManager
from pretrain.checkpoint.format import MARKER
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
    found = manager.resume_point()
    assert (found.path, found.marker) == (older, manager.verify(older))
    assert manager.bad_steps == ({4} if (newest / MARKER).exists() else set())  # without one it is not complete
    assert newest.exists()  # refusing loses nothing: the directory stays for a human to look at


def test_keep_last_prunes_all_but_the_newest_and_the_permanent_ones(tmp_path):
    for step in range(1, 8):
        _fake_checkpoint(tmp_path, step)
    (tmp_path / "step_8").mkdir()  # uncommitted: neither counted nor pruned here
    CheckpointManager(tmp_path, keep_last=2, keep_every=3)._prune(written=7)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["step_3", "step_6", "step_7", "step_8"]


def test_newest_complete_checkpoint_ignores_directories_without_a_marker(tmp_path):
    _fake_checkpoint(tmp_path, 2)
    shutil.copytree(tmp_path / "step_2", tmp_path / "step_9")
    (tmp_path / "step_9" / MARKER).unlink()
    manager = CheckpointManager(tmp_path)
    assert manager.complete_steps() == [2] and manager.latest() == tmp_path / "step_2"


def test_the_runs_own_checkpoints_win_over_checkpoint_load(tmp_path):
    """checkpoint.load seeds a run; once the run saved its own, a restart (same command) continues from those."""
    seed = _fake_checkpoint(tmp_path / "other_run", 10)
    manager = CheckpointManager(tmp_path / "run")
    first = manager.resume_point(explicit=str(seed))
    assert first.path == seed and "has no complete checkpoint yet" in first.reason
    _fake_checkpoint(tmp_path / "run", 12)  # the run's own, e.g. saved on SIGTERM
    again = manager.resume_point(explicit=str(seed))
    assert again.path == tmp_path / "run" / "step_12" and "only seeds" in again.reason
    _flip_byte(again.path / "mp_rank_00_model_states.pt")  # its own do not verify: back to the seed
    fallback = manager.resume_point(explicit=str(seed))
    assert fallback.path == seed and "none of the 1 complete checkpoints" in fallback.reason


class _FakeDeepSpeed:
    """Hands one model file to the checkpoint engine the manager sets, as DeepSpeed's save_checkpoint does."""

    checkpoint_engine = None

    def save_checkpoint(self, root: str, tag: str, save_latest: bool) -> None:
        self.checkpoint_engine.save({"module": {"w": torch.randn(8)}}, f"{root}/{tag}/mp_rank_00_model_states.pt")


def test_pruning_after_a_fallback_keeps_the_checkpoint_just_written(tmp_path):
    """Auto-resume skipped a corrupt step_4 and fell back to step_2; the run's next save is step_3 < 4. With
    keep_last=1, counting the corrupt step_4 as the newest deleted step_3 right after writing it."""
    _fake_checkpoint(tmp_path, 2)
    _truncate(_fake_checkpoint(tmp_path, 4) / "mp_rank_00_model_states.pt")
    manager = CheckpointManager(tmp_path, keep_last=1)
    assert manager.resume_point().path == tmp_path / "step_2"
    manager.save(3, _FakeDeepSpeed(), {"step": 3}, "model: {}\n")
    assert sorted(p.name for p in tmp_path.glob("step_*")) == ["step_3", "step_4"]  # step_4 left for a human
    assert manager.verify(tmp_path / "step_3")["step"] == 3 and (tmp_path / "latest").read_text() == "step_3\n"
    manager.save(4, _FakeDeepSpeed(), {"step": 4}, "model: {}\n")  # the corrupt step is replaced, then counted
    assert sorted(p.name for p in tmp_path.glob("step_*")) == ["step_4"] and not manager.bad_steps
