"""ShardReader: global order, DP slicing, exact resume across dp/micro changes, blending, workers, URLs.
Bad input (corrupt, truncated, missing shards; checksum and tokenizer mismatches): test_data_reader_bad_input.py."""

import itertools
import json
import os

import numpy as np
import pytest

from data_pipeline import DataError, ShardReader
from tests.unit.reader_support import (GB, damage_sha, keyset, manifest_rows, one_line, others, ranks,  # noqa: F401
                                       reader, shards, steps, tiny)


def test_shape_dtype_and_seeded_determinism(tiny):
    a, _ = steps([reader(tiny["shards"], seed=7, global_batch_size=GB)], 20)
    b, _ = steps([reader(tiny["shards"], seed=7, global_batch_size=GB)], 20)
    c, _ = steps([reader(tiny["shards"], seed=8, global_batch_size=GB)], 20)
    r = reader(tiny["shards"])
    first = next(iter(r))
    assert first.shape == (2, 33) and first.dtype == np.int64 and r.seq_length == 32
    assert r.last_indices.tolist() == [0, 1] and r.num_batches is None
    assert np.array_equal(a, b) and not np.array_equal(a, c)


@pytest.mark.parametrize("num_workers", [0, 2])
def test_native_dtype_gives_the_same_tokens_and_states(tiny, num_workers):
    kw = dict(global_batch_size=GB, seed=5, num_workers=num_workers)
    wide, native = reader(tiny["shards"], **kw), reader(tiny["shards"], dtype="native", **kw)
    a = list(itertools.islice(iter(wide), 40))
    b = list(itertools.islice(iter(native), 40))
    assert b[0].dtype == np.uint16 and a[0].dtype == np.int64
    assert all(np.array_equal(x, y) for x, y in zip(a, b)) and wide.state_dict() == native.state_dict()
    with pytest.raises(ValueError, match="dtype int64|native"):
        reader(tiny["shards"], dtype="int32")


def test_epoch_is_a_permutation_and_unshuffled_is_manifest_order(tiny):
    rows = manifest_rows(tiny["shards"])
    n = len(rows)
    r = reader(tiny["shards"], micro_batch_size=1, seed=3)
    e0 = np.concatenate(list(itertools.islice(iter(r), n)))
    assert sorted(keyset(e0)) == sorted(keyset(rows)) and len(keyset(e0)) == n
    assert not np.array_equal(e0, rows)
    plain = reader(tiny["shards"], micro_batch_size=1, shuffle=False)
    assert np.array_equal(np.concatenate(list(itertools.islice(iter(plain), n + 5))), np.concatenate([rows, rows[:5]]))


@pytest.mark.parametrize("dp", [2, 4])
def test_dp_ranks_tile_each_global_batch_and_tp_peers_agree(tiny, dp):
    ref, _ = steps([reader(tiny["shards"], micro_batch_size=GB, seed=1)], 70)  # dp=1: the global batches
    rs = ranks(tiny["shards"], dp, seed=1, global_batch_size=GB, micro_batch_size=GB // dp // 2 or 1)
    got, its = steps(rs, 70)
    assert np.array_equal(got, ref)  # union over ranks == the dp=1 global batch, in rank order, every step
    peer, _ = steps([reader(tiny["shards"], dp_rank=1, dp_size=dp, seed=1, global_batch_size=GB,
                            micro_batch_size=rs[1].micro_batch_size)], 70)
    lo = GB // dp
    assert np.array_equal(peer[:, :lo], ref[:, lo: 2 * lo])  # a TP/PP peer of rank 1 sees rank 1's rows
    assert rs[1].last_indices.tolist() == list(range(69 * GB + 2 * lo - rs[1].micro_batch_size, 69 * GB + 2 * lo))
    assert all(r.state_dict() == rs[0].state_dict() for r in rs)  # the position does not depend on the rank


def blended(tiny, others):
    return [{"path": str(tiny["shards"]), "weight": 0.7}, {"path": str(others[0]), "weight": 0.2},
            {"manifest": str(others[1] / "manifest.json"), "weight": 0.1}]


@pytest.mark.parametrize("before,after", [((2, 2), (2, 2)), ((2, 2), (1, 2)), ((1, 2), (2, 2)), ((2, 2), (2, 4))])
def test_resume_exact_across_dp_and_micro_batch_changes(tiny, others, before, after):
    src = blended(tiny, others)
    ref, _ = steps([reader(src, micro_batch_size=GB, seed=5)], 80)
    for cut in (3, 61):  # 61: the main source's first epoch (494 rows) ends inside step 62
        head = ranks(src, before[0], micro_batch_size=before[1], global_batch_size=GB, seed=5)
        got, _ = steps(head, cut)
        state = json.loads(json.dumps(head[0].state_dict()))  # as a checkpoint stores it
        assert state["consumed_samples"] == cut * GB and state["micro_batch"] == 0
        tail = ranks(src, after[0], micro_batch_size=after[1], global_batch_size=GB, seed=5)
        for r in tail:
            r.load_state_dict(state)
        rest, _ = steps(tail, 80 - cut)
        assert np.array_equal(np.concatenate([got, rest]), ref), f"cut at step {cut}"


def test_mid_step_state_and_global_batch_size_change(tiny):
    ref = np.concatenate(list(itertools.islice(iter(reader(tiny["shards"], micro_batch_size=1, seed=2)), 200)))
    r = reader(tiny["shards"], global_batch_size=GB, seed=2)  # 4 accumulation steps
    head = np.concatenate(list(itertools.islice(iter(r), 7)))  # 1 step + 3 micro-batches
    mid = r.state_dict()
    assert mid["micro_batch"] == 3 and mid["consumed_samples"] == GB
    again = reader(tiny["shards"], global_batch_size=GB, seed=2)
    again.load_state_dict(mid)
    assert np.array_equal(np.concatenate([head, next(iter(again))]), ref[:16])
    with pytest.raises(DataError, match="mid global batch"):
        reader(tiny["shards"], micro_batch_size=4, global_batch_size=GB, seed=2).load_state_dict(mid)
    # A step boundary under a new global batch size: continues at consumed_samples in the same global sequence.
    r2 = reader(tiny["shards"], global_batch_size=GB, seed=2)
    list(itertools.islice(iter(r2), 12))
    bigger = reader(tiny["shards"], micro_batch_size=4, global_batch_size=16, seed=2)
    bigger.load_state_dict(r2.state_dict())
    assert np.array_equal(np.concatenate(list(itertools.islice(iter(bigger), 8))), ref[24: 24 + 32])
    assert bigger.last_indices.tolist() == list(range(52, 56))


def test_state_errors_and_changed_settings(tiny):
    r = reader(tiny["shards"])
    with pytest.raises(DataError, match="state version") as e:
        r.load_state_dict({"epoch": 0, "batch_in_epoch": 3})
    assert "\n" not in str(e.value)
    with pytest.warns(UserWarning, match="seed 9 -> 0"):
        r.load_state_dict({**r.state_dict(), "seed": 9})
    with pytest.raises(DataError, match="2 sources"):
        r.load_state_dict({**r.state_dict(), "counts": [0, 0], "positions": [0, 0]})


def test_blend_proportions_and_rows_come_from_the_chosen_source(tiny, others):
    from tests.unit.test_data_sampler import reference_blend

    src = blended(tiny, others)
    sets = [keyset(manifest_rows(p)) for p in (tiny["shards"], *others)]
    shared = (sets[0] & sets[1]) | (sets[0] & sets[2]) | (sets[1] & sets[2])  # e.g. a common Gutenberg header
    assert len(shared) < 0.2 * min(map(len, sets))  # the sources are told apart by their rows
    r = reader(src, micro_batch_size=100, seed=4)
    rows = np.concatenate(list(itertools.islice(iter(r), 100)))  # 10k samples, each source loops epochs
    assert np.abs(np.asarray(r.source_fractions()) - [0.7, 0.2, 0.1]).max() < 0.01
    want = reference_blend([0.7, 0.2, 0.1], 10_000)
    assert all(row.tobytes() in sets[d] for row, d in zip(rows, want))
    assert r.state_dict()["counts"] == np.bincount(want).tolist()


def test_brace_pattern_and_pipe_urls_read_the_same_rows(tiny, shards):
    d = tiny["shards"]
    n = len(tiny["manifest"]["shards"])
    ref, _ = steps([reader(d, micro_batch_size=GB, seed=6)], 70)
    specs = [{"manifest": str(d / "manifest.json"), "shards": f"{d}/shard-{{000000..{n - 1:06d}}}.tar"},
             {"path": str(d), "shards": f"file://{d}/shard-{{000000..{n - 1:06d}}}.tar", "weight": 2.0},
             {"manifest": f"pipe:cat {d}/manifest.json",
              "shards": [f"pipe:cat {d}/shard-{i:06d}.tar" for i in range(n)]}]
    for spec in specs:
        got, _ = steps([reader(spec, micro_batch_size=GB, seed=6)], 70)
        assert np.array_equal(got, ref), spec
    with pytest.raises(DataError, match="does not name manifest shard shard-000000.tar"):
        reader({"manifest": str(d), "shards": f"{d}/shard-{{000001..{n:06d}}}.tar"})
    with pytest.raises(DataError, match="needs shards="):
        reader({"manifest": f"pipe:cat {d}/manifest.json"})
    # Non-local shards: the checksum (xxh3_128) is checked while streaming; a failing command is an error too.
    damage_sha(shards, "shard-000001.tar")
    (shards / "shard-000002.tar").unlink()
    for bad, name in ((1, "xxh3_128"), (2, "truncated or corrupt")):
        urls = [f"pipe:cat {shards}/shard-{i:06d}.tar" for i in range(n)]
        r = reader({"manifest": str(shards), "shards": urls}, micro_batch_size=4, shuffle=False,
                   shuffle_window_blocks=5)
        r.load_state_dict({**r.state_dict(), "consumed_samples": 40 * bad, "counts": [40 * bad],
                           "positions": [40 * bad]})
        with pytest.raises(DataError, match=name) as e:
            list(itertools.islice(iter(r), 10))
        one_line(e, f"shard-{bad:06d}.tar")


@pytest.mark.parametrize("item_rows", [1, 256])  # 1: worker items alternate per micro-batch
def test_workers_give_the_same_stream_and_positions(tiny, others, item_rows, monkeypatch):
    import data_pipeline.workers as workers_module

    monkeypatch.setattr(workers_module, "WORKER_ITEM_ROWS", item_rows)
    src = blended(tiny, others)
    kw = dict(micro_batch_size=1, global_batch_size=6, dp_rank=1, dp_size=2, seed=2)  # 3 micro-batches a step
    r0, r2 = reader(src, **kw), reader(src, num_workers=2, **kw)
    a = list(itertools.islice(iter(r0), 250))  # 83 steps and a bit: crosses the main source's epoch boundary
    b = list(itertools.islice(iter(r2), 250))
    assert all(np.array_equal(x, y) for x, y in zip(a, b)) and len(b) == 250
    assert r0.state_dict() == r2.state_dict() and np.array_equal(r0.last_indices, r2.last_indices)
    assert r0.state_dict()["micro_batch"] == 1  # mid-step: workers resume from there, round-robin shifted
    resumed = reader(src, num_workers=2, **kw)
    resumed.load_state_dict(r0.state_dict())
    more = list(itertools.islice(iter(resumed), 7))
    assert all(np.array_equal(x, y) for x, y in zip(more, list(itertools.islice(iter(r0), 7))))


def test_workers_are_not_forked_from_the_reading_process(tiny):
    """DataLoader workers come from the fork server (workers.py worker_loader): forking a process that holds
    threads copies their locks mid-use. os.register_at_fork's hook runs on every fork of this process."""
    watching, forks = [True], []
    os.register_at_fork(before=lambda: forks.append(1) if watching[0] else None)  # cannot be unregistered
    try:
        got = list(itertools.islice(iter(reader(tiny["shards"], num_workers=2, global_batch_size=GB)), 6))
    finally:
        watching[0] = False
    expected = list(itertools.islice(iter(reader(tiny["shards"], global_batch_size=GB)), 6))
    assert all(np.array_equal(x, y) for x, y in zip(got, expected)) and len(got) == 6
    assert forks == []


def test_validation_reader_fixed_order_and_restartable(tiny):
    rows = manifest_rows(tiny["shards"])
    val = ranks(tiny["shards"], 2, micro_batch_size=4, shuffle=False, loop=False)
    assert val[0].num_batches == 494 // 8  # global batch = micro * dp; the last partial one is dropped
    passes = [[list(r) for r in val] for _ in range(2)]
    for per_rank in passes:
        assert [len(p) for p in per_rank] == [val[0].num_batches] * 2
        merged = np.concatenate([np.concatenate(pair) for pair in zip(*per_rank)])
        assert np.array_equal(merged, rows[: 61 * 8])
    capped = list(itertools.islice(iter(val[0]), 3))  # an eval capped at 3 batches: the next pass restarts
    assert all(np.array_equal(x, y) for x, y in zip(capped, passes[0][0]))
    assert np.array_equal(next(iter(val[0])), passes[0][0][0])
    with pytest.raises(ValueError, match="exactly one"):
        ShardReader([str(tiny["shards"])] * 2, micro_batch_size=4, loop=False)


def test_resume_seeks_without_opening_earlier_shards(tiny, monkeypatch):
    import data_pipeline.blocks as reader_module  # BlockSource reads shards through blocks.read_shard
    from data_pipeline.testing import spy_on_read_shard

    opened = spy_on_read_shard(reader_module, monkeypatch)
    r = reader(tiny["shards"], micro_batch_size=4, shuffle=False, shuffle_window_blocks=5)  # window = shard
    r.load_state_dict({**r.state_dict(), "consumed_samples": 440, "counts": [440], "positions": [440]})
    first = next(iter(r))
    assert np.array_equal(first, manifest_rows(tiny["shards"])[440:444])
    r._blocks[0].close()  # stop the read-ahead (it may have gone on to shard 12) before looking
    # Row 440 starts shard 11: nothing earlier is opened; the read-ahead goes on in stream order (epoch 1 next).
    stream_order = [(11, 0), (12, 0)] + [(s, 0) for s in range(13)]
    assert opened and opened == stream_order[:len(opened)]


def test_local_fast_path_matches_webdataset_stream_and_still_verifies(tiny, shards, monkeypatch):
    import webdataset.tariterators as wds_tar

    from data_pipeline import stream as stream_module
    from data_pipeline.stream import Verifier, read_shard, resolve_source

    n = len(tiny["manifest"]["shards"])
    urls = [str(shards / f"shard-{i:06d}.tar") for i in range(n)]
    local = resolve_source(str(shards))  # with the manifest's member tables
    older = json.loads((shards / "manifest.json").read_text())
    for info in older["shards"]:
        del info["members"]  # as written before member tables: tarfile parses the headers
    (shards / "older.json").write_text(json.dumps(older))
    scanned = resolve_source({"manifest": str(shards / "older.json"), "shards": urls})
    piped = resolve_source({"manifest": str(shards), "shards": [f"pipe:cat {u}" for u in urls]})
    verifiers = {id(local): Verifier(), id(scanned): Verifier()}
    for shard in (0, 3, n - 1):  # n - 1: the short last shard
        for start in (0, 2):
            want = list(read_shard(piped, shard, start))
            for src in (local, scanned):
                for _ in range(2):  # the 2nd read uses the member table remembered from the 1st
                    got = list(read_shard(src, shard, start, verifier=verifiers[id(src)]))
                    assert [p for p, _ in got] == [p for p, _ in want] == list(range(start, len(want) + start))
                    assert all(np.array_equal(a, b) for (_, a), (_, b) in zip(got, want))
    assert len(verifiers[id(scanned)].tar_index) == 3 and not verifiers[id(local)].tar_index  # tables: no scan
    # Local shards never go through webdataset's stream iterators; their checksum is still checked first.
    monkeypatch.setattr(wds_tar, "tar_file_expander", None)
    damage_sha(shards, "shard-000001.tar")
    with pytest.raises(DataError, match="shard-000001.tar: xxh3_128 does not match"):
        next(read_shard(local, 1))
    assert stream_module.tario.iter_samples  # the fast path read shard 0 above without webdataset
    assert len(list(read_shard(local, 0))) == 5


def test_rows_a_caller_holds_never_change_while_window_buffers_are_reused(tiny):
    r = reader(tiny["shards"], micro_batch_size=2, global_batch_size=GB, seed=5, dtype="native")
    it, held, copies = iter(r), [], []  # native dtype: micro-batches are views of the shuffle windows
    for _ in range(600):  # 2.4 epochs of 494 rows, every micro-batch kept: no buffer may be reused under them
        batch = next(it)
        held.append(batch)
        copies.append(batch.copy())
    assert all(np.array_equal(h, c) for h, c in zip(held, copies))
    assert len({id(h.base) for h in held}) > 4  # more windows than kept buffers: one-off arrays took over
    del held, batch
    kept = {id(b) for b in r._blocks[0].window_memory._buffers}
    for _ in range(30):  # the rest of the window being read (a one-off array: all kept buffers were held)
        next(it)
    # Batches dropped at once: every window is built in a kept buffer (alive, so no other object has its id).
    assert {id(next(it).base) for _ in range(600)} <= kept and len(kept) == 4
