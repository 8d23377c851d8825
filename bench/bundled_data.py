"""Shared by the training benchmarks: tokenizer and shards of the bundled corpus, built once per directory."""

from __future__ import annotations

import pathlib
import sys

REPO = pathlib.Path(__file__).resolve().parents[1]


def build_data(out: pathlib.Path, vocab_size: int, seq_length: int) -> dict:
    """{"tokenizer", "train"} paths under ``out``: a BPE tokenizer of ``vocab_size`` and training shards of
    ``seq_length`` (reused when present)."""
    sys.path.insert(0, str(REPO))
    from data_pipeline.corpus import extract_bundled
    from data_pipeline.shards import prepare_shards
    from data_pipeline.tokenizer import train_tokenizer

    paths = {"tokenizer": out / "tokenizer.model", "train": out / "train"}
    if not (paths["train"] / "manifest.json").is_file():
        splits = extract_bundled(out / "corpus")
        train_tokenizer([str(splits["train"])], str(out / "tokenizer"), vocab_size=vocab_size)
        prepare_shards([str(splits["train"])], str(paths["tokenizer"]), str(paths["train"]), seq_length=seq_length,
                       samples_per_shard=8, sequences_per_sample=64, prefix="train")
    return paths
