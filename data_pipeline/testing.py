"""A tiny real dataset for tests and smoke runs: a slice of the bundled corpus, a small tokenizer, small shards.

Used by this package's unit tests and available to integration tests of the trainer, so every test exercises
the same code path a real run does (sentencepiece model, WebDataset tar shards, manifest) in about a second.
"""

from __future__ import annotations

import json
import pathlib

from data_pipeline.corpus import bundled_corpus_path, iter_records


def write_corpus_slice(path: str | pathlib.Path, num_docs: int = 4, chars_per_doc: int = 12000,
                       skip_ids: tuple[str, ...] = ()) -> pathlib.Path:
    """Write the first `num_docs` bundled documents (not in `skip_ids`), each cut to `chars_per_doc`, as jsonl."""
    path = pathlib.Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    written = 0
    with open(path, "w", encoding="utf-8") as f:
        for record in iter_records(bundled_corpus_path()):
            if written == num_docs:
                break
            if record["id"] in skip_ids:
                continue
            f.write(json.dumps({"id": record["id"], "text": record["text"][:chars_per_doc]}) + "\n")
            written += 1
    return path


def build_tiny_dataset(out_dir: str | pathlib.Path, *, vocab_size: int = 400, seq_length: int = 32,
                       samples_per_shard: int = 5, sequences_per_sample: int = 8, num_docs: int = 4,
                       chars_per_doc: int = 6000) -> dict:
    """Build corpus slice, tokenizer and shards under `out_dir`; return their paths and the manifest.

    Defaults give 13 shards of 40 sequences of 33 tokens, the last one short (10): enough to split unevenly
    across 3 DP ranks.
    """
    from data_pipeline.shards import prepare_shards
    from data_pipeline.tokenizer import train_tokenizer

    out = pathlib.Path(out_dir)
    corpus = write_corpus_slice(out / "corpus.jsonl", num_docs=num_docs, chars_per_doc=chars_per_doc)
    model = train_tokenizer([str(corpus)], str(out / "tok"), vocab_size)
    manifest = prepare_shards([str(corpus)], str(model), str(out / "shards"), seq_length,
                              samples_per_shard=samples_per_shard, sequences_per_sample=sequences_per_sample)
    return {"corpus": corpus, "tokenizer": model, "shards": out / "shards", "manifest": manifest}


def spy_on_read_shard(module, monkeypatch) -> list[tuple[int, int]]:
    """Record (shard, start_block) of every shard that ``module.read_shard`` opens (tests of resume seeking)."""
    opened: list[tuple[int, int]] = []
    real = module.read_shard

    def spy(src, shard, start_block=0, *args, **kwargs):
        opened.append((shard, start_block))
        return real(src, shard, start_block, *args, **kwargs)

    monkeypatch.setattr(module, "read_shard", spy)
    return opened
