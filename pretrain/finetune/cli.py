"""``pretrain finetune``: argparse glue over pretrain/finetune/run.py. Bad input raises ConfigError / DataError /
CheckpointError, which `pretrain` prints as one ``error:`` line and exits with 2."""

from __future__ import annotations

import argparse

from pretrain.inference.cli import CHECKPOINT_HELP


def _finetune(args: argparse.Namespace, overrides: list[str]) -> int:
    from pretrain.finetune.run import FinetuneArgs, finetune

    finetune(FinetuneArgs(checkpoint=args.checkpoint, data=args.data, output=args.output, text_key=args.text_key,
                          label_key=args.label_key, epochs=args.epochs, lr=args.lr, batch_size=args.batch_size,
                          max_length=args.max_length, valid_fraction=args.valid_fraction, seed=args.seed,
                          weight_decay=args.weight_decay, dropout=args.dropout, log_every=args.log_every))
    return 0


def register(sub: argparse._SubParsersAction) -> None:
    """Add `finetune` to the `pretrain` subcommands."""
    from pretrain.finetune.args import FinetuneArgs

    d = FinetuneArgs("", "", "")  # defaults, documented once on the dataclass
    p = sub.add_parser("finetune", help="sequence classification on a pretrained GPT or BERT checkpoint",
                       description="Trains a classification head (and the whole model) with AdamW on a CSV or "
                                   "JSONL file of text + label; prints accuracy on a held-out split; saves "
                                   "classifier.pt + finetune.json in --output.")
    p.add_argument("--checkpoint", required=True, help=CHECKPOINT_HELP)
    p.add_argument("--data", required=True, help="CSV (with a header row) or JSONL file of examples")
    p.add_argument("--output", required=True, help="directory for classifier.pt, finetune.json, tokenizer.model")
    p.add_argument("--text-key", default=d.text_key, help="column / field with the text (default %(default)s)")
    p.add_argument("--label-key", default=d.label_key,
                   help="column / field with the label, a string or an integer (default %(default)s)")
    p.add_argument("--epochs", type=int, default=d.epochs, help="passes over the training split (%(default)s)")
    p.add_argument("--lr", type=float, default=d.lr,
                   help="peak AdamW learning rate; warmup 10%% of steps, linear decay to 0 (%(default)s)")
    p.add_argument("--batch-size", type=int, default=d.batch_size, help="examples per step (%(default)s)")
    p.add_argument("--max-length", type=int, default=d.max_length,
                   help="tokens per example incl. EOS or [CLS]/[SEP]; 0: min(128, model.seq_length)")
    p.add_argument("--valid-fraction", type=float, default=d.valid_fraction,
                   help="share of examples held out for accuracy, split by --seed (%(default)s)")
    p.add_argument("--seed", type=int, default=d.seed, help="split, head init, dropout and order (%(default)s)")
    p.add_argument("--weight-decay", type=float, default=d.weight_decay, help="AdamW weight decay (%(default)s)")
    p.add_argument("--dropout", type=float, default=d.dropout, help="dropout before the head (%(default)s)")
    p.add_argument("--log-every", type=int, default=d.log_every, help="print the loss every N steps")
    p.set_defaults(func=_finetune, builds_models=True)
