"""Resuming on 2 ranks: rank 0 chooses the checkpoint and every rank loads that one, or every rank fails with the
same one-line error.

Each rank runs in its own working directory and the checkpoint directory is the relative path ``checkpoints``, as
a run directory on node-local storage would be: with one directory for both ranks they agree (and a corruption
only rank 1's share of the hashing finds makes both fall back); with an empty directory on rank 1, or another run's
checkpoints there, rank 1 cannot see or reads another commit marker, and both ranks stop with the same message.
"""

from __future__ import annotations

import os

from tests.unit.test_checkpoint_manager import _fake_checkpoint, _flip_byte


def choose(dirs_by_rank: list[dict[str, str]]) -> dict[str, dict]:
    """In a spawned group: for each scenario {name: this rank's working directory}, resume_point() on a manager
    of ``checkpoints``; {name: {"path", "digest", "bad_steps"} or {"error": type and message}} on every rank."""
    import torch.distributed as dist

    from pretrain.errors import CheckpointError
    from pretrain.checkpoint.manager import CheckpointManager

    results = {}
    for name, directory in dirs_by_rank[dist.get_rank()].items():
        os.chdir(directory)
        manager = CheckpointManager("checkpoints")
        try:
            found = manager.resume_point()
            results[name] = {"path": str(found.path), "digest": found.digest, "bad_steps": manager.bad_steps}
        except CheckpointError as e:
            results[name] = {"error": f"{type(e).__name__}: {e}"}
    return results


def test_ranks_load_rank_0s_choice_or_all_fail_alike(tmp_path):
    from pretrain.testing import run_distributed

    shared, empty, other = (tmp_path / name for name in ("shared", "empty", "other"))
    _fake_checkpoint(shared / "checkpoints", 2)
    # Files hash round-robin in name order: config.yaml on rank 0, mp_rank_00_model_states.pt on rank 1.
    _flip_byte(_fake_checkpoint(shared / "checkpoints", 4) / "mp_rank_00_model_states.pt")
    empty.mkdir()
    _fake_checkpoint(other / "checkpoints", 4)  # the same step names, other contents
    scenarios = [{"shared": shared, "rank 1 sees nothing": shared, "rank 1 sees another run": shared},
                 {"shared": shared, "rank 1 sees nothing": empty, "rank 1 sees another run": other}]
    rank0, rank1 = run_distributed(choose, 2, args=([{k: str(v) for k, v in s.items()} for s in scenarios],),
                                   timeout_s=300)
    assert rank0 == rank1, (rank0, rank1)  # the same outcome, to the message, on both ranks
    assert rank0["shared"]["path"] == "checkpoints/step_2" and rank0["shared"]["bad_steps"] == {4}
    nothing, another = rank0["rank 1 sees nothing"]["error"], rank0["rank 1 sees another run"]["error"]
    assert nothing.startswith("CheckpointDisagreement: rank 1: checkpoints/step_4: not a complete checkpoint")
    assert "but rank 0 reads it" in nothing and "\n" not in nothing, nothing
    assert another.startswith("CheckpointDisagreement: checkpoints/step_4: rank 1 reads another COMMITTED marker")
    assert "\n" not in another, another
