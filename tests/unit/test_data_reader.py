"""ShardReader: determinism, DP split, exact resume, workers, and one-line errors for bad input."""

import itertools
import json
import shutil

import numpy as np
import pytest

from data_pipeline import DataError, ShardReader
from data_pipeline.testing import build_tiny_dataset

B = 4  # micro-batch size


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    # 13 shards: 12 x 40 sequences + 1 x 10, so a 3-way DP split is uneven.
    return build_tiny_dataset(tmp_path_factory.mktemp("tiny"))


@pytest.fixture
def shards(tiny, tmp_path):
    """A private copy of the shards that a test may damage."""
    return shutil.copytree(tiny["shards"], tmp_path / "shards")


def take(reader, n):
    return list(itertools.islice(iter(reader), n))


def rows_of(batches):
    return [row.tobytes() for b in batches for row in b]


def all_rows(tiny):
    """Every sequence in the dataset (read unshuffled, one rank, batch size 1: no truncation)."""
    return rows_of(ShardReader(str(tiny["shards"]), micro_batch_size=1, shuffle=False, loop=False))


def test_batches_shape_dtype_and_same_seed(tiny):
    r = ShardReader(str(tiny["shards"]), micro_batch_size=B, seed=7)
    assert r.seq_length == 32 and r.steps_per_epoch == tiny["manifest"]["num_sequences"] // B == 490 // B
    a = take(r, 30)
    assert all(x.shape == (B, 33) and x.dtype == np.int64 for x in a)
    b = take(ShardReader(str(tiny["shards"]), micro_batch_size=B, seed=7), 30)
    c = take(ShardReader(str(tiny["shards"]), micro_batch_size=B, seed=8), 30)
    assert all(np.array_equal(x, y) for x, y in zip(a, b))
    assert not all(np.array_equal(x, y) for x, y in zip(a, c))


def test_epoch_covers_every_row_once_and_reshuffles(tiny):
    every = all_rows(tiny)
    r = ShardReader(str(tiny["shards"]), micro_batch_size=B, seed=3, loop=False)
    e0 = rows_of(list(r))
    e1 = rows_of(list(r))  # stateful: the second pass is epoch 1
    assert len(e0) == len(e1) == (490 // B) * B and len(set(e0)) == len(e0)
    assert set(e0) <= set(every) and set(e1) <= set(every)
    assert e0 != e1 and e0 != every[: len(e0)]  # shuffled, differently per epoch
    assert r.state_dict()["epoch"] == 2


def test_non_looping_pass_stopped_early_ends_the_epoch(tiny):
    # Evaluation with a batch cap: every capped pass over an unshuffled reader sees the same batches.
    r = ShardReader(str(tiny["shards"]), micro_batch_size=B, shuffle=False, loop=False)
    first = take(r, 3)
    assert r.state_dict()["epoch"] == 1 and r.state_dict()["batch_in_epoch"] == 0
    again = take(r, 3)
    assert all(np.array_equal(x, y) for x, y in zip(first, again))
    assert len(list(r)) == r.steps_per_epoch


def test_unshuffled_order_is_the_shard_order(tiny):
    batches = take(ShardReader(str(tiny["shards"]), micro_batch_size=B, shuffle=False), 3)
    assert rows_of(batches) == all_rows(tiny)[: 3 * B]


@pytest.mark.parametrize("shuffle", [True, False])
def test_dp_ranks_disjoint_equal_steps_uneven_shards(tiny, shuffle):
    every = set(all_rows(tiny))
    readers = [ShardReader(str(tiny["shards"]), micro_batch_size=B, dp_rank=r, dp_size=3, seed=1,
                           shuffle=shuffle, loop=False) for r in range(3)]
    # 13 shards over 3 ranks: at least 4 each; with shuffling the guarantee is the 4 smallest (10+40+40+40),
    # without it the fixed split gives ranks 170, 160, 160 rows.
    steps = 130 // B if shuffle else 160 // B
    assert [r.steps_per_epoch for r in readers] == [steps] * 3
    for _epoch in range(2):
        per_rank = [rows_of(list(r)) for r in readers]
        assert [len(p) for p in per_rank] == [steps * B] * 3
        union = set().union(*per_rank)
        assert len(union) == sum(len(p) for p in per_rank) and union <= every  # disjoint, real rows


def test_resume_mid_epoch_and_across_epoch_boundary(tiny):
    steps = ShardReader(str(tiny["shards"]), micro_batch_size=B).steps_per_epoch
    full = take(ShardReader(str(tiny["shards"]), micro_batch_size=B, seed=5, dp_rank=1, dp_size=2), steps + 20)
    for cut in (17, steps - 1, steps, steps + 3):
        r = ShardReader(str(tiny["shards"]), micro_batch_size=B, seed=5, dp_rank=1, dp_size=2)
        head = take(r, cut)
        state = json.loads(json.dumps(r.state_dict()))  # as a checkpoint stores it
        resumed = ShardReader(str(tiny["shards"]), micro_batch_size=B, seed=5, dp_rank=1, dp_size=2)
        resumed.load_state_dict(state)
        tail = take(resumed, steps + 20 - cut)
        assert all(np.array_equal(x, y) for x, y in zip(head + tail, full)), f"cut at {cut}"


def test_state_dict_values_and_bad_position(tiny):
    r = ShardReader(str(tiny["shards"]), micro_batch_size=B)
    take(r, r.steps_per_epoch + 2)
    assert r.state_dict()["epoch"] == 1 and r.state_dict()["batch_in_epoch"] == 2
    with pytest.raises(DataError, match="batch_in_epoch=9999"):
        r.load_state_dict({"epoch": 0, "batch_in_epoch": 9999})
    with pytest.warns(UserWarning, match="micro_batch_size 8 -> 4"):
        r.load_state_dict({"epoch": 0, "batch_in_epoch": 1, "micro_batch_size": 8})


def test_workers_give_the_same_stream(tiny):
    kw = dict(micro_batch_size=B, seed=2, dp_rank=0, dp_size=2)
    steps = ShardReader(str(tiny["shards"]), **kw).steps_per_epoch
    ref = take(ShardReader(str(tiny["shards"]), **kw), steps + 9)  # crosses an epoch boundary
    got = take(ShardReader(str(tiny["shards"]), num_workers=2, **kw), steps + 9)
    assert all(np.array_equal(x, y) for x, y in zip(ref, got)) and len(got) == len(ref)
    # Resume with workers from a position saved without them (odd offset: worker 0 starts mid-stream).
    r = ShardReader(str(tiny["shards"]), num_workers=2, loop=False, **kw)
    r.load_state_dict({"epoch": 0, "batch_in_epoch": 7})
    rest = list(r)
    assert len(rest) == steps - 7 and all(np.array_equal(x, y) for x, y in zip(rest, ref[7:steps]))
    assert r.state_dict()["epoch"] == 1 and r.state_dict()["batch_in_epoch"] == 0


# ----- bad input: one-line DataError naming the file -----

def assert_one_line(exc_info, name):
    msg = str(exc_info.value)
    assert "\n" not in msg and name in msg, msg


def test_missing_manifest(tmp_path):
    with pytest.raises(DataError) as e:
        ShardReader(str(tmp_path), micro_batch_size=B)
    assert_one_line(e, "manifest.json")


def test_missing_shard(shards):
    (shards / "shard-000004.tar").unlink()
    with pytest.raises(DataError) as e:
        ShardReader(str(shards), micro_batch_size=B)
    assert_one_line(e, "shard-000004.tar")


def test_truncated_shard_detected_at_open(shards):
    path = shards / "shard-000002.tar"
    path.write_bytes(path.read_bytes()[:3000])
    with pytest.raises(DataError, match="truncated") as e:
        ShardReader(str(shards), micro_batch_size=B, verify_checksums=False)
    assert_one_line(e, "shard-000002.tar")


@pytest.mark.parametrize("num_workers", [0, 2])
def test_truncated_tar_detected_while_reading(shards, num_workers):
    # Even with sizes and checksums out of the way, reading a cut tar fails cleanly.
    manifest = json.loads((shards / "manifest.json").read_text())
    for s in manifest["shards"]:
        del s["bytes"]
    (shards / "manifest.json").write_text(json.dumps(manifest))
    path = shards / "shard-000000.tar"
    path.write_bytes(path.read_bytes()[:3000])  # cut inside the 3rd member
    r = ShardReader(str(shards), micro_batch_size=B, shuffle=False, verify_checksums=False,
                    num_workers=num_workers)
    with pytest.raises(DataError, match="truncated") as e:
        take(r, 20)
    assert_one_line(e, "shard-000000.tar")


def test_checksum_mismatch(shards):
    path = shards / "shard-000001.tar"
    data = bytearray(path.read_bytes())
    data[1000] ^= 0xFF  # same size, different bytes (inside token data)
    path.write_bytes(bytes(data))
    r = ShardReader(str(shards), micro_batch_size=B, shuffle=False)
    with pytest.raises(DataError, match="sha256") as e:
        take(r, 30)  # shard 1 holds rows 40..79
    assert_one_line(e, "shard-000001.tar")


def test_tokenizer_mismatch(tiny):
    with pytest.raises(DataError, match="tokenizer") as e:
        ShardReader(str(tiny["shards"]), micro_batch_size=B, expected_tokenizer_sha256="0" * 64)
    assert_one_line(e, "manifest.json")
    ok = ShardReader(str(tiny["shards"]), micro_batch_size=B,
                     expected_tokenizer_sha256=tiny["manifest"]["tokenizer_sha256"])
    assert ok.manifest["tokenizer_sha256"] == tiny["manifest"]["tokenizer_sha256"]


def test_too_few_shards_for_dp_size(tiny):
    with pytest.raises(DataError, match="13 shard.*dp_size=16") as e:
        ShardReader(str(tiny["shards"]), micro_batch_size=B, dp_rank=0, dp_size=16)
    assert_one_line(e, "manifest.json")
