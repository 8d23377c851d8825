"""``pretrain eval``: validation loss and perplexity of a checkpoint, read the way its family trains."""

from __future__ import annotations

from pathlib import Path

import torch

from pretrain.errors import CheckpointError
from pretrain.evaluate import evaluate
from pretrain.inference.loading import load_model


def evaluate_checkpoint(path: str | Path, data_dir: str | None = None, max_batches: int = 0) -> dict:
    """Validation loss/perplexity of a checkpoint on ``data_dir`` (default: the run's data.valid), read the way
    its family trains (Transformer-XL: ordered lanes, with memory at the evaluation mem_length/clamp_len)."""
    loaded = load_model(path)
    cfg = loaded.cfg
    cfg.data.valid = data_dir or cfg.data.valid
    if not cfg.data.valid:
        raise CheckpointError(f"{loaded.path}: the run has no data.valid; pass --data")
    cfg.data.train = []  # evaluation reads only the validation split
    reader_args = dict(micro_batch_size=cfg.train.micro_batch_size, seed=cfg.run.seed)
    _, reader = loaded.spec.make_readers(cfg, reader_args)
    batch_fn = loaded.spec.make_batch_fn(cfg, reader.manifest)
    model, loss_fn = loaded.model, loaded.spec.loss_fn
    return evaluate(model, lambda batches: torch.stack([loss_fn(model(**b["inputs"]), b) for b in batches]),
                    batch_fn, reader, loaded.device, max_batches)
