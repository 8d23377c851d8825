"""ShardReader(owned_rows=True), what training uses: each DP rank (and DataLoader worker) reads only the rows it
keeps, verified against the shards' row digests, so the job reads each byte once whatever the DP size; the
stream, resume positions and blending are those of whole-shard reading (issue 21, item 1)."""

import itertools
import json

import numpy as np
import pytest

from data_pipeline import DataError
from data_pipeline.workers import WORKER_ITEM_ROWS
from tests.unit.reader_support import (GB, damage_sha, manifest_rows, one_line, others, ranks, reader,  # noqa: F401
                                       shards, steps, tiny)

ROW_BYTES = 33 * 2  # uint16 tokens of seq_length 32 + 1
DIGEST = 16  # xxh3_128 per row, read the first time a process reads the row
STEPS = 60  # 480 rows: within epoch 0 (494 rows), so every row is read (and verified) at most once


def test_each_byte_read_once_whatever_the_dp_size_and_the_same_stream(tiny):
    ref_readers = [reader(tiny["shards"], micro_batch_size=GB, seed=3)]
    ref, _ = steps(ref_readers, STEPS)
    whole = {}
    for dp in (1, 2, 4):
        owned = ranks(tiny["shards"], dp, global_batch_size=GB, seed=3, owned_rows=True)
        got, its = steps(owned, STEPS)
        assert np.array_equal(got, ref) and all(r._blocks[0].rows is not None for r in owned)
        # The rows of the shuffle windows loaded so far (the last one is read ahead), each once by the rank that
        # owns it, plus its digest: the same bytes for every dp.
        plan = owned[0].plans[0]
        last = plan.window(0, plan.window_of(0, STEPS * GB - 1))
        assert sum(r.bytes_read for r in owned) == (last.start + len(last.order)) * (ROW_BYTES + DIGEST)
        for it in its:
            it.close()
        shard_readers = ranks(tiny["shards"], dp, global_batch_size=GB, seed=3)
        steps(shard_readers, STEPS)
        whole[dp] = sum(r.bytes_read for r in shard_readers)
    # Whole-shard reading (on_bad_shard=skip, URLs, unverified): every rank reads the whole stream.
    assert whole[4] > 3.5 * whole[1] > 3.5 * STEPS * GB * ROW_BYTES
    # DataLoader workers read only their own micro-batch groups; the count runs ahead of the consumer by at most
    # what the loader prefetches: per rank, 2 items per worker of up to WORKER_ITEM_ROWS rows (some of epoch 1
    # here, whose rows a worker verifies afresh).
    workers = ranks(tiny["shards"], 2, global_batch_size=GB, seed=3, owned_rows=True, num_workers=2)
    got, its = steps(workers, STEPS)
    assert np.array_equal(got, ref)
    for it in its:
        it.close()
    ahead = 2 * 2 * 2 * WORKER_ITEM_ROWS + 64  # ranks x workers x prefetched items x rows, + a window
    assert STEPS * GB * (ROW_BYTES + DIGEST) <= sum(r.bytes_read for r in workers) <= (STEPS * GB + ahead) * (
        ROW_BYTES + DIGEST)


def test_resume_across_dp_change_and_blending_as_whole_shard_reading(tiny, others):
    ref, _ = steps([reader(tiny["shards"], micro_batch_size=GB, seed=1)], 100)  # past the epoch boundary
    head = ranks(tiny["shards"], 2, global_batch_size=GB, seed=1, owned_rows=True)
    part, _ = steps(head, 70)
    tail = ranks(tiny["shards"], 4, global_batch_size=GB, seed=1, owned_rows=True, micro_batch_size=1)
    for r in tail:
        r.load_state_dict(head[0].state_dict())
    rest, _ = steps(tail, 30)
    assert np.array_equal(np.concatenate([part, rest]), ref)
    sources = [{"path": str(tiny["shards"]), "weight": 2.0}, *({"path": str(o)} for o in others)]
    blended, _ = steps([reader(sources, micro_batch_size=GB, seed=2)], 40)
    owned = ranks(sources, 4, global_batch_size=GB, seed=2, owned_rows=True)
    got, _ = steps(owned, 40)
    assert np.array_equal(got, blended)
    assert sum(r.bytes_read for r in owned) == 40 * GB * (ROW_BYTES + DIGEST)


def test_bad_rows_are_one_line_errors_and_skip_reads_whole_shards(shards):
    damage_sha(shards, "shard-000003.tar")  # byte 1000: a token of block 0 of shard 3 (rows 120..127)
    r = reader(shards, micro_batch_size=4, shuffle=False, owned_rows=True)
    with pytest.raises(DataError, match="shard-000003.tar: xxh3_128 does not match manifest.json") as e:
        list(itertools.islice(iter(r), 40))
    one_line(e, "shard-000003.rowsums")
    # Rows are not read twice by one rank's position: two ranks of dp 2 split the damaged block's rows, and the
    # one holding the damaged row stops.
    outcomes = []
    for rank in ranks(shards, 2, global_batch_size=8, shuffle=False, owned_rows=True):
        try:
            list(itertools.islice(iter(rank), 40))  # 20 steps of 8 rows: the damaged row 127 in step 16
            outcomes.append("ok")
        except DataError as exc:
            outcomes.append(str(exc))
    assert outcomes.count("ok") == 1 and any("shard-000003.tar" in o for o in outcomes)
    # A skip must be seen alike by every rank, so on_bad_shard=skip reads whole shards (every rank every row).
    with pytest.warns(RuntimeWarning, match="shard-000003.tar"):
        skipping = reader(shards, micro_batch_size=4, shuffle=False, owned_rows=True, on_bad_shard="skip")
        assert skipping._blocks[0].rows is None
        got = np.concatenate(list(itertools.islice(iter(skipping), 40)))
    rows = manifest_rows(shards)
    assert np.array_equal(got, np.concatenate([rows[:120], rows[160:200]]))


def test_truncated_shard_or_missing_row_digests_and_older_manifests(shards):
    rows = manifest_rows(shards)
    manifest = json.loads((shards / "manifest.json").read_text())
    for s in manifest["shards"]:
        del s["bytes"]  # no size check at open: the row reader checks the file against its member table
    (shards / "manifest.json").write_text(json.dumps(manifest))
    cut = shards / "shard-000001.tar"
    cut.write_bytes(cut.read_bytes()[:3000])
    r = reader(shards, micro_batch_size=4, shuffle=False, owned_rows=True)
    with pytest.raises(DataError, match="truncated shard") as e:
        list(itertools.islice(iter(r), 20))
    one_line(e, "shard-000001.tar")
    (shards / "shard-000000.rowsums").unlink()
    with pytest.raises(DataError, match="cannot open") as e:
        next(iter(reader(shards, micro_batch_size=4, shuffle=False, owned_rows=True)))
    one_line(e, "shard-000000.rowsums")
    for s in manifest["shards"]:
        del s["row_digests"]  # as written before row digests: whole shards, checked by their xxh3_128
    (shards / "manifest.json").write_text(json.dumps(manifest))
    older = reader(shards, micro_batch_size=4, shuffle=False, owned_rows=True, shuffle_window_blocks=5)
    assert older._blocks[0].rows is None and np.array_equal(next(iter(older)), rows[:4])
