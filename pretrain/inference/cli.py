"""``pretrain eval`` and ``pretrain generate``: argparse glue over evaluation.py and generation.py."""

from __future__ import annotations

import argparse
import sys

CHECKPOINT_HELP = "a checkpoints/step_<N> directory, a checkpoints/ directory or a run directory (newest step)"


def _eval(args: argparse.Namespace, overrides: list[str]) -> int:
    from pretrain.inference.evaluation import evaluate_checkpoint

    result = evaluate_checkpoint(args.checkpoint, data_dir=args.data, max_batches=args.max_batches)
    print(f"{args.checkpoint}: val loss {result['loss']:.4f} | perplexity {result['ppl']:.2f} | "
          f"{result['tokens']} tokens")
    return 0


def _generate(args: argparse.Namespace, overrides: list[str]) -> int:
    from pretrain.inference.generation import generate_from_checkpoint

    generate_from_checkpoint(args.checkpoint, args.prompt, max_new_tokens=args.max_new_tokens,
                             temperature=0.0 if args.greedy else args.temperature, top_k=args.top_k,
                             top_p=args.top_p, seed=args.seed, stream=sys.stdout)
    return 0


def register(sub: argparse._SubParsersAction) -> None:
    """Add `eval` and `generate` to the `pretrain` subcommands."""
    p = sub.add_parser("eval", help="validation loss and perplexity of a checkpoint")
    p.add_argument("--checkpoint", required=True, help=CHECKPOINT_HELP)
    p.add_argument("--data", default=None, help="validation shard directory (default: the run's data.valid)")
    p.add_argument("--max-batches", type=int, default=0, help="cap on validation micro batches (0: all)")
    p.set_defaults(func=_eval, builds_models=True)

    p = sub.add_parser("generate", help="continue a prompt with a trained checkpoint")
    p.add_argument("--checkpoint", required=True, help=CHECKPOINT_HELP)
    p.add_argument("--prompt", required=True)
    p.add_argument("--max-new-tokens", type=int, default=60)
    p.add_argument("--greedy", action="store_true", help="argmax decoding (ignores temperature/top-k/top-p)")
    p.add_argument("--temperature", type=float, default=0.8, help="softmax temperature when sampling")
    p.add_argument("--top-k", type=int, default=40, help="sample among the K most likely tokens (0: all)")
    p.add_argument("--top-p", type=float, default=1.0,
                   help="sample from the smallest set of tokens whose probability reaches P (1: all)")
    p.add_argument("--seed", type=int, default=0, help="sampling seed (same seed, same text)")
    p.set_defaults(func=_generate, builds_models=True)
