"""One fine-tuning run in a single process: the checkpoint's whole model (any TP/PP layout, via
pretrain.inference.loading.load_model) plus a linear head, trained with AdamW; accuracy on the held-out split
after every epoch, saved with the model."""

from __future__ import annotations

import logging
import math
import time
from pathlib import Path

import torch
import torch.nn.functional as F

from data_pipeline.errors import DataError
from pretrain.config import OptimConfig
from pretrain.errors import ConfigError
from pretrain.finetune.args import FinetuneArgs
from pretrain.finetune.classifier import SequenceClassifier, pad_batch, accuracy, encode, save
from pretrain.finetune.data import class_ids, read_examples, split_indices
from pretrain.optim import lr_at, param_groups

logger = logging.getLogger(__name__)


def _check_args(args: FinetuneArgs) -> None:
    for flag, ok in (("--epochs", args.epochs >= 1), ("--batch-size", args.batch_size >= 1),
                     ("--lr", args.lr > 0), ("--valid-fraction", 0 < args.valid_fraction < 1),
                     ("--max-length", args.max_length >= 0), ("--log-every", args.log_every >= 1),
                     ("--dropout", 0 <= args.dropout < 1)):
        if not ok:
            raise ConfigError(f"{flag}: bad value {getattr(args, flag[2:].replace('-', '_'))!r}")


def finetune(args: FinetuneArgs) -> dict:
    """Fine-tune, print progress, save ``classifier.pt`` + ``finetune.json`` + ``tokenizer.model`` in
    ``args.output``; returns the finetune.json record (labels, accuracy, split sizes, options)."""
    from pretrain.inference.loading import load_model, tokenizer_for

    _check_args(args)
    texts, raw_labels = read_examples(args.data, args.text_key, args.label_key)  # bad data fails before loading
    classes, targets = class_ids(raw_labels, args.data, args.label_key)
    train_idx, valid_idx = split_indices(len(texts), args.valid_fraction, args.seed)
    if not train_idx:
        raise DataError(f"{args.data}: {len(texts)} example(s) leave none for training after the validation split")
    loaded = load_model(args.checkpoint)
    cfg, tokenizer, device = loaded.cfg, tokenizer_for(loaded), loaded.device
    max_length = args.max_length or min(128, cfg.model.seq_length)
    if not 3 <= max_length <= cfg.model.seq_length:
        raise ConfigError(f"--max-length: {max_length} outside 3..{cfg.model.seq_length} (the model's seq_length)")
    torch.manual_seed(args.seed)
    # fp32 master weights (AdamW steps on bf16 weights round away); bf16 compute under autocast on CUDA.
    model = SequenceClassifier(loaded.model.float(), cfg.model.family, cfg.model.hidden_size, len(classes),
                               args.dropout).to(device).train()
    autocast = torch.autocast(device.type, dtype=torch.bfloat16, enabled=device.type == "cuda"
                              and cfg.train.precision != "fp32")
    rows = encode(texts, tokenizer, cfg.model.family, max_length)
    train_rows, valid_rows = [rows[i] for i in train_idx], [rows[i] for i in valid_idx]
    train_targets, valid_targets = [targets[i] for i in train_idx], [targets[i] for i in valid_idx]
    steps_per_epoch = math.ceil(len(train_rows) / args.batch_size)
    total = steps_per_epoch * args.epochs
    schedule = OptimConfig(lr=args.lr, min_lr=0.0, warmup_steps=max(1, total // 10), schedule="linear",
                           weight_decay=args.weight_decay)
    optimizer = torch.optim.AdamW(param_groups(model, args.weight_decay), lr=args.lr, betas=(0.9, 0.999))
    order_rng = torch.Generator().manual_seed(args.seed)
    print(f"finetune: {cfg.model.family} from {loaded.path} | {len(classes)} classes | {len(train_rows)} train / "
          f"{len(valid_rows)} valid examples from {args.data} | {args.epochs} epoch(s) x {steps_per_epoch} steps",
          flush=True)
    step, valid_accuracy, start = 0, 0.0, time.perf_counter()
    for epoch in range(1, args.epochs + 1):
        order = torch.randperm(len(train_rows), generator=order_rng).tolist()
        epoch_loss = 0.0
        for first in range(0, len(order), args.batch_size):
            picked = order[first:first + args.batch_size]
            ids, lengths = pad_batch([train_rows[i] for i in picked], tokenizer.pad_id, device)
            labels = torch.tensor([train_targets[i] for i in picked], device=device)
            for group in optimizer.param_groups:
                group["lr"] = lr_at(step, schedule, total)
            with autocast:
                loss = F.cross_entropy(model(ids, lengths).float(), labels)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
            optimizer.step()
            step += 1
            epoch_loss += loss.item() * len(picked)
            if step % args.log_every == 0:
                print(f"finetune: epoch {epoch} step {step}/{total} | loss {loss.item():.4f} | "
                      f"lr {optimizer.param_groups[0]['lr']:.2e}", flush=True)
        with autocast:
            valid_accuracy = accuracy(model, valid_rows, valid_targets, tokenizer.pad_id, device)
        print(f"finetune: epoch {epoch}/{args.epochs} | train loss {epoch_loss / len(order):.4f} | valid accuracy "
              f"{valid_accuracy:.4f} ({round(valid_accuracy * len(valid_rows))}/{len(valid_rows)})", flush=True)
    record = {"family": cfg.model.family, "checkpoint": str(loaded.path), "data": str(args.data),
              "labels": classes, "num_labels": len(classes), "valid_accuracy": valid_accuracy,
              "train_examples": len(train_rows), "valid_examples": len(valid_rows), "max_length": max_length,
              "text_key": args.text_key, "label_key": args.label_key, "epochs": args.epochs, "lr": args.lr,
              "batch_size": args.batch_size, "valid_fraction": args.valid_fraction, "seed": args.seed,
              "dropout": args.dropout, "train_time_s": round(time.perf_counter() - start, 2)}
    save(model, record, tokenizer, Path(args.output))
    return record
