"""Data pipeline: corpus reading, sentencepiece tokenizer, WebDataset shard writing and deterministic reading.

Importing this package is cheap and never touches torch.distributed: the heavier modules (webdataset, which in
turn imports torch when it is installed) load on first attribute access.
"""

from data_pipeline.errors import DataError

# name -> defining submodule; resolved lazily by __getattr__ below.
_LAZY = {
    "bundled_corpus_path": "corpus",
    "read_documents": "corpus",
    "extract_bundled": "corpus",
    "expand_inputs": "corpus",
    "train_tokenizer": "tokenizer",
    "Tokenizer": "tokenizer",
    "prepare_shards": "shards",
    "ShardReader": "reader",
    "StreamReader": "stream",
    "gpt_batch": "batches",
    "bert_batch": "batches",
    "txl_batch": "batches",
}

__all__ = ["DataError", *_LAZY]


def __getattr__(name: str):
    """Import public names on first use (PEP 562) so `import data_pipeline` stays light."""
    if name in _LAZY:
        import importlib

        value = getattr(importlib.import_module(f"data_pipeline.{_LAZY[name]}"), name)
        globals()[name] = value
        return value
    raise AttributeError(f"module 'data_pipeline' has no attribute {name!r}")
