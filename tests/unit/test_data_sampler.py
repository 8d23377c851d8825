"""sampler.py: the global sample order as pure functions (no shards, no I/O)."""

import numpy as np
import pytest

from data_pipeline import DataError
from data_pipeline.sampler import (Exhausted, SourceCursor, SourcePlan, WindowMemory, blend, check_batch_sizes,
                                   rank_slice)

SHARD_ROWS = [40, 40, 40, 37, 40, 14]  # blocks of 8: the 37- and 14-row shards end in a short block
SPP = 8


def plan(**kw):
    args = dict(seed=3, source=0, shuffle=True, window_blocks=2)
    return SourcePlan(SHARD_ROWS, SPP, **{**args, **kw})


def epoch_rows(p, epoch):
    return [p.locate(epoch * p.rows_per_epoch + r)[1:] for r in range(p.rows_per_epoch)]


def test_epoch_is_a_permutation_of_every_row_and_differs_per_epoch():
    p = plan()
    every = {(s, b, i) for s, n in enumerate(SHARD_ROWS) for b in range(-(-n // SPP))
             for i in range(min(SPP, n - b * SPP))}
    e0, e1 = epoch_rows(p, 0), epoch_rows(p, 1)
    assert len(e0) == len(every) == p.rows_per_epoch == sum(SHARD_ROWS)
    assert set(e0) == set(e1) == every
    assert e0 != e1
    assert p.locate(p.rows_per_epoch)[0] == 1


def test_shard_order_is_seeded_by_seed_source_epoch_and_rows_stay_in_windows():
    p = plan(source=2)
    for epoch in (0, 5):
        want = np.random.default_rng(np.random.SeedSequence([3, 2, epoch])).permutation(len(SHARD_ROWS))
        assert p.shard_order(epoch).tolist() == want.tolist()
        # The blocks in shard order, cut into windows of 2: each stream window holds exactly its blocks' rows.
        blocks = [(s, b) for s in want for b in range(-(-SHARD_ROWS[s] // SPP))]
        for w in range(p.windows_per_epoch):
            win = p.window(epoch, w)
            assert [(s, b) for s, b, _ in win.blocks] == blocks[2 * w: 2 * w + 2]
            rows = [p.locate(epoch * p.rows_per_epoch + win.start + i)[1:3] for i in range(len(win.order))]
            assert set(rows) == {(s, b) for s, b, _ in win.blocks}
            seq = np.random.SeedSequence([3, 2, epoch, w])  # rows permuted per (seed, source, epoch, window)
            assert win.order.tolist() == np.random.default_rng(seq).permutation(len(win.order)).tolist()
    assert plan(seed=4).shard_order(0).tolist() != plan().shard_order(0).tolist()


def test_unshuffled_plan_is_manifest_order():
    p = plan(shuffle=False)
    want = [(s, i // SPP, i % SPP) for s, n in enumerate(SHARD_ROWS) for i in range(n)]
    assert epoch_rows(p, 0) == want == epoch_rows(p, 1)


def reference_blend(weights, n):
    """Megatron's rule written out directly: argmax_d w_d * (g + 1) - count_d, ties to the lower index."""
    w = np.asarray(weights) / np.sum(weights)
    counts, out = np.zeros(len(w)), []
    for g in range(n):
        d = int(np.argmax(w * (g + 1) - counts))
        out.append(d)
        counts[d] += 1
    return out


def test_blend_rule_proportions_and_exact_continuation():
    weights = [0.7, 0.2, 0.1]
    counts = np.zeros(3, dtype=np.int64)
    full = blend(weights, 0, counts, 10_000)
    assert full.tolist() == reference_blend(weights, 10_000)
    assert np.abs(np.bincount(full, minlength=3) / 10_000 - weights).max() < 0.01
    assert counts.tolist() == np.bincount(full, minlength=3).tolist()
    # Continuing from (g, counts) gives the same sequence: no replay needed after a resume.
    c = np.zeros(3, dtype=np.int64)
    parts = [blend(weights, g, c, n) for g, n in ((0, 1234), (1234, 1), (1235, 8765))]
    assert np.concatenate(parts).tolist() == full.tolist()
    # Unnormalised weights give the same proportions (ties may round differently); one source takes all.
    scaled = blend([7, 2, 1], 0, np.zeros(3, dtype=np.int64), 10_000)
    assert np.abs(np.bincount(scaled, minlength=3) / 10_000 - weights).max() < 0.01
    one = np.array([5])
    assert blend([1.0], 5, one, 3).tolist() == [0, 0, 0] and one.tolist() == [8]


def test_rank_slices_tile_the_global_batch_and_sizes_are_checked():
    assert [rank_slice(12, r, 3) for r in range(3)] == [(0, 4), (4, 8), (8, 12)]
    assert check_batch_sizes(2, 16, 2) == 4
    for bad in ((2, 10, 2), (0, 8, 2), (2, 0, 1)):
        with pytest.raises(ValueError, match="multiple of"):
            check_batch_sizes(*bad)


def fake_reader(p, bad_shards=(), log=None):
    """read_window over synthetic rows: row value = (shard, block, row) encoded; None for bad shards."""
    def read_window(win):
        if log is not None:
            log.append((win.epoch, win.index))
        return [None if s in bad_shards else
                np.array([[s * 10_000 + b * 100 + i] for i in range(n)], dtype=np.int64)
                for s, b, n in win.blocks]
    return read_window


def test_cursor_follows_the_plan_and_resumes_from_its_position():
    p = plan()
    cur = SourceCursor(p, 0, fake_reader(p))
    got = cur.read(np.ones(2 * p.rows_per_epoch + 5, dtype=bool))[:, 0]  # [rows]
    want = [s * 10_000 + b * 100 + i for s, b, i in (p.locate(k)[1:] for k in range(len(got)))]
    assert got.tolist() == want
    assert cur.position == len(got)
    # keep=False rows are consumed but not returned; a new cursor at the position continues exactly.
    head = SourceCursor(p, 0, fake_reader(p))
    keep = np.arange(100) % 3 == 0
    assert head.read(keep)[:, 0].tolist() == got[:100][keep].tolist()
    log = []
    tail = SourceCursor(p, head.position, fake_reader(p, log=log))
    assert tail.read(np.ones(50, dtype=bool))[:, 0].tolist() == got[100:150].tolist()
    assert log[0] == (0, p.window_of(0, 100))  # seeks straight to the window: earlier ones are not read


def test_cursor_steps_over_bad_blocks_and_counts_their_positions():
    p = plan()
    cur = SourceCursor(p, 0, fake_reader(p, bad_shards={1}))
    rows = cur.read(np.ones(p.rows_per_epoch - 40, dtype=bool))[:, 0]
    assert not any(r // 10_000 == 1 for r in rows)
    assert cur.position == p.rows_per_epoch  # 40 rows of shard 1 were stepped over, the epoch is done
    resumed = SourceCursor(p, 123, fake_reader(p, bad_shards={1}))
    again = SourceCursor(p, 0, fake_reader(p, bad_shards={1}))
    first = again.read(np.ones(200, dtype=bool))
    skipped_before_123 = sum(1 for k in range(123) if p.locate(k)[1] == 1)
    assert resumed.read(np.ones(10, dtype=bool)).tolist() == \
        first[123 - skipped_before_123: 133 - skipped_before_123].tolist()


def test_cursor_errors_when_everything_is_bad_and_stops_without_loop():
    p = plan()
    with pytest.raises(DataError, match="no readable shard"):
        SourceCursor(p, 0, fake_reader(p, bad_shards=set(range(6))), name="src").read(np.ones(1, dtype=bool))
    once = SourceCursor(p, 0, fake_reader(p), loop=False)
    once.read(np.ones(p.rows_per_epoch, dtype=bool))
    with pytest.raises(Exhausted):
        once.read(np.ones(1, dtype=bool))


def test_window_memory_reuses_only_buffers_nothing_views():
    mem = WindowMemory(keep=2)
    a = mem.empty((4, 3), np.uint16)
    a[:] = 1
    held = a[1]  # a caller keeps one row of window a
    del a
    b = mem.empty((4, 3), np.uint16)
    b[:] = 2
    assert b.base is not held.base and (held == 1).all()  # a's buffer is still viewed: b got another
    first, second = id(held.base), id(b.base)
    del b
    c = mem.empty((2, 3), np.uint16)  # b's buffer is free again: reused for a window that fits
    assert id(c.base) == second
    d = mem.empty((4, 3), np.int32)  # both kept buffers in use: a one-off array, not kept
    assert d.base is None and len(mem._buffers) == 2 and (held == 1).all()
    del held, c
    assert id(mem.empty((4, 3), np.uint16).base) == first
