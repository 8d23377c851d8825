"""``pretrain`` command line (also ``python -m pretrain``): the root parser.

``train`` and ``demo`` live here; every package adds its own subcommands with a ``register(subparsers)``
function (one that builds models sets ``builds_models``: the CPU shims then go in before megatron-core loads): data_pipeline (``tokenizer train``, ``data prepare``), inference (``eval``, ``generate``), finetune,
hf (``export hf``). Packages above this one — launch (``launch local|slurm``) — register through the
``pretrain.commands`` entry-point group (pyproject.toml), so the library never imports the launcher. Heavy
imports (megatron-core, DeepSpeed) happen inside the subcommand, so ``--help`` and config errors are instant.
"""

from __future__ import annotations

import argparse
import logging
import sys
import warnings
from importlib.metadata import entry_points

logger = logging.getLogger(__name__)

#: Entry-point group of the subcommands of packages that sit above pretrain (launch): name -> register function.
COMMANDS_GROUP = "pretrain.commands"


def _train(args, overrides: list[str]) -> int:
    from pretrain import config
    from pretrain.errors import ConfigError

    for flag, value in [("--world-size", args.world_size), ("--gpu-memory-gib", args.gpu_memory_gib)]:
        if value is not None and not args.dry_run:  # a real run takes its world from the launcher
            raise ConfigError(f"{flag}: only with --dry-run")
    if args.dry_run:
        if args.world_size is None:
            raise ConfigError("--world-size: required with --dry-run (the world to plan for, e.g. 512)")
        from pretrain.parallel.plan import dry_run

        gpu_memory_gib = 80.0 if args.gpu_memory_gib is None else args.gpu_memory_gib
        return dry_run(config.load(args.config, overrides), args.world_size, gpu_memory_gib)
    cfg = config.load(args.config, overrides)  # before megatron-core's import: a bad key fails in a second
    from pretrain.train import main

    return main(cfg)


def _demo(args, overrides: list[str]) -> int:
    from pretrain.demo import run_demo

    return run_demo(args.dir, steps=args.steps, overrides=overrides)


def _report(args, overrides: list[str]) -> int:
    from pretrain.metrics.report import report

    page = report(args.run_dir)
    print(f"report: {page} (plots: {page.with_name('report.png')})")
    return 0


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
    p.set_defaults(func=_train, accepts_overrides=True, builds_models=True)

    p = sub.add_parser("demo", help="tokenizer → shards → tiny GPT on the bundled Shakespeare → eval → generate")
    p.add_argument("--dir", default="runs/demo", help="where the demo writes everything")
    p.add_argument("--steps", type=int, default=300)
    p.set_defaults(func=_demo, accepts_overrides=True, builds_models=True)

    p = sub.add_parser("report", help="plots (PNG) and an HTML page of a run: loss, lr, throughput, goodput, ...")
    p.add_argument("run_dir", help="the run directory (run.dir), e.g. runs/demo/run")
    p.set_defaults(func=_report)

    from data_pipeline import cli as data_cli
    from pretrain.finetune import cli as finetune_cli
    from pretrain.hf import cli as hf_cli
    from pretrain.inference import cli as inference_cli

    for package_cli in (data_cli, inference_cli, finetune_cli, hf_cli):
        package_cli.register(sub)
    for command in entry_points(group=COMMANDS_GROUP):
        try:
            command.load()(sub)
        except Exception as e:  # noqa: BLE001 - a broken plugin must not take the other commands down
            logger.warning("subcommands from %s (%s) not available: %s", command.name, command.value, e)
    return parser


def main(argv: list[str] | None = None) -> int:
    """Entry point of the ``pretrain`` console script."""
    from data_pipeline.errors import DataError
    from pretrain.errors import CheckpointError, ConfigError

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
    if getattr(args, "builds_models", False):
        # Before megatron-core is first imported: on CPU its import-time torch.compile calls become lazy (a shim).
        # The other shims come with the code that builds a model, so a dry run imports no DeepSpeed.
        from pretrain import device

        device.apply_cpu_shims(only=device.IMPORT_TIME_SHIMS)
    try:
        return args.func(args, overrides)
    except (ConfigError, DataError, CheckpointError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
