"""`pretrain tokenizer train` and `pretrain data prepare`: argparse glue over the data pipeline.

`register(subparsers)` adds both command groups to the `pretrain` parser. Every leaf parser sets `func(args,
overrides)` returning exit code 0; bad input raises DataError, which `pretrain` prints as one `error:` line and
exits with 2, as for every other subcommand.
"""

from __future__ import annotations

import argparse
import contextlib
import tempfile
from typing import Iterator

from data_pipeline.errors import DataError


def _add_input_args(parser: argparse.ArgumentParser, bundled_choices: tuple[str, ...]) -> None:
    source = parser.add_mutually_exclusive_group()
    source.add_argument("--input", action="append", metavar="PATH_OR_GLOB",
                        help="corpus file(s): .txt (one document per file) or .jsonl[.gz|.xz]; repeatable, globs ok")
    source.add_argument("--bundled", nargs="?", const="train", choices=bundled_choices, metavar="SPLIT",
                        help="use the bundled Shakespeare corpus instead of --input "
                             f"(split: {'|'.join(bundled_choices)}; default train)")
    parser.add_argument("--text-key", default="text", help="JSON field holding the text in .jsonl inputs")


@contextlib.contextmanager
def _inputs(args: argparse.Namespace) -> Iterator[list[str]]:
    """The input list: --input as given, or the bundled split extracted to a temporary directory."""
    if args.input:
        yield list(args.input)
    elif args.bundled:
        from data_pipeline.corpus import extract_bundled

        with tempfile.TemporaryDirectory(prefix="pretrain-bundled-") as tmp:
            yield [str(extract_bundled(tmp)[args.bundled])]
    else:
        raise DataError("no corpus given: pass --input PATH (repeatable) or --bundled")


def _tokenizer_train(args: argparse.Namespace) -> int:
    from data_pipeline.tokenizer import train_tokenizer

    with _inputs(args) as inputs:
        path = train_tokenizer(inputs, args.output, args.vocab_size, model_type=args.model_type,
                               character_coverage=args.character_coverage,
                               input_sentence_size=args.input_sentence_size, num_threads=args.threads,
                               text_key=args.text_key, verbose=args.verbose)
    print(f"tokenizer: wrote {path}")
    return 0


def _data_prepare(args: argparse.Namespace) -> int:
    from data_pipeline.shards import prepare_shards

    with _inputs(args) as inputs:
        prepare_shards(inputs, args.tokenizer, args.output, args.seq_length,
                       samples_per_shard=args.samples_per_shard, sequences_per_sample=args.sequences_per_sample,
                       text_key=args.text_key, prefix=args.prefix)
    return 0


def register(subparsers) -> None:
    """Add the `tokenizer train` and `data prepare` command groups to a `add_subparsers()` object."""
    tok = subparsers.add_parser("tokenizer", help="train a sentencepiece tokenizer")
    tok_sub = tok.add_subparsers(dest="tokenizer_command", metavar="{train}", required=True)
    train = tok_sub.add_parser("train", help="train a sentencepiece model on corpus files",
                               description="Train a sentencepiece tokenizer (pad=0 unk=1 bos=2 eos=3).")
    _add_input_args(train, ("train",))
    train.add_argument("--output", required=True, metavar="PREFIX",
                       help="output prefix: writes PREFIX.model and PREFIX.vocab")
    train.add_argument("--vocab-size", type=int, default=8000)
    train.add_argument("--model-type", choices=("bpe", "unigram"), default="bpe")
    train.add_argument("--character-coverage", type=float, default=1.0)
    train.add_argument("--input-sentence-size", type=int, default=0,
                       help="sample this many lines for training (0: all; bounds memory on big corpora)")
    train.add_argument("--threads", type=int, default=2)
    train.add_argument("--verbose", action="store_true", help="show sentencepiece's own training log")
    train.set_defaults(func=lambda args, overrides: _tokenizer_train(args))

    data = subparsers.add_parser("data", help="prepare token shards")
    data_sub = data.add_subparsers(dest="data_command", metavar="{prepare}", required=True)
    prep = data_sub.add_parser("prepare", help="tokenize a corpus into WebDataset shards + manifest.json",
                               description="Tokenize documents into rows of seq_length+1 tokens, packed into "
                                           "reproducible WebDataset tar shards with a manifest.json.")
    _add_input_args(prep, ("train", "valid"))
    prep.add_argument("--tokenizer", required=True, metavar="MODEL", help="sentencepiece .model file")
    prep.add_argument("--output", required=True, metavar="DIR", help="directory for shards and manifest.json")
    prep.add_argument("--seq-length", type=int, required=True, help="tokens per training sequence (rows hold +1)")
    prep.add_argument("--samples-per-shard", type=int, default=2048,
                      help="tar members (blocks) per shard; keep shards >= data-parallel ranks")
    prep.add_argument("--sequences-per-sample", type=int, default=64, help="sequences packed per tar member")
    prep.add_argument("--prefix", default="shard", help="shard file name prefix: PREFIX-000000.tar")
    prep.set_defaults(func=lambda args, overrides: _data_prepare(args))
