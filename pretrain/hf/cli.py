"""``pretrain export hf``: argparse glue over pretrain/hf/export.py."""

from __future__ import annotations

import argparse

from pretrain.errors import ConfigError
from pretrain.inference.cli import CHECKPOINT_HELP


def _export_hf(args: argparse.Namespace, overrides: list[str]) -> int:
    from pretrain.hf.export import export_hf

    if not args.max_shard_gb > 0:
        raise ConfigError(f"--max-shard-gb: must be > 0, got {args.max_shard_gb}")
    export_hf(args.checkpoint, args.output, max_shard_bytes=int(args.max_shard_gb * 1e9))
    return 0


def _import_hf(args: argparse.Namespace, overrides: list[str]) -> int:
    from pretrain import config
    from pretrain.hf.hf_import import import_hf

    return import_hf(args.model, config.load(args.config, [*overrides, f"--checkpoint.dir={args.output}"]))


def register(sub: argparse._SubParsersAction) -> None:
    """Add `export hf` to the `pretrain` subcommands."""
    export = sub.add_parser("export", help="export a checkpoint to another format").add_subparsers(
        dest="export_format", required=True)
    p = export.add_parser("hf", help="Hugging Face directory: GPT -> GPT2LMHeadModel (LlamaForCausalLM with rotary "
                          "positions), BERT -> BertForPreTraining (RoFormerForMaskedLM with rotary positions)",
                          description="Writes config.json, model.safetensors, tokenizer.model (+ a sentencepiece "
                                      "LlamaTokenizer config) and README.md; loads with transformers' "
                                      "from_pretrained. Refuses models the HF class cannot express.")
    p.add_argument("--checkpoint", required=True, help=CHECKPOINT_HELP)
    p.add_argument("--output", required=True, help="output directory (created; existing files are replaced)")
    p.add_argument("--max-shard-gb", type=float, default=5.0,
                   help="split the weights into safetensors shards of at most this many GB, with "
                        "model.safetensors.index.json (default 5, as transformers' save_pretrained)")
    p.set_defaults(func=_export_hf, builds_models=True)
    imp = sub.add_parser("import", help="import a model from another format").add_subparsers(
        dest="import_format", required=True)
    p = imp.add_parser("hf", help="Hugging Face directory (GPT-2, Llama, BERT, RoFormer) -> step_0 checkpoint at "
                                  "the config's layout",
                       description="The config's model section must match the HF config.json (one-line error naming "
                                   "the first mismatch). Run like `pretrain train`: one process or under torchrun/srun "
                                   "with the config's world size. Then `pretrain train CFG` with checkpoint.dir (or "
                                   "run.dir/checkpoints) = OUTPUT continues from step 0. "
                                   "Overrides: --section.key=value.")
    p.add_argument("--model", required=True, help="local Hugging Face model directory (config.json + safetensors)")
    p.add_argument("--config", required=True, help="run config (YAML) whose model section describes the HF model")
    p.add_argument("--output", required=True, help="checkpoint directory, e.g. RUN/checkpoints (step_0 goes in it)")
    p.set_defaults(func=_import_hf, accepts_overrides=True, builds_models=True)
