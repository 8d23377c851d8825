"""Corpus, tokenizer, shard writing and CLI of data_pipeline (reader tests: test_data_reader.py)."""

import argparse
import gzip
import hashlib
import json
import lzma
import tarfile

import numpy as np
import pytest

from data_pipeline import DataError
from data_pipeline.cli import register
from data_pipeline.corpus import VALID_IDS, bundled_corpus_path, expand_inputs, extract_bundled, iter_records, \
    read_documents
from data_pipeline.reader import ShardReader
from data_pipeline import shards as shards_module
from data_pipeline.shards import prepare_shards
from data_pipeline.testing import build_tiny_dataset
from data_pipeline.tokenizer import Tokenizer, train_tokenizer


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    return build_tiny_dataset(tmp_path_factory.mktemp("tiny"))


def _tar_rows(path, row):
    """All rows of one shard, read with plain tarfile (independent of the reader under test)."""
    with tarfile.open(path) as tar:
        members = tar.getmembers()
        return members, [np.frombuffer(tar.extractfile(m).read(), "<u2").reshape(-1, row) for m in members]


# ----- corpus -----

def test_bundled_corpus_is_sorted_and_split_disjoint(tmp_path):
    ids = [r["id"] for r in iter_records(bundled_corpus_path())]
    assert len(ids) == 42 and ids == sorted(ids) and all(i.endswith("_gut") for i in ids)
    paths = extract_bundled(tmp_path)
    split = {k: [r["id"] for r in iter_records(p)] for k, p in paths.items()}
    assert sorted(split["valid"]) == sorted(VALID_IDS["shakespeare"])
    assert not set(split["train"]) & set(split["valid"])
    assert sorted(split["train"] + split["valid"]) == ids
    chars = {k: sum(len(t) for t in read_documents(p)) for k, p in paths.items()}
    assert chars == {"train": 4_696_608, "valid": 360_590}  # the numbers SOURCE.md states


def test_read_documents_formats(tmp_path):
    docs = ["first doc\nline two", "second ü"]
    lines = "".join(json.dumps({"body": d}) + "\n" for d in docs)
    (tmp_path / "a.jsonl").write_text(lines)
    with gzip.open(tmp_path / "a.jsonl.gz", "wt") as f:
        f.write(lines)
    with lzma.open(tmp_path / "a.jsonl.xz", "wt") as f:
        f.write(lines)
    (tmp_path / "b.txt").write_text(docs[0])
    for name in ("a.jsonl", "a.jsonl.gz", "a.jsonl.xz"):
        assert list(read_documents(tmp_path / name, text_key="body")) == docs
    assert list(read_documents(tmp_path / "b.txt")) == [docs[0]]
    assert [p.name for p in expand_inputs([str(tmp_path / "a.jsonl*"), str(tmp_path / "b.txt")])] == \
        ["a.jsonl", "a.jsonl.gz", "a.jsonl.xz", "b.txt"]


@pytest.mark.parametrize("content,match", [
    ('{"text": "ok"}\nnot json\n', r"bad\.jsonl:2: not valid JSON"),
    ('{"body": "no text key"}\n', r"bad\.jsonl: record 1 has no string field 'text'"),
])
def test_read_documents_bad_input(tmp_path, content, match):
    (tmp_path / "bad.jsonl").write_text(content)
    with pytest.raises(DataError, match=match):
        list(read_documents(tmp_path / "bad.jsonl"))


def test_missing_inputs_raise(tmp_path):
    with pytest.raises(DataError, match="nothing-here.txt"):
        expand_inputs([str(tmp_path / "nothing-here.txt")])
    with pytest.raises(DataError, match=r"matched no files: .*\*\.jsonl"):
        expand_inputs([str(tmp_path / "*.jsonl")])


# ----- tokenizer -----

def test_tokenizer_round_trip_and_ids(tiny):
    tok = Tokenizer(tiny["tokenizer"])
    assert (tok.pad_id, tok.bos_id, tok.eos_id, tok.vocab_size) == (0, 2, 3, 400)
    assert tok.sha256 == hashlib.sha256(tiny["tokenizer"].read_bytes()).hexdigest()
    text = "KING.\nWhat say'st thou,  my lord?\n\n\tAy — ünïcode ✓ 42\n"
    ids = tok.encode(text)
    assert all(isinstance(i, int) and 6 < i < 400 for i in ids)  # never pad/unk/bos/eos nor [CLS] [SEP] [MASK]
    assert tok.decode(ids) == text  # lossless: newlines, double spaces, tabs, unseen chars via bytes
    assert tok.decode([tok.bos_id] + ids + [tok.eos_id]) == text


def test_tokenizer_training_is_reproducible_across_paths(tiny, tmp_path):
    other = train_tokenizer([str(tiny["corpus"])], str(tmp_path / "sub" / "again"), 400)
    assert other == tmp_path / "sub" / "again.model" and other.with_suffix(".vocab").is_file()
    assert Tokenizer(other).sha256 == Tokenizer(tiny["tokenizer"]).sha256


def test_tokenizer_errors(tmp_path, tiny):
    with pytest.raises(DataError, match="missing.model"):
        Tokenizer(tmp_path / "missing.model")
    with pytest.raises(DataError, match="too high|smaller than required"):
        train_tokenizer([str(tiny["corpus"])], str(tmp_path / "t"), 100)


# ----- shards -----

def test_shards_are_byte_identical(tiny, tmp_path):
    again = prepare_shards([str(tiny["corpus"])], str(tiny["tokenizer"]), str(tmp_path / "again"), 32,
                           samples_per_shard=5, sequences_per_sample=8)
    assert again == tiny["manifest"]
    for shard in again["shards"]:
        assert (tmp_path / "again" / shard["name"]).read_bytes() == (tiny["shards"] / shard["name"]).read_bytes()
    assert (tmp_path / "again" / "manifest.json").read_bytes() == (tiny["shards"] / "manifest.json").read_bytes()


def test_manifest_fields_and_contents(tiny):
    m = json.loads((tiny["shards"] / "manifest.json").read_text())
    tok = Tokenizer(tiny["tokenizer"])
    assert m == tiny["manifest"]
    assert (m["format_version"], m["seq_length"], m["dtype"], m["sequences_per_sample"]) == (1, 32, "uint16", 8)
    assert (m["tokenizer_sha256"], m["vocab_size"]) == (tok.sha256, 400)
    ids = {k: m[k] for k in ("pad_id", "unk_id", "bos_id", "eos_id", "cls_id", "sep_id", "mask_id")}
    assert ids == {"pad_id": 0, "unk_id": 1, "bos_id": 2, "eos_id": 3, "cls_id": 4, "sep_id": 5, "mask_id": 6}
    assert m["special_ids"] == [0, 1, 2, 3, 4, 5, 6]
    names = [s["name"] for s in m["shards"]]
    assert names == [f"shard-{i:06d}.tar" for i in range(len(names))] and len(names) >= 6
    assert sum(s["sequences"] for s in m["shards"]) == m["num_sequences"]
    assert m["num_tokens"] == m["num_sequences"] * 33
    assert all(s["blocks"] == 5 and s["sequences"] == 40 for s in m["shards"][:-1])
    # The token stream: each document's ids then eos, cut into rows of 33; the remainder is dropped.
    stream = [i for doc in read_documents(tiny["corpus"]) for i in tok.encode(doc) + [tok.eos_id]]
    assert m["dropped_tokens"] == len(stream) % 33 and m["num_sequences"] == len(stream) // 33
    rows, member_names = [], []
    for s in m["shards"]:
        path = tiny["shards"] / s["name"]
        assert s["sha256"] == hashlib.sha256(path.read_bytes()).hexdigest() and s["bytes"] == path.stat().st_size
        members, blocks = _tar_rows(path, 33)
        assert len(members) == s["blocks"] and sum(len(b) for b in blocks) == s["sequences"]
        assert all(mem.mtime == 0 for mem in members)
        member_names += [mem.name for mem in members]
        rows += blocks
    assert member_names[:2] == ["0000000000.tokens.u16", "0000000001.tokens.u16"]
    assert np.concatenate(rows).reshape(-1).tolist() == stream[: m["num_sequences"] * 33]


def test_int32_tokens_for_large_vocab(tiny, tmp_path, monkeypatch):
    monkeypatch.setattr(Tokenizer, "vocab_size", property(lambda self: 70000))
    m = prepare_shards([str(tiny["corpus"])], str(tiny["tokenizer"]), str(tmp_path), 32, samples_per_shard=5,
                       sequences_per_sample=8)
    assert m["dtype"] == "int32"
    with tarfile.open(tmp_path / "shard-000000.tar") as tar:
        assert tar.getnames()[0] == "0000000000.tokens.i32"
    first = next(iter(ShardReader(str(tmp_path), micro_batch_size=4, shuffle=False)))
    expected = next(iter(ShardReader(str(tiny["shards"]), micro_batch_size=4, shuffle=False)))
    assert np.array_equal(first, expected)


def test_prepare_removes_stale_shards_and_rejects_tiny_corpus(tiny, tmp_path):
    (tmp_path / "shard-000099.tar").write_bytes(b"stale")
    prepare_shards([str(tiny["corpus"])], str(tiny["tokenizer"]), str(tmp_path), 32, samples_per_shard=5,
                   sequences_per_sample=8)
    assert not (tmp_path / "shard-000099.tar").exists()
    (tmp_path / "small.txt").write_text("too short")
    with pytest.raises(DataError, match="fewer than one sequence"):
        prepare_shards([str(tmp_path / "small.txt")], str(tiny["tokenizer"]), str(tmp_path / "s"), 32)
    assert not list((tmp_path / "s").glob("*.tar"))


def _mixed_corpus(path):
    """Documents of very different sizes (empty, one char, whole scenes, non-ASCII) to exercise chunking."""
    plays = [text for text, _ in zip(read_documents(bundled_corpus_path()), range(3))]
    docs = ["", "x", "ünïcode ✓ — ça va?\n\n"]
    docs += [plays[i % 3][i * 700: i * 700 + 50 * i * i] for i in range(1, 30)]  # 50 .. 42,000 chars
    path.write_text("".join(json.dumps({"text": d}) + "\n" for d in docs))
    return path, len(docs)


def test_shards_identical_for_any_worker_count(tiny, tmp_path, monkeypatch, caplog):
    corpus, num_docs = _mixed_corpus(tmp_path / "mixed.jsonl")
    monkeypatch.setattr(shards_module, "CHUNK_DOCS", 3)  # ~11 tasks, so workers really share the input
    monkeypatch.setattr(shards_module, "INFLIGHT_PER_WORKER", 1)  # and the bounded in-flight window wraps
    results = {}
    for workers in (0, 2, 3):
        out = tmp_path / f"w{workers}"
        caplog.clear()
        with caplog.at_level("INFO", logger="data_pipeline.shards"):
            manifest = prepare_shards([str(corpus)], str(tiny["tokenizer"]), str(out), 16, samples_per_shard=3,
                                      sequences_per_sample=4, workers=workers)
        summary = caplog.records[-1].getMessage()
        assert f"{num_docs} documents" in summary and "tokens/s" in summary and "MB/s" in summary
        assert ("in-process" if workers == 0 else f"{workers} workers") in summary
        results[workers] = {p.name: p.read_bytes() for p in sorted(out.iterdir())}
        assert manifest["num_documents"] == num_docs and len(manifest["shards"]) >= 3
    assert results[0] == results[2] == results[3]
    # ... and equal to the plain definition: every document's ids then eos, one stream cut into rows of 17.
    tok = Tokenizer(tiny["tokenizer"])
    stream = [i for doc in read_documents(corpus) for i in tok.encode(doc) + [tok.eos_id]]
    rows = [r for name in sorted(results[0]) if name.endswith(".tar")
            for r in _tar_rows(tmp_path / "w0" / name, 17)[1]]
    assert np.concatenate(rows).reshape(-1).tolist() == stream[: len(stream) // 17 * 17]


def test_prepare_rejects_bad_workers_and_reports_bad_input_from_pool(tiny, tmp_path, monkeypatch):
    corpus, num_docs = _mixed_corpus(tmp_path / "bad.jsonl")
    with open(corpus, "a") as f:
        f.write("not json\n")
    monkeypatch.setattr(shards_module, "CHUNK_DOCS", 3)
    with pytest.raises(DataError, match=rf"bad\.jsonl:{num_docs + 1}: not valid JSON"):  # no hang, one line
        prepare_shards([str(corpus)], str(tiny["tokenizer"]), str(tmp_path / "out"), 16, workers=2)
    assert not (tmp_path / "out" / "manifest.json").exists()
    with pytest.raises(DataError, match="workers must be an integer >= 0"):
        prepare_shards([str(tiny["corpus"])], str(tiny["tokenizer"]), str(tmp_path), 32, workers=-1)
    assert 1 <= shards_module.default_workers() <= 4


# ----- CLI -----

def _parse(argv):
    parser = argparse.ArgumentParser(prog="pretrain")
    register(parser.add_subparsers(dest="command"))
    return parser.parse_args(argv)


def test_cli_tokenizer_and_prepare(tiny, tmp_path, capsys):
    args = _parse(["tokenizer", "train", "--input", str(tiny["corpus"]), "--output", str(tmp_path / "tok"),
                   "--vocab-size", "400"])
    assert args.func(args, []) == 0
    assert Tokenizer(tmp_path / "tok.model").sha256 == Tokenizer(tiny["tokenizer"]).sha256
    args = _parse(["data", "prepare", "--input", str(tiny["corpus"]), "--tokenizer", str(tmp_path / "tok.model"),
                   "--output", str(tmp_path / "shards"), "--seq-length", "32", "--samples-per-shard", "5",
                   "--sequences-per-sample", "8", "--workers", "0"])
    assert args.workers == 0 and args.func(args, []) == 0
    assert json.loads((tmp_path / "shards" / "manifest.json").read_text()) == tiny["manifest"]


def test_cli_bundled_valid_split_and_errors(tiny, tmp_path, capsys):
    args = _parse(["data", "prepare", "--bundled", "valid", "--tokenizer", str(tiny["tokenizer"]),
                   "--output", str(tmp_path / "valid"), "--seq-length", "512", "--samples-per-shard", "64"])
    assert args.func(args, []) == 0
    assert json.loads((tmp_path / "valid" / "manifest.json").read_text())["num_documents"] == 3
    capsys.readouterr()
    from pretrain.cli import main

    # Bad input through the real command: one `error:` line naming the file, exit code 2.
    assert main(["data", "prepare", "--input", str(tmp_path / "nope.jsonl"), "--tokenizer",
                 str(tiny["tokenizer"]), "--output", str(tmp_path / "x"), "--seq-length", "32"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error: ") and "nope.jsonl" in err[0]
    assert main(["tokenizer", "train", "--output", str(tmp_path / "t")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "--input" in err[0]
    with pytest.raises(SystemExit):  # overrides are for train/demo only
        main(["tokenizer", "train", "--bundled", "--output", str(tmp_path / "t"), "--run.seed=1"])
    with pytest.raises(SystemExit):  # --input and --bundled together is a usage error
        _parse(["tokenizer", "train", "--bundled", "--input", "x", "--output", "y"])


def test_import_does_not_load_torch_distributed():
    import pathlib
    import subprocess
    import sys

    code = ("import sys, data_pipeline, data_pipeline.cli, data_pipeline.corpus; "
            "assert 'torch' not in sys.modules, 'torch imported'; "
            "from data_pipeline import ShardReader; import torch.distributed as d; "
            "assert not d.is_initialized()")
    subprocess.run([sys.executable, "-c", code], check=True, cwd=pathlib.Path(__file__).resolve().parents[2])
