"""Fine-tuning examples: text + label from a CSV or JSONL file, class ids, and a seeded train/valid split."""

from __future__ import annotations

import csv
import re
from pathlib import Path

import torch

from data_pipeline.corpus import iter_records
from data_pipeline.errors import DataError


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
