"""Shared by the ShardReader test modules: small real datasets and helpers that step readers."""

import json
import shutil
import tarfile

import numpy as np
import pytest

from data_pipeline import ShardReader
from data_pipeline.corpus import iter_records
from data_pipeline.shards import prepare_shards
from data_pipeline.testing import build_tiny_dataset, write_corpus_slice

GB = 8  # global batch size in most tests


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    # 13 shards of 5 blocks x 8 rows (33 tokens), the last one short.
    return build_tiny_dataset(tmp_path_factory.mktemp("tiny"))


@pytest.fixture(scope="module")
def others(tiny, tmp_path_factory):
    """Two more sources with the same tokenizer and different documents (so their rows are distinguishable)."""
    out, seen = [], [r["id"] for r in iter_records(tiny["corpus"])]
    for k in (1, 2):
        d = tmp_path_factory.mktemp(f"other{k}")
        corpus = write_corpus_slice(d / "corpus.jsonl", num_docs=2, chars_per_doc=3000, skip_ids=tuple(seen))
        seen += [r["id"] for r in iter_records(corpus)]
        prepare_shards([str(corpus)], str(tiny["tokenizer"]), str(d / "shards"), 32, samples_per_shard=3,
                       sequences_per_sample=8)
        out.append(d / "shards")
    return out


@pytest.fixture
def shards(tiny, tmp_path):
    """A private copy of the shards that a test may damage."""
    return shutil.copytree(tiny["shards"], tmp_path / "shards")


def manifest_rows(shard_dir):
    """Every row in manifest order, read with plain tarfile (independent of the reader): int64 [N, 33]."""
    manifest = json.loads((shard_dir / "manifest.json").read_text())
    rows = []
    for info in manifest["shards"]:
        with tarfile.open(shard_dir / info["name"]) as tar:
            rows += [np.frombuffer(tar.extractfile(m).read(), "<u2").reshape(-1, 33) for m in tar]
    return np.concatenate(rows).astype(np.int64)


def keyset(rows):
    return {r.tobytes() for r in rows}


def reader(src, **kw):
    return ShardReader(str(src) if not isinstance(src, (list, dict)) else src, **{"micro_batch_size": 2, **kw})


def ranks(src, dp, **kw):
    return [reader(src, dp_rank=r, dp_size=dp, **kw) for r in range(dp)]


def steps(readers, n, its=None):
    """n optimizer steps of every rank -> (global batches [n, GB, 33] with ranks concatenated, iterators)."""
    its = its or [iter(r) for r in readers]
    out = [np.concatenate([next(it) for r, it in zip(readers, its) for _ in range(r.accumulation)])
           for _ in range(n)]
    return np.stack(out), its


def damage_sha(shards, name):
    path = shards / name
    data = bytearray(path.read_bytes())
    data[1000] ^= 0xFF  # same size, different bytes (inside token data)
    path.write_bytes(bytes(data))


def one_line(exc_info, name):
    msg = str(exc_info.value)
    assert "\n" not in msg and name in msg, msg
