"""What every family shares: the padded vocabulary and the default data readers."""

from __future__ import annotations

import dataclasses

from pretrain.config import Config
from pretrain.errors import ConfigError


def check_vocab_fits(cfg: Config, manifest: dict) -> None:
    """A set model.vocab_size must hold every id of the shards' tokenizer; a one-line ConfigError else."""
    if cfg.model.vocab_size and cfg.model.vocab_size < manifest["vocab_size"]:
        raise ConfigError(f"model.vocab_size ({cfg.model.vocab_size}) is smaller than the tokenizer's "
                          f"({manifest['vocab_size']})")


def padded_vocab_size(vocab_size: int, divisible_by: int, tensor_parallel: int) -> int:
    """Megatron's rule: pad the vocabulary so each TP shard of the embedding has an aligned row count."""
    multiple = divisible_by * tensor_parallel
    return -(-vocab_size // multiple) * multiple


def shard_readers(cfg: Config, reader_args: dict):
    """Shuffled, blended training reader and in-order validation reader (GPT, BERT): rows [b, s+1].

    Either is None when its data is not configured (``pretrain eval`` clears data.train).
    """
    from data_pipeline.reader import ShardReader

    sources = [{k: v for k, v in dataclasses.asdict(s).items() if v != ""} for s in cfg.data.train]
    train_data = ShardReader(sources, global_batch_size=cfg.train.global_batch_size, shuffle=cfg.data.shuffle,
                             shuffle_window_blocks=cfg.data.shuffle_window_blocks, loop=True, dtype="native",
                             owned_rows=True, **reader_args) if sources else None
    valid_data = ShardReader(cfg.data.valid, shuffle=False, loop=False, **reader_args) if cfg.data.valid else None
    for reader in (train_data, valid_data):
        if reader is not None:
            seq = reader.manifest["seq_length"]
            if seq != cfg.model.seq_length:
                raise ConfigError(f"model.seq_length ({cfg.model.seq_length}) does not match the shards in "
                                  f"{reader.sources[0].name} (seq_length {seq})")
            check_vocab_fits(cfg, reader.manifest)
    return train_data, valid_data
