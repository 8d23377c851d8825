"""The options of ``pretrain finetune`` as a dataclass: the CLI reads its defaults without importing torch."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass
class FinetuneArgs:
    """Options of one fine-tuning run (the CLI flags)."""

    checkpoint: str  #: pretrained checkpoint (step, checkpoints/ or run directory)
    data: str  #: CSV (header row) or JSONL file of examples
    output: str  #: directory for classifier.pt, finetune.json and tokenizer.model
    text_key: str = "text"  #: column / field holding the text
    label_key: str = "label"  #: column / field holding the label (string or integer)
    epochs: int = 3  #: passes over the training split
    lr: float = 5e-5  #: peak AdamW learning rate (linear warmup over the first 10% of steps, linear decay to 0)
    batch_size: int = 16  #: examples per optimizer step
    max_length: int = 0  #: tokens per example incl. EOS / [CLS] [SEP]; 0: min(128, model.seq_length)
    valid_fraction: float = 0.1  #: share of examples held out for accuracy (split by seed)
    seed: int = 1234  #: seeds the split, the head's init, dropout and the example order
    weight_decay: float = 0.01  #: AdamW decoupled weight decay (matrices only)
    dropout: float = 0.1  #: dropout on the pooled features before the classification layer
    log_every: int = 10  #: print the training loss every N steps
