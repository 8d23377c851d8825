"""``pretrain export hf``: argparse glue over pretrain/hf/export.py."""

from __future__ import annotations

import argparse

from pretrain.inference.cli import CHECKPOINT_HELP


def _export_hf(args: argparse.Namespace, overrides: list[str]) -> int:
    from pretrain.hf.export import export_hf

    export_hf(args.checkpoint, args.output)
    return 0


def register(sub: argparse._SubParsersAction) -> None:
    """Add `export hf` to the `pretrain` subcommands."""
    export = sub.add_parser("export", help="export a checkpoint to another format").add_subparsers(
        dest="export_format", required=True)
    p = export.add_parser("hf", help="Hugging Face directory: GPT -> GPT2LMHeadModel, BERT -> BertForPreTraining",
                          description="Writes config.json, model.safetensors, tokenizer.model (+ a sentencepiece "
                                      "LlamaTokenizer config) and README.md; loads with transformers' "
                                      "from_pretrained. Refuses models the HF class cannot express.")
    p.add_argument("--checkpoint", required=True, help=CHECKPOINT_HELP)
    p.add_argument("--output", required=True, help="output directory (created; existing files are replaced)")
    p.set_defaults(func=_export_hf, builds_models=True)
