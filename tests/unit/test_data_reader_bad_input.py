"""ShardReader on bad input: corrupt, truncated, missing or resized shards, checksum and tokenizer mismatches;
each a one-line DataError naming the shard, or with on_bad_shard="skip" a deterministic, counted skip."""

import itertools
import json

import numpy as np
import pytest

from data_pipeline import DataError
from tests.unit.reader_support import (GB, damage_sha, keyset, manifest_rows, one_line, ranks, reader,  # noqa: F401
                                       shards, steps, tiny)


def test_skip_bad_shard_is_deterministic_counted_and_resumable(shards):
    damage_sha(shards, "shard-000003.tar")
    bad = keyset(manifest_rows(shards)[120:160])  # shard 3 holds rows 120..159
    with pytest.raises(DataError, match="shard-000003.tar: xxh3_128 does not match"):
        steps([reader(shards, micro_batch_size=GB, seed=1)], 80)
    with pytest.warns(RuntimeWarning, match="shard-000003.tar"):
        r = reader(shards, micro_batch_size=GB, seed=1, on_bad_shard="skip")
        ref, _ = steps([r], 80)
    assert r.skipped_shards == 1 and not keyset(ref.reshape(-1, 33)) & bad
    epoch0 = keyset(ref.reshape(-1, 33)[: 494 - 40])
    assert len(epoch0) == 494 - 40  # every other row once: the bad shard's rows are stepped over, not repeated
    state = r.state_dict()
    assert 40 <= state["positions"][0] - state["counts"][0] <= 80  # stream rows stepped over: not handed out
    with pytest.warns(RuntimeWarning):
        got, _ = steps(ranks(shards, 2, global_batch_size=GB, seed=1, on_bad_shard="skip"), 80)
        assert np.array_equal(got, ref)  # every rank skips the same rows
        in_workers = reader(shards, micro_batch_size=GB, seed=1, on_bad_shard="skip", num_workers=2)
        assert np.array_equal(steps([in_workers], 80)[0], ref) and in_workers.skipped_shards == 1
        head = ranks(shards, 2, global_batch_size=GB, seed=1, on_bad_shard="skip")
        part, _ = steps(head, 30)
        tail = reader(shards, micro_batch_size=4, global_batch_size=GB, seed=1, on_bad_shard="skip")
        tail.load_state_dict(head[1].state_dict())
        rest, _ = steps([tail], 50)
        # Mid-step, after the skip: the state keeps the position of the step's start.
        mid = reader(shards, global_batch_size=GB, seed=1, on_bad_shard="skip")
        first = list(itertools.islice(iter(mid), 4 * 70 + 1))
        again = reader(shards, global_batch_size=GB, seed=1, on_bad_shard="skip")
        again.load_state_dict(mid.state_dict())
        assert np.array_equal(next(iter(again)), ref[70, 2:4]) and np.array_equal(first[-1], ref[70, :2])
    assert np.array_equal(np.concatenate([part, rest]), ref)


def test_skip_truncated_tar_keeps_the_readable_blocks(shards):
    manifest = json.loads((shards / "manifest.json").read_text())
    for s in manifest["shards"]:
        del s["bytes"]
    (shards / "manifest.json").write_text(json.dumps(manifest))
    rows = manifest_rows(shards)
    path = shards / "shard-000000.tar"
    path.write_bytes(path.read_bytes()[:3000])  # cut inside the 2nd of 5 members (1536 bytes each)
    with pytest.warns(RuntimeWarning, match="shard-000000.tar"):
        r = reader(shards, micro_batch_size=1, shuffle=False, loop=False, verify_checksums=False,
                   on_bad_shard="skip")
        got = np.concatenate(list(r))  # one pass: ends where the (shortened) epoch ends
    kept = len(got) - (len(rows) - 40)  # rows kept from shard 0: whole blocks before the damage
    assert kept in (8, 16) and np.array_equal(got, np.concatenate([rows[:kept], rows[40:]]))
    assert r.skipped_shards == 1


def test_skip_all_but_one_shard_reads_the_good_one_every_epoch(shards):
    """With every shard but one corrupt, the good shard is read in every epoch: no "no readable shard" error at
    the epoch boundary, however far apart the good shard sits in consecutive epochs' orders (issue 21, item 5)."""
    from data_pipeline.sampler import SourcePlan

    manifest = json.loads((shards / "manifest.json").read_text())
    good = manifest_rows(shards)[:40]  # shard 0's rows
    plan = SourcePlan([s["sequences"] for s in manifest["shards"]], 8, seed=4, source=0)
    # The case that failed: good early in epoch 0, late in epoch 1, so more than an epoch's worth of windows
    # without a readable row lies between the two reads of it (position * 5 blocks / 8 blocks per window).
    assert plan.shard_order(0).tolist().index(0) <= 2 and plan.shard_order(1).tolist().index(0) >= 8
    for info in manifest["shards"][1:]:
        damage_sha(shards, info["name"])
    with pytest.warns(RuntimeWarning):
        r = reader(shards, micro_batch_size=GB, seed=4, on_bad_shard="skip")
        got, _ = steps([r], 15)  # 3 epochs of the one good shard: 40 rows = 5 global batches each
    assert r.skipped_shards == 12
    for epoch in got.reshape(3, 40, 33):  # every good row once per epoch, nothing else
        assert keyset(epoch) == keyset(good) and len(keyset(epoch)) == 40
    for info in manifest["shards"][:1]:
        damage_sha(shards, info["name"])  # now none is readable: stopped, one line, within a few epochs
    with pytest.raises(DataError, match="no readable shard in a whole epoch") as e:
        steps([reader(shards, micro_batch_size=GB, seed=4, on_bad_shard="skip")], 1)
    one_line(e, "manifest.json")


# ----- bad input: one-line DataError naming the file -----

def test_missing_manifest_and_missing_or_resized_shard(tmp_path, shards):
    with pytest.raises(DataError) as e:
        reader(tmp_path)
    one_line(e, "manifest.json")
    (shards / "shard-000004.tar").unlink()
    with pytest.raises(DataError, match="missing") as e:
        reader(shards)
    one_line(e, "shard-000004.tar")
    path = shards / "shard-000002.tar"
    path.write_bytes(path.read_bytes()[:3000])
    with pytest.raises(DataError, match="3000 bytes, manifest.json says") as e:
        reader(shards, on_bad_shard="error")
    one_line(e, "shard-000002.tar")  # the first problem in manifest order
    with pytest.warns(RuntimeWarning) as warned:  # skip: both are reported at open, on every rank alike
        r = reader(shards, on_bad_shard="skip", verify_checksums=False)
    assert r.skipped_shards == 2 and len(warned) == 2
    assert "shard-000002.tar" in str(warned[0].message) and "shard-000004.tar" in str(warned[1].message)


@pytest.mark.parametrize("num_workers", [0, 2])
def test_truncated_or_corrupt_tar_while_reading(shards, num_workers):
    manifest = json.loads((shards / "manifest.json").read_text())
    for s in manifest["shards"]:
        del s["bytes"]
    (shards / "manifest.json").write_text(json.dumps(manifest))
    cut = shards / "shard-000000.tar"
    cut.write_bytes(cut.read_bytes()[:3000])
    junk = shards / "shard-000001.tar"
    data = bytearray(junk.read_bytes())
    data[1536:1536 + 512] = b"\x07" * 512  # the 2nd member's header: garbage of the same size
    junk.write_bytes(bytes(data))
    for name, skip in (("shard-000000.tar", 0), ("shard-000001.tar", 40)):
        r = reader(shards, micro_batch_size=4, shuffle=False, verify_checksums=False, num_workers=num_workers,
                   shuffle_window_blocks=5)  # a window per shard: starting at shard 1 does not read shard 0
        r.load_state_dict({**r.state_dict(), "consumed_samples": skip, "counts": [skip], "positions": [skip]})
        with pytest.raises(DataError, match="truncated") as e:  # a garbage header reads as the archive's end
            list(itertools.islice(iter(r), 20))
        one_line(e, name)


def test_checksum_and_tokenizer_mismatch(tiny, shards):
    damage_sha(shards, "shard-000001.tar")
    r = reader(shards, micro_batch_size=4, shuffle=False)
    with pytest.raises(DataError, match="xxh3_128 does not match") as e:
        list(itertools.islice(iter(r), 20))  # shard 1 holds rows 40..79
    one_line(e, "shard-000001.tar")
    with pytest.raises(DataError, match="tokenizer") as e:
        reader(tiny["shards"], expected_tokenizer_sha256="0" * 64)
    one_line(e, "manifest.json")
    assert reader(tiny["shards"], expected_tokenizer_sha256=tiny["manifest"]["tokenizer_sha256"]).manifest
