"""StreamReader: Transformer-XL ordered lanes, contiguous across segments, restarts, dp changes and epochs.
ShardReader's read-ahead thread: the same stream, positions and errors as without it, and no thread left over."""

import gc
import itertools
import json
import shutil
import threading
import time
import warnings

import numpy as np
import pytest

from data_pipeline import DataError, ShardReader
from data_pipeline.stream import StreamReader
from data_pipeline.tario import ReadAhead
from data_pipeline.testing import build_tiny_dataset
from tests.unit.test_data_reader import damage_sha, manifest_rows

BATCH, TGT = 4, 10


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    return build_tiny_dataset(tmp_path_factory.mktemp("tiny"))


def reference_segments(shard_dir, batch_size, tgt_len):
    """The reference LMOrderedIterator layout, from rows read with plain tarfile: [segments, batch, tgt+1]."""
    stream = manifest_rows(shard_dir).reshape(-1)  # rows are cut from one stream without overlap
    n_step = len(stream) // batch_size
    data = stream[: n_step * batch_size].reshape(batch_size, n_step)  # [b, L]: lane b = b-th contiguous part
    return np.stack([data[:, i: i + tgt_len + 1] for i in range(0, n_step - tgt_len, tgt_len)])


def take(reader, n, it=None):
    it = it or iter(reader)
    return np.stack(list(itertools.islice(it, n))), it


def test_segments_follow_the_reference_layout_and_loop_epochs(tiny):
    ref = reference_segments(tiny["shards"], BATCH, TGT)
    r = StreamReader(str(tiny["shards"]), batch_size=BATCH, tgt_len=TGT)
    assert r.segments_per_epoch == len(ref) == (16302 // BATCH - 1) // TGT
    got, it = take(r, len(ref) - 1)
    assert got.dtype == np.int64 and got.shape[1:] == (BATCH, TGT + 1)
    assert np.array_equal(got, ref[:-1])
    assert np.array_equal(got[1:, :, 0], got[:-1, :, -1])  # row b of segment k+1 continues row b of segment k
    assert r.reset_lanes is False
    last, _ = take(r, 2, it)  # the epoch's last segment, then the lanes restart
    assert np.array_equal(last[0], ref[-1]) and np.array_equal(last[1], ref[0])
    assert r.reset_lanes is True and r.state_dict()["epoch"] == 1


@pytest.mark.parametrize("dp", [2, 4])
def test_dp_ranks_hold_their_lanes(tiny, dp):
    ref = reference_segments(tiny["shards"], BATCH, TGT)
    per_rank = [take(StreamReader(str(tiny["shards"]), batch_size=BATCH, tgt_len=TGT, dp_rank=k, dp_size=dp), 30)[0]
                for k in range(dp)]
    assert all(p.shape == (30, BATCH // dp, TGT + 1) for p in per_rank)
    assert np.array_equal(np.concatenate(per_rank, axis=1), ref[:30])


@pytest.mark.parametrize("before,after", [(1, 1), (2, 1), (1, 2), (2, 4)])
def test_restart_is_exact_across_dp_changes_and_epochs(tiny, before, after):
    ref = reference_segments(tiny["shards"], BATCH, TGT)
    S = len(ref)
    for cut in (5, S - 2, S + 3):
        head = StreamReader(str(tiny["shards"]), batch_size=BATCH, tgt_len=TGT, dp_size=before)
        take(head, cut)
        state = json.loads(json.dumps(head.state_dict()))
        tails = [StreamReader(str(tiny["shards"]), batch_size=BATCH, tgt_len=TGT, dp_rank=k, dp_size=after)
                 for k in range(after)]
        for t in tails:
            t.load_state_dict(state)
        rest = np.concatenate([take(t, 4)[0] for t in tails], axis=1)
        want = np.stack([ref[(cut + i) % S] for i in range(4)])
        assert np.array_equal(rest, want), f"cut at {cut}"
        assert tails[0].reset_lanes == ((cut + 3) % S == 0)


def test_lanes_seek_without_reading_earlier_shards(tiny, monkeypatch):
    import data_pipeline.stream as stream_module
    from data_pipeline.testing import spy_on_read_shard

    opened = spy_on_read_shard(stream_module, monkeypatch)
    r = StreamReader(str(tiny["shards"]), batch_size=2, tgt_len=TGT, dp_rank=1, dp_size=2)
    r.load_state_dict({**r.state_dict(), "offset": 2000})
    seg = next(iter(r))
    stream = manifest_rows(tiny["shards"]).reshape(-1)
    start = 16302 // 2 + 2000  # lane 1 begins half way through the stream
    assert np.array_equal(seg[0], stream[start: start + TGT + 1])
    shard, block = divmod(start // 33 // 8, 5)  # rows of 33 tokens, 8 per block, 5 blocks per shard
    assert opened == [(shard, block)]  # straight to the block: no earlier shard or block is read


def test_validation_pass_and_errors(tiny, tmp_path):
    ref = reference_segments(tiny["shards"], BATCH, TGT)
    once = StreamReader(str(tiny["shards"]), batch_size=BATCH, tgt_len=TGT, loop=False)
    assert np.array_equal(np.stack(list(once)), ref)
    assert np.array_equal(next(iter(once)), ref[0])  # every pass starts at the beginning
    with pytest.raises(DataError, match="batch_size 4"):
        once.load_state_dict({"version": 1, "epoch": 0, "offset": 0, "batch_size": 8, "tgt_len": TGT})
    with pytest.raises(DataError, match="no segment"):
        StreamReader(str(tiny["shards"]), batch_size=4000, tgt_len=TGT)
    with pytest.raises(DataError, match="tokenizer") as e:
        StreamReader(str(tiny["shards"]), batch_size=BATCH, tgt_len=TGT, expected_tokenizer_sha256="0" * 64)
    assert "\n" not in str(e.value) and "manifest.json" in str(e.value)
    shards = shutil.copytree(tiny["shards"], tmp_path / "shards")
    damage_sha(shards, "shard-000000.tar")
    with pytest.raises(DataError, match="xxh3_128 does not match") as e:
        next(iter(StreamReader(str(shards), batch_size=BATCH, tgt_len=TGT)))
    assert "\n" not in str(e.value) and "shard-000000.tar" in str(e.value)
    (shards / "shard-000003.tar").unlink()
    with pytest.raises(DataError, match="missing") as e:
        StreamReader(str(shards), batch_size=BATCH, tgt_len=TGT)
    assert "shard-000003.tar" in str(e.value)


def test_pipe_urls_give_the_same_stream(tiny):
    d, n = tiny["shards"], len(tiny["manifest"]["shards"])
    spec = {"manifest": f"pipe:cat {d}/manifest.json", "shards": [f"pipe:cat {d}/shard-{i:06d}.tar" for i in range(n)]}
    got, _ = take(StreamReader(spec, batch_size=BATCH, tgt_len=TGT), 20)
    assert np.array_equal(got, reference_segments(d, BATCH, TGT)[:20])


# ----- ShardReader's read-ahead thread -----

def read_ahead_threads():
    return [t for t in threading.enumerate() if t.name == "shard-read-ahead" and t.is_alive()]


def gone(timeout=5.0):
    """True once no read-ahead thread runs (a garbage-collected one notices its stop event within ~0.1 s).

    Collects garbage first: an earlier test's abandoned reader can sit in a reference cycle (a DataError's
    traceback holds the frame that holds the reader) until the cyclic collector happens to run, which makes the
    outcome depend on test order."""
    gc.collect()
    deadline = time.monotonic() + timeout
    while read_ahead_threads() and time.monotonic() < deadline:
        time.sleep(0.02)
    return not read_ahead_threads()


def run(shards, n, read_ahead, state=None, **kw):
    """n micro-batches, then (state, last indices, skipped shards), from a fresh reader."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)  # skip messages: compared via skipped_shards
        r = ShardReader(str(shards), micro_batch_size=2, global_batch_size=8, read_ahead=read_ahead, **kw)
        if state is not None:
            r.load_state_dict(state)
        it = iter(r)
        got = np.stack(list(itertools.islice(it, n)))
        it.close()
    return got, r.state_dict(), r.last_indices.tolist(), r.skipped_shards


@pytest.mark.parametrize("kw", [{"seed": 3}, {"shuffle": False, "shuffle_window_blocks": 3},
                                {"seed": 1, "on_bad_shard": "skip", "dp_size": 2, "dp_rank": 1}])
def test_read_ahead_gives_the_same_rows_positions_and_skips(tiny, tmp_path, kw):
    shards = shutil.copytree(tiny["shards"], tmp_path / "shards")
    if kw.get("on_bad_shard") == "skip":
        damage_sha(shards, "shard-000003.tar")
    n = 2 * 494 // 2 + 7  # past two epochs
    inline = run(shards, n, False, **kw)
    ahead = run(shards, n, True, **kw)
    assert np.array_equal(inline[0], ahead[0]) and inline[1:] == ahead[1:]
    state = run(shards, 101, True, **kw)[1]  # resume mid-way, with and without the thread
    tails = [run(shards, 150, flag, state, **kw) for flag in (True, False)]
    assert np.array_equal(tails[0][0], inline[0][101:251]) and np.array_equal(tails[1][0], tails[0][0])
    assert tails[0][1:3] == tails[1][1:3] and gone()


def test_read_ahead_errors_are_the_same_one_line_data_error(tiny, tmp_path):
    shards = shutil.copytree(tiny["shards"], tmp_path / "shards")
    damage_sha(shards, "shard-000002.tar")  # found by the thread's checksum (xxh3_128)
    manifest = json.loads((shards / "manifest.json").read_text())
    for info in manifest["shards"]:
        del info["bytes"]  # no size check at open: the cut is found by the thread's read
    (shards / "manifest.json").write_text(json.dumps(manifest))
    cut = shards / "shard-000004.tar"
    cut.write_bytes(cut.read_bytes()[:3000])
    outcomes = {}
    for read_ahead in (False, True):
        for verify in (True, False):
            r = ShardReader(str(shards), micro_batch_size=4, shuffle=False, verify_checksums=verify,
                            read_ahead=read_ahead)
            got = []
            with pytest.raises(DataError) as e:
                got.extend(itertools.islice(iter(r), 200))
            outcomes[read_ahead, verify] = (str(e.value), len(got), r.state_dict())
    assert outcomes[True, True] == outcomes[False, True] and outcomes[True, False] == outcomes[False, False]
    assert "shard-000002.tar: xxh3_128 does not match" in outcomes[True, True][0]
    assert "shard-000004.tar: truncated" in outcomes[True, False][0]
    assert all("\n" not in m for m, _, _ in outcomes.values()) and gone()
    # An unexpected exception in the thread is re-raised by the consumer, after the items before it.
    def items():
        yield 1
        raise ValueError("boom")
    ahead = ReadAhead(items())
    assert next(ahead) == 1
    with pytest.raises(ValueError, match="boom"):
        next(ahead)
    assert list(ahead) == [] and gone()


def test_no_read_ahead_thread_outlives_its_iterator(tiny):
    r = ShardReader(str(tiny["shards"]), micro_batch_size=2, global_batch_size=8)
    it = iter(r)
    next(it)
    assert len(read_ahead_threads()) == 1
    it.close()
    assert not read_ahead_threads()  # close() joins the thread
    it = iter(r)
    next(it)
    del it  # abandoned: the generator's finally stops the thread
    gc.collect()
    assert gone()
    closed = []

    def endless():
        try:
            yield from itertools.count()
        finally:
            closed.append(True)
    ahead = ReadAhead(endless(), depth=2)
    assert next(ahead) == 0 and read_ahead_threads()
    del ahead  # garbage: its __del__ sets the stop event; the thread closes the iterator and ends
    gc.collect()
    assert gone() and closed == [True]


def test_shard_mappings_are_kept_between_epochs_until_the_file_changes(tiny, tmp_path):
    from data_pipeline.stream import Verifier, read_shard, resolve_source

    shards = shutil.copytree(tiny["shards"], tmp_path / "shards")
    src, verifier, path = resolve_source(str(shards)), Verifier(), shards / "shard-000000.tar"
    first = [rows.copy() for _, rows in read_shard(src, 0, verifier=verifier)]
    with open(path, "rb") as f:
        kept = verifier.mapped(f)
    with open(path, "rb") as f:
        assert verifier.mapped(f) is kept  # a later epoch reuses the mapping: no page faults again
    data = path.read_bytes()
    path.rename(tmp_path / "old.tar")  # kept: the new file cannot get its inode
    path.write_bytes(data)  # the same bytes in a new file: a new identity, mapped afresh
    with open(path, "rb") as f:
        assert verifier.mapped(f) is not kept
    again = [rows for _, rows in read_shard(src, 0, verifier=verifier)]
    assert len(again) == len(first) and all(np.array_equal(a, b) for a, b in zip(again, first))
