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
from data_pipeline.tokenizer import DEFAULT_INPUT_SENTENCES


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


def _symbol_list(value: str) -> list[str]:
    """`--special-symbols "[CLS],[SEP],[MASK]"` -> list; "" -> [] (comma-separated, as in sentencepiece's spm_train)."""
    return [s.strip() for s in value.split(",") if s.strip()]


def _tokenizer_train(args: argparse.Namespace) -> int:
    from data_pipeline.tokenizer import train_tokenizer

    with _inputs(args) as inputs:
        path = train_tokenizer(inputs, args.output, args.vocab_size, model_type=args.model_type,
                               character_coverage=args.character_coverage, byte_fallback=args.byte_fallback,
                               input_sentence_size=args.input_sentence_size,
                               shuffle_input_sentence=args.shuffle_input_sentence, num_threads=args.threads,
                               text_key=args.text_key, special_symbols=_symbol_list(args.special_symbols),
                               user_defined_symbols=_symbol_list(args.user_defined_symbols), verbose=args.verbose,
                               seed=args.seed)
    print(f"tokenizer: wrote {path}")
    return 0


def _data_prepare(args: argparse.Namespace) -> int:
    from data_pipeline.shards import prepare_shards
    from data_pipeline.tasks import prepare_task, task_index_default

    if args.num_tasks is not None:
        index = args.task_index if args.task_index is not None else task_index_default()
        if args.num_tasks < 1 or index is None:
            raise DataError(f"data prepare: --num-tasks {args.num_tasks} needs --task-index (or SLURM_ARRAY_TASK_ID)"
                            f" and at least 1 task")
        with _inputs(args) as inputs:
            ran = prepare_task(inputs, args.tokenizer, args.output, args.seq_length, num_tasks=args.num_tasks,
                               task_index=index, samples_per_shard=args.samples_per_shard,
                               sequences_per_sample=args.sequences_per_sample, text_key=args.text_key,
                               workers=args.workers)
        print(f"data prepare: task {index} of {args.num_tasks} {'done' if ran else 'had already finished'}")
        return 0
    with _inputs(args) as inputs:
        prepare_shards(inputs, args.tokenizer, args.output, args.seq_length,
                       samples_per_shard=args.samples_per_shard, sequences_per_sample=args.sequences_per_sample,
                       text_key=args.text_key, prefix=args.prefix, workers=args.workers)
    return 0


def _data_merge(args: argparse.Namespace) -> int:
    from data_pipeline.tasks import merge_tasks

    manifest = merge_tasks(args.dir)
    print(f"data merge: {manifest['tasks']} tasks, {len(manifest['shards'])} shards, {manifest['num_documents']} "
          f"documents, {manifest['num_tokens']} tokens -> {args.dir}/manifest.json")
    return 0


def register(subparsers) -> None:
    """Add the `tokenizer train` and `data prepare` command groups to a `add_subparsers()` object."""
    tok = subparsers.add_parser("tokenizer", help="train a sentencepiece tokenizer")
    tok_sub = tok.add_subparsers(dest="tokenizer_command", metavar="{train}", required=True)
    train = tok_sub.add_parser("train", help="train a sentencepiece model on corpus files",
                               description="Train a sentencepiece tokenizer: pad=0 unk=1 bos=2 eos=3, then the "
                                           "special symbols (default [CLS]=4 [SEP]=5 [MASK]=6, for BERT).")
    _add_input_args(train, ("train",))
    train.add_argument("--output", required=True, metavar="PREFIX",
                       help="output prefix: writes PREFIX.model and PREFIX.vocab")
    train.add_argument("--vocab-size", type=int, default=8000)
    train.add_argument("--model-type", choices=("bpe", "unigram"), default="bpe")
    train.add_argument("--character-coverage", type=float, default=1.0,
                       help="fraction of characters covered by pieces (e.g. 0.9995 for CJK); the rest: bytes/unk")
    train.add_argument("--byte-fallback", action=argparse.BooleanOptionalAction, default=True,
                       help="encode characters outside the vocabulary as byte pieces instead of <unk>")
    train.add_argument("--input-sentence-size", type=int, default=DEFAULT_INPUT_SENTENCES,
                       help="train on a seeded sample of this many lines, uniform over all inputs (default "
                            "%(default)s: bounded memory on any corpus; 0: every line)")
    train.add_argument("--seed", type=int, default=0, help="seed of the line sample")
    train.add_argument("--shuffle-input-sentence", action=argparse.BooleanOptionalAction, default=True,
                       help="with --input-sentence-size, sample lines at random (seeded) instead of the first N")
    train.add_argument("--special-symbols", default="[CLS],[SEP],[MASK]", metavar="A,B,...",
                       help="comma-separated control symbols with ids 4, 5, ... (never produced from text); "
                            "'' for none (default: %(default)s)")
    train.add_argument("--user-defined-symbols", default="", metavar="A,B,...",
                       help="comma-separated pieces always kept as one token when they occur in text")
    train.add_argument("--threads", type=int, default=2)
    train.add_argument("--verbose", action="store_true", help="show sentencepiece's own training log")
    train.set_defaults(func=lambda args, overrides: _tokenizer_train(args))

    data = subparsers.add_parser("data", help="prepare token shards")
    data_sub = data.add_subparsers(dest="data_command", metavar="{prepare,merge}", required=True)
    prep = data_sub.add_parser("prepare", help="tokenize a corpus into WebDataset shards + manifest.json",
                               description="Tokenize documents into rows of seq_length+1 tokens, packed into "
                                           "reproducible WebDataset tar shards with a manifest.json.")
    _add_input_args(prep, ("train", "valid"))
    prep.add_argument("--tokenizer", required=True, metavar="MODEL", help="sentencepiece .model file")
    prep.add_argument("--output", required=True, metavar="DIR", help="directory for shards and manifest.json")
    prep.add_argument("--seq-length", type=int, required=True, help="tokens per training sequence (rows hold +1)")
    prep.add_argument("--samples-per-shard", type=int, default=2048,
                      help="tar members (blocks of --sequences-per-sample rows) per shard")
    prep.add_argument("--sequences-per-sample", type=int, default=64, help="sequences packed per tar member")
    prep.add_argument("--prefix", default="shard", help="shard file name prefix: PREFIX-000000.tar")
    prep.add_argument("--workers", type=int, default=None, metavar="N",
                      help="tokenizer processes (default: min(4, CPUs); 0 or 1: in this process); "
                           "the shards are identical for any N")
    prep.add_argument("--num-tasks", type=int, default=None, metavar="N",
                      help="prepare as N independent tasks (a job array): this run does one share of the input "
                           "(by file, and by byte range inside .jsonl files); then `data merge DIR`")
    prep.add_argument("--task-index", type=int, default=None, metavar="I",
                      help="which task, 0..N-1 (default: SLURM_ARRAY_TASK_ID)")
    prep.set_defaults(func=lambda args, overrides: _data_prepare(args))
    merge = data_sub.add_parser("merge", help="check every prepare task finished and write manifest.json",
                                description="After `data prepare --num-tasks N`: names any missing task, else "
                                            "writes the tasks' tails as shards and the merged manifest.json.")
    merge.add_argument("dir", metavar="DIR", help="the --output directory of the prepare tasks")
    merge.set_defaults(func=lambda args, overrides: _data_merge(args))
