"""``pretrain`` command line (also ``python -m pretrain``).

Subcommands: ``train``, ``eval``, ``generate``, ``demo``, ``tokenizer train``, ``data prepare``, ``finetune``,
``export hf``, ``launch local``, ``launch slurm``. Heavy imports (megatron-core, DeepSpeed) happen inside the
subcommand, so ``--help`` and config errors are instant.
"""

from __future__ import annotations

import argparse
import sys
import warnings


def _train(args, overrides: list[str]) -> int:
    from pretrain import config

    for flag, value in [("--world-size", args.world_size), ("--gpu-memory-gib", args.gpu_memory_gib)]:
        if value is not None and not args.dry_run:  # a real run takes its world from the launcher
            raise config.ConfigError(f"{flag}: only with --dry-run")
    if args.dry_run:
        if args.world_size is None:
            raise config.ConfigError("--world-size: required with --dry-run (the world to plan for, e.g. 512)")
        from pretrain.parallel.plan import dry_run

        gpu_memory_gib = 80.0 if args.gpu_memory_gib is None else args.gpu_memory_gib
        return dry_run(config.load(args.config, overrides), args.world_size, gpu_memory_gib)
    from pretrain.train import main

    return main(config.load(args.config, overrides))


def _eval(args, overrides: list[str]) -> int:
    from pretrain.inference import evaluate_checkpoint

    result = evaluate_checkpoint(args.checkpoint, data_dir=args.data, max_batches=args.max_batches)
    print(f"{args.checkpoint}: val loss {result['loss']:.4f} | perplexity {result['ppl']:.2f} | "
          f"{result['tokens']} tokens")
    return 0


def _generate(args, overrides: list[str]) -> int:
    from pretrain.inference import generate_from_checkpoint

    generate_from_checkpoint(args.checkpoint, args.prompt, max_new_tokens=args.max_new_tokens,
                             temperature=0.0 if args.greedy else args.temperature, top_k=args.top_k,
                             top_p=args.top_p, seed=args.seed, stream=sys.stdout)
    return 0


def _demo(args, overrides: list[str]) -> int:
    from pretrain.demo import run_demo

    return run_demo(args.dir, steps=args.steps, overrides=overrides)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="pretrain", description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("train", help="train from a YAML config (works under torchrun and srun)",
                       description="Overrides: --section.key=value, e.g. --train.steps=60 --parallel.zero_stage=2")
    p.add_argument("config", help="YAML run config, e.g. configs/debug/gpt_tiny.yaml")
    p.add_argument("--dry-run", action="store_true",
                   help="check the layout and print parameters and memory per GPU for --world-size; no GPUs needed")
    p.add_argument("--world-size", type=int, default=None, help="world to plan for with --dry-run, e.g. 512")
    p.add_argument("--gpu-memory-gib", type=float, default=None,
                   help="GPU memory the --dry-run estimate must fit (default 80; 10%% is kept in reserve)")
    p.set_defaults(func=_train, accepts_overrides=True)

    p = sub.add_parser("eval", help="validation loss and perplexity of a checkpoint")
    p.add_argument("--checkpoint", required=True, help="a checkpoints/step_<N> directory (or its run directory)")
    p.add_argument("--data", default=None, help="validation shard directory (default: the run's data.valid)")
    p.add_argument("--max-batches", type=int, default=0, help="cap on validation micro batches (0: all)")
    p.set_defaults(func=_eval)

    p = sub.add_parser("generate", help="continue a prompt with a trained checkpoint")
    p.add_argument("--checkpoint", required=True, help="a checkpoints/step_<N> directory (or its run directory)")
    p.add_argument("--prompt", required=True)
    p.add_argument("--max-new-tokens", type=int, default=60)
    p.add_argument("--greedy", action="store_true", help="argmax decoding (ignores temperature/top-k/top-p)")
    p.add_argument("--temperature", type=float, default=0.8, help="softmax temperature when sampling")
    p.add_argument("--top-k", type=int, default=40, help="sample among the K most likely tokens (0: all)")
    p.add_argument("--top-p", type=float, default=1.0,
                   help="sample from the smallest set of tokens whose probability reaches P (1: all)")
    p.add_argument("--seed", type=int, default=0, help="sampling seed (same seed, same text)")
    p.set_defaults(func=_generate)

    p = sub.add_parser("demo", help="tokenizer → shards → tiny GPT on the bundled Shakespeare → eval → generate")
    p.add_argument("--dir", default="runs/demo", help="where the demo writes everything")
    p.add_argument("--steps", type=int, default=300)
    p.set_defaults(func=_demo, accepts_overrides=True)

    from data_pipeline.cli import register

    register(sub)
    from pretrain import downstream_cli

    downstream_cli.register(sub)  # finetune, export hf
    from launch import cli as launch_cli

    launch_cli.register(sub)  # launch local, launch slurm
    return parser


def main(argv: list[str] | None = None) -> int:
    """Entry point of the ``pretrain`` console script."""
    from pretrain.checkpoint import CheckpointError
    from pretrain.config import ConfigError
    from data_pipeline.errors import DataError

    # megatron-core warns once per layer that Apex/TE are missing; on CPU that is the expected configuration.
    warnings.filterwarnings("ignore", message=".*(Apex|Transformer Engine).* not installed")
    # torch's own c10d wrappers deprecate the collectives DeepSpeed calls; nothing for a user to act on.
    warnings.filterwarnings("ignore", category=FutureWarning, module="torch.distributed")
    from pretrain.log import setup_logging

    setup_logging()
    argv = sys.argv[1:] if argv is None else argv
    parser = build_parser()
    args, extra = parser.parse_known_args(argv)
    overrides = [a for a in extra if a.startswith("--") and "=" in a and "." in a.split("=", 1)[0]]
    unknown = [a for a in extra if a not in overrides]
    if unknown or (overrides and not getattr(args, "accepts_overrides", False)):
        parser.error(f"unrecognized arguments: {' '.join(unknown or overrides)}")
    try:
        return args.func(args, overrides)
    except (ConfigError, DataError, CheckpointError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
