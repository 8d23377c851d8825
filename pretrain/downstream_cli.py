"""`pretrain finetune` and `pretrain export hf`: argparse glue over pretrain/finetune.py and pretrain/export.py.

`register(subparsers)` adds both commands to the `pretrain` parser. Every leaf parser sets `func(args,
overrides)` returning exit code 0; bad input raises ConfigError / DataError / CheckpointError, which `pretrain`
prints as one `error:` line and exits with 2.
"""

from __future__ import annotations

import argparse

CHECKPOINT_HELP = "a checkpoints/step_<N> directory, a checkpoints/ directory or a run directory (newest step)"


def _finetune(args: argparse.Namespace, overrides: list[str]) -> int:
    from pretrain.finetune import FinetuneArgs, finetune

    finetune(FinetuneArgs(checkpoint=args.checkpoint, data=args.data, output=args.output, text_key=args.text_key,
                          label_key=args.label_key, epochs=args.epochs, lr=args.lr, batch_size=args.batch_size,
                          max_length=args.max_length, valid_fraction=args.valid_fraction, seed=args.seed,
                          weight_decay=args.weight_decay, dropout=args.dropout, log_every=args.log_every))
    return 0


def _export_hf(args: argparse.Namespace, overrides: list[str]) -> int:
    from pretrain.export import export_hf

    export_hf(args.checkpoint, args.output)
    return 0


def register(sub: argparse._SubParsersAction) -> None:
    """Add `finetune` and `export hf` to the `pretrain` subcommands."""
    from pretrain.finetune import FinetuneArgs

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
    p.set_defaults(func=_finetune)

    export = sub.add_parser("export", help="export a checkpoint to another format").add_subparsers(
        dest="export_format", required=True)
    p = export.add_parser("hf", help="Hugging Face directory: GPT -> GPT2LMHeadModel, BERT -> BertForPreTraining",
                          description="Writes config.json, model.safetensors, tokenizer.model (+ a sentencepiece "
                                      "LlamaTokenizer config) and README.md; loads with transformers' "
                                      "from_pretrained. Refuses models the HF class cannot express.")
    p.add_argument("--checkpoint", required=True, help=CHECKPOINT_HELP)
    p.add_argument("--output", required=True, help="output directory (created; existing files are replaced)")
    p.set_defaults(func=_export_hf)
