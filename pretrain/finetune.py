"""`pretrain finetune`: sequence classification on a pretrained GPT or BERT checkpoint (pretrain, then fine-tune).

A single process: the checkpoint's whole model (any TP/PP layout, via pretrain.inference.load_model) plus a
linear head, trained with AdamW on a CSV or JSONL file of text + label. A seeded split holds out
``valid_fraction`` of the examples; accuracy on it is printed after every epoch and saved with the model.

Features: GPT uses the final hidden state (after the final LayerNorm) of the last real token, an EOS appended to
every text (the token every pretraining document ends with), as GPT-2's classifier does; right padding is
invisible to it under the causal mask. BERT uses ``[CLS] text [SEP]`` and the pretrained pooler (dense + tanh on
[CLS]), as in the paper; a BERT pretrained without NSP has no pooler and uses the [CLS] hidden state directly.
"""

from __future__ import annotations

import csv
import json
import math
import re
import shutil
import time
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F

from data_pipeline.corpus import iter_records
from data_pipeline.errors import DataError
from pretrain.config import ConfigError, OptimConfig
from pretrain.optim import lr_at, param_groups


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


def read_examples(path: str | Path, text_key: str, label_key: str) -> tuple[list[str], list]:
    """Texts and raw labels from a .csv (header row) or .jsonl file; DataError (one line, naming the file and
    key) for an unreadable or empty file, a missing column or a non-text value."""
    path = Path(path)
    suffix = path.suffix.lower()
    if suffix not in (".csv", ".jsonl", ".json"):
        raise DataError(f"{path}: unsupported data file type {suffix!r} (use .csv or .jsonl)")
    if not path.is_file():
        raise DataError(f"{path}: cannot read data file (no such file)")
    if suffix == ".csv":
        try:
            with open(path, newline="", encoding="utf-8") as f:
                records, where = list(csv.DictReader(f)), "row"
        except OSError as e:
            raise DataError(f"{path}: cannot read data file ({e.strerror})") from None
        except (UnicodeDecodeError, csv.Error) as e:
            raise DataError(f"{path}: not a readable csv file ({e})") from None
    else:  # the corpus reader's JSONL parsing: a bad line is a DataError naming file:line
        records, where = list(iter_records(path)), "line"
    if not records:
        raise DataError(f"{path}: no examples (empty file)")
    texts, labels = [], []
    for n, record in enumerate(records, 1):
        for key in (text_key, label_key):
            if key not in record or record[key] is None:
                raise DataError(f"{path}: {where} {n} has no {key!r} field (has: {', '.join(map(str, record))})")
        if not isinstance(record[text_key], str):
            raise DataError(f"{path}: {where} {n}: {text_key!r} is not text")
        if not isinstance(record[label_key], (str, int)) or isinstance(record[label_key], bool):
            raise DataError(f"{path}: {where} {n}: {label_key!r} must be a string or an integer")
        texts.append(record[text_key])
        labels.append(record[label_key])
    return texts, labels


def class_ids(labels: list, path: str, label_key: str) -> tuple[list, list[int]]:
    """(classes, class id per example). Integer labels (also "3" in a CSV) sort numerically and stay integers;
    anything else sorts as strings. DataError when there are fewer than two classes."""
    if all(isinstance(x, int) or re.fullmatch(r"-?\d+", x) for x in labels):
        labels = [int(x) for x in labels]
    else:
        labels = [str(x) for x in labels]
    classes = sorted(set(labels))
    if len(classes) < 2:
        raise DataError(f"{path}: {label_key!r} has one class only ({classes[0]!r}); classification needs two")
    index = {c: i for i, c in enumerate(classes)}
    return classes, [index[x] for x in labels]


def split_indices(n: int, valid_fraction: float, seed: int) -> tuple[list[int], list[int]]:
    """(train, valid) example indices: a seeded permutation, the first ``round(n * valid_fraction)`` (at least
    one) held out. Same n, fraction and seed give the same split anywhere."""
    order = torch.randperm(n, generator=torch.Generator().manual_seed(seed)).tolist()
    n_valid = max(1, round(n * valid_fraction))
    return sorted(order[n_valid:]), sorted(order[:n_valid])


class SequenceClassifier(torch.nn.Module):
    """A pretrained megatron-core GPTModel / BertModel with a classification layer on pooled features."""

    def __init__(self, backbone: torch.nn.Module, family: str, hidden_size: int, num_classes: int,
                 dropout: float):
        super().__init__()
        if family not in ("gpt", "bert"):
            raise ConfigError(f"model.family={family}: fine-tuning supports gpt and bert checkpoints")
        self.backbone, self.family = backbone, family
        # The LM / MLM head is unused here: without post_process the model returns the final hidden states.
        backbone.post_process = False
        self.dropout = torch.nn.Dropout(dropout)
        self.head = torch.nn.Linear(hidden_size, num_classes)
        torch.nn.init.normal_(self.head.weight, std=0.02)
        torch.nn.init.zeros_(self.head.bias)

    def forward(self, input_ids: torch.Tensor, lengths: torch.Tensor) -> torch.Tensor:
        """input_ids [b, s] right-padded, lengths [b] real tokens per row -> class logits [b, C]."""
        b, s = input_ids.shape
        if self.family == "gpt":
            positions = torch.arange(s, device=input_ids.device)[None]  # [1, s]
            # No mask tensor: the layers are causal by their mask type (pretrain/models/attention.py).
            hidden = self.backbone(input_ids=input_ids, position_ids=positions, attention_mask=None)  # [s, b, h]
            pooled = hidden[lengths - 1, torch.arange(b, device=input_ids.device)]  # last real token, [b, h]
        else:
            real = (torch.arange(s, device=input_ids.device)[None] < lengths[:, None]).long()  # [b, s], 1 = real
            hidden = self.backbone(input_ids=input_ids, attention_mask=real,
                                   tokentype_ids=torch.zeros_like(input_ids))  # [s, b, h]
            pooler = getattr(self.backbone, "pooler", None)
            pooled = pooler(hidden, 0) if pooler is not None else hidden[0]  # [CLS] -> [b, h]
        return self.head(self.dropout(pooled.float()))  # [b, C]


def encode(texts: list[str], tokenizer, family: str, max_length: int) -> list[list[int]]:
    """Token ids per text, truncated to ``max_length`` with the family's framing (GPT: text EOS; BERT: [CLS]
    text [SEP])."""
    if family == "gpt":
        return [tokenizer.encode(t)[: max_length - 1] + [tokenizer.eos_id] for t in texts]
    if tokenizer.cls_id is None or tokenizer.sep_id is None:
        raise DataError(f"{tokenizer.model_path}: tokenizer has no [CLS]/[SEP]; BERT fine-tuning needs them")
    return [[tokenizer.cls_id] + tokenizer.encode(t)[: max_length - 2] + [tokenizer.sep_id] for t in texts]


def _batch(rows: list[list[int]], pad_id: int, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    lengths = torch.tensor([len(r) for r in rows])
    ids = torch.full((len(rows), int(lengths.max())), pad_id, dtype=torch.long)  # [b, s], right-padded
    for i, row in enumerate(rows):
        ids[i, : len(row)] = torch.tensor(row)
    return ids.to(device), lengths.to(device)


@torch.no_grad()
def accuracy(model: SequenceClassifier, rows: list[list[int]], targets: list[int], pad_id: int,
             device: torch.device, batch_size: int = 32) -> float:
    """Share of ``rows`` whose argmax class equals the target (eval mode, no dropout)."""
    was_training = model.training
    model.eval()
    correct = 0
    for start in range(0, len(rows), batch_size):
        ids, lengths = _batch(rows[start:start + batch_size], pad_id, device)
        predicted = model(ids, lengths).argmax(-1).cpu()
        correct += int((predicted == torch.tensor(targets[start:start + batch_size])).sum())
    model.train(was_training)
    return correct / len(rows)


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
    from pretrain.inference import load_model, tokenizer_for

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
            ids, lengths = _batch([train_rows[i] for i in picked], tokenizer.pad_id, device)
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


def save(model: SequenceClassifier, record: dict, tokenizer, output: Path) -> None:
    """classifier.pt (state dict: ``backbone.*`` = the whole fine-tuned model, ``head.*``), finetune.json (labels
    in class-id order, accuracy, options) and the tokenizer, written last so finetune.json marks completion."""
    output.mkdir(parents=True, exist_ok=True)
    torch.save({k: v for k, v in model.state_dict().items() if not k.endswith("_extra_state")},
               output / "classifier.pt")
    shutil.copyfile(tokenizer.model_path, output / "tokenizer.model")
    (output / "finetune.json").write_text(json.dumps(record, indent=2) + "\n")
    print(f"finetune: saved {output / 'classifier.pt'} and {output / 'finetune.json'} (valid accuracy "
          f"{record['valid_accuracy']:.4f})", flush=True)


def load_classifier(output: str | Path) -> tuple[SequenceClassifier, dict]:
    """A fine-tuned classifier from its output directory (builds the architecture from the pretrained
    checkpoint named in finetune.json, then loads the fine-tuned weights), in eval mode; and its record."""
    from pretrain.inference import load_model

    output = Path(output)
    try:
        record = json.loads((output / "finetune.json").read_text())
    except OSError as e:
        raise DataError(f"{output}: no finetune.json ({e.strerror})") from None
    loaded = load_model(record["checkpoint"])
    model = SequenceClassifier(loaded.model.float(), record["family"], loaded.cfg.model.hidden_size,
                               record["num_labels"], record["dropout"]).to(loaded.device)
    state = torch.load(output / "classifier.pt", map_location=loaded.device)
    missing, unexpected = model.load_state_dict(state, strict=False)  # megatron's _extra_state is optional
    missing = [k for k in missing if not k.endswith("_extra_state")]
    if missing or unexpected:
        example = (missing + unexpected)[0]
        raise DataError(f"{output / 'classifier.pt'}: does not fit the checkpoint's model ({len(missing)} missing, "
                        f"{len(unexpected)} unexpected tensors, e.g. {example})")
    return model.eval(), record
