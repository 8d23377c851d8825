"""safe_load: checkpoint files load with weights_only=True and our allow-list; a pickle that would run code is
refused in one line naming the file, and nothing of it runs."""

from __future__ import annotations

import os
import random

import numpy as np
import pytest
import torch

from pretrain.errors import CheckpointError
from pretrain.checkpoint.safe_load import load_checkpoint_file, safe_torch_load


class TouchFile:
    """Unpickling this runs ``os.system("touch PATH")``: what a malicious checkpoint would carry."""

    def __init__(self, path):
        self.path = str(path)

    def __reduce__(self):
        return os.system, (f"touch {self.path}",)


class ExecCode:
    """Unpickling this runs Python source through ``builtins.exec``."""

    def __init__(self, path):
        self.path = str(path)

    def __reduce__(self):
        return exec, (f"open({self.path!r}, 'w').close()",)


@pytest.mark.parametrize("payload, names", [(TouchFile, ("posix.system", "os.system")), (ExecCode, ("exec",))])
def test_a_pickle_that_runs_code_is_refused_and_nothing_runs(tmp_path, payload, names):
    marker = tmp_path / "pwned"
    file = tmp_path / "mp_rank_00_model_states.pt"
    torch.save({"module": {"w": torch.ones(2)}, "extra": payload(marker)}, file)
    with pytest.raises(CheckpointError) as error:
        load_checkpoint_file(file, map_location="cpu")
    message = str(error.value)
    assert "\n" not in message and str(file) in message and any(name in message for name in names), message
    assert not marker.exists()
    with safe_torch_load(), pytest.raises(CheckpointError):  # library code calling torch.load(weights_only=False)
        torch.load(file, map_location="cpu", weights_only=False)
    assert not marker.exists()
    torch.load(file, weights_only=False)  # the unsafe load this module replaces would have run it
    assert marker.exists()


def test_our_train_state_types_load(tmp_path):
    """A train state as the trainer saves it: Python's and numpy's RNG states, torch's, counters, data position."""
    state = {"trainer": {"step": 3, "recent_losses": (1.5, 2.0)}, "data": {"counts": [4], "weights": [1.0]},
             "rng": {"python": random.getstate(), "numpy": np.random.get_state(), "torch": torch.get_rng_state(),
                     "cuda": None, "tracker": {"model-parallel-rng": torch.get_rng_state()}},
             "memory": [torch.zeros(2, 3)]}
    torch.save(state, tmp_path / "train_state_rank00000.pt")
    loaded = load_checkpoint_file(tmp_path / "train_state_rank00000.pt")
    assert loaded["rng"]["python"] == state["rng"]["python"] and loaded["trainer"] == state["trainer"]
    numpy_state = loaded["rng"]["numpy"]
    assert numpy_state[0] == "MT19937" and np.array_equal(numpy_state[1], state["rng"]["numpy"][1])
    np.random.set_state(numpy_state)  # usable as it is
    assert torch.equal(loaded["rng"]["torch"], state["rng"]["torch"])


def test_a_file_that_is_not_a_checkpoint_is_one_line(tmp_path):
    file = tmp_path / "train_state_rank00000.pt"
    file.write_bytes(b"not a torch file at all")
    with pytest.raises(CheckpointError, match="not a readable torch checkpoint file") as error:
        load_checkpoint_file(file)
    assert "\n" not in str(error.value) and str(file) in str(error.value)


def test_safe_torch_load_loads_for_library_code_and_restores_torch_load(tmp_path):
    torch.save({"w": torch.arange(3.0), "rng": np.random.get_state()}, tmp_path / "a.pt")
    original = torch.load
    with pytest.raises(KeyError), safe_torch_load():
        assert torch.load is not original
        loaded = torch.load(tmp_path / "a.pt", "cpu", weights_only=False, mmap=True)  # as zero_to_fp32 calls it
        assert torch.equal(loaded["w"], torch.arange(3.0)) and loaded["rng"][0] == "MT19937"
        raise KeyError("leaving the block by an error")
    assert torch.load is original
