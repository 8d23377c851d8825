"""``pretrain launch local|slurm`` (registered by pretrain/__main__.py)."""

from __future__ import annotations

import argparse
from pathlib import Path


def _local(args, overrides: list[str]) -> int:
    from launch.local import LocalLaunch, run
    from pretrain import config
    from pretrain.fault_tolerance import HANG_DIR

    # The launcher reads the run's config too (a bad one fails here, before any process starts): how long the
    # rendezvous may wait for the other nodes (ft.startup_timeout_s), and where ranks report hangs.
    cfg = config.load(args.config, overrides)
    launch = LocalLaunch(nproc=args.nproc, nnodes=args.nnodes, node_rank=args.node_rank,
                         rdzv_endpoint=args.rdzv_endpoint, rdzv_id=args.rdzv_id, max_restarts=args.max_restarts,
                         join_timeout_s=cfg.ft.startup_timeout_s or 600.0,
                         hang_dir=str(Path(cfg.run.dir) / HANG_DIR))
    return run(launch, ["train", args.config, *overrides])


def _slurm(args, overrides: list[str]) -> int:
    from launch.slurm import SlurmJob, render, submit

    job = SlurmJob(nodes=args.nodes, gpus_per_node=args.gpus_per_node, procs_per_node=args.procs_per_node,
                   cpus_per_task=args.cpus_per_task, partition=args.partition, time=args.time,
                   job_name=args.job_name, output=args.output, torchrun=args.torchrun, requeue=args.requeue,
                   signal_seconds=args.signal_seconds, workdir=args.workdir, extra=tuple(args.sbatch_option))
    script = render(job, [args.config, *overrides])
    if args.dry_run:
        print(script, end="")
        return 0
    script_path = Path(args.script) if args.script else None
    job_id = submit(script, script_path)
    print(f"submitted job {job_id}" + (f" (script {script_path})" if script_path else ""))
    return 0


def _slurm_prepare(args, overrides: list[str]) -> int:
    from launch.slurm_prepare import PrepareJob, render, submit_both

    prepare = [a for path in args.inputs for a in ("--input", path)]
    prepare += ["--tokenizer", args.tokenizer, "--output", args.output, "--seq-length", str(args.seq_length),
                "--samples-per-shard", str(args.samples_per_shard), "--sequences-per-sample",
                str(args.sequences_per_sample), "--text-key", args.text_key]
    job = PrepareJob(tasks=args.tasks, max_parallel=args.max_parallel, prepare_args=tuple(prepare),
                     output=args.output, cpus_per_task=args.cpus_per_task, partition=args.partition, time=args.time,
                     job_name=args.job_name, log_dir=args.log_dir, workdir=args.workdir,
                     extra=tuple(args.sbatch_option))
    if args.dry_run:
        array, merge = render(job)
        print(f"{array}\n# ---- merge job (submitted with the array's job id) ----\n{merge}", end="")
        return 0
    array_id, merge_id = submit_both(job, Path(args.script_dir) if args.script_dir else None)
    print(f"submitted prepare array {array_id} ({args.tasks} tasks) and merge job {merge_id} (afterok)")
    return 0


def register(sub: argparse._SubParsersAction) -> None:
    """Add ``launch local`` and ``launch slurm`` to the ``pretrain`` parser."""
    launch = sub.add_parser("launch", help="start training with torchrun (local) or sbatch (slurm)")
    kinds = launch.add_subparsers(dest="launcher", required=True)

    p = kinds.add_parser("local", help="torchrun on this node (standalone, or one node of a c10d rendezvous)",
                         description="Overrides after the config: --section.key=value")
    p.add_argument("config", help="YAML run config, e.g. configs/debug/gpt_tiny.yaml")
    p.add_argument("--nproc", type=int, required=True, help="processes on this node (one per GPU)")
    p.add_argument("--nnodes", type=int, default=1, help="nodes in the job (>1 needs --rdzv-endpoint)")
    p.add_argument("--node-rank", type=int, default=None,
                   help="this node's index (static rendezvous); omit for elastic rank assignment")
    p.add_argument("--rdzv-endpoint", default=None, help="HOST:PORT of the c10d rendezvous, same on every node")
    p.add_argument("--rdzv-id", default="pretrain", help="rendezvous id shared by the nodes of one job")
    p.add_argument("--max-restarts", type=int, default=0,
                   help="restart all workers up to K times after a failure (they resume from the checkpoint)")
    p.set_defaults(func=_local, accepts_overrides=True)

    p = kinds.add_parser("slurm", help="render a slurm/ template and sbatch it (--dry-run prints it)",
                         description="Overrides after the config: --section.key=value")
    p.add_argument("config", help="YAML run config (path as seen from --workdir on the compute nodes)")
    p.add_argument("--nodes", type=int, default=1)
    p.add_argument("--gpus-per-node", type=int, default=1, help="0 on CPU clusters (then --procs-per-node)")
    p.add_argument("--procs-per-node", type=int, default=None,
                   help="training processes per node (default: --gpus-per-node)")
    p.add_argument("--cpus-per-task", type=int, default=None, help="CPUs per training process")
    p.add_argument("--partition", default=None)
    p.add_argument("--time", default=None, help="time limit, e.g. 04:00:00")
    p.add_argument("--job-name", default="pretrain")
    p.add_argument("--output", default=None, help="log file, e.g. runs/%%j.log (default: slurm-%%j.out)")
    p.add_argument("--torchrun", action="store_true",
                   help="one torchrun per node (srun torchrun) also on one node; default there: one srun task per GPU")
    p.add_argument("--requeue", action="store_true",
                   help="checkpoint on USR1 (time limit, pre-emption), requeue and resume")
    p.add_argument("--signal-seconds", type=int, default=120, help="with --requeue: USR1 this long before --time")
    p.add_argument("--workdir", default=".", help="directory the job runs in (default: here)")
    p.add_argument("--sbatch-option", action="append", default=[], metavar="OPT",
                   help="extra #SBATCH line, e.g. --sbatch-option=--account=abc (repeatable)")
    p.add_argument("--script", default=None, help="also write the rendered script here")
    p.add_argument("--dry-run", action="store_true", help="print the script instead of submitting it")
    p.set_defaults(func=_slurm, accepts_overrides=True)

    p = kinds.add_parser("slurm-prepare", help="data prepare as an sbatch job array + a merge job after it",
                         description="Render (or submit) a job array of `data prepare --num-tasks N` tasks and a "
                                     "`data merge` job that runs after all of them succeeded (afterok).")
    p.add_argument("inputs", nargs="+", metavar="INPUT", help="corpus files or globs (as `data prepare --input`)")
    p.add_argument("--tasks", type=int, required=True, help="array tasks: shares of the input")
    p.add_argument("--max-parallel", type=int, default=0, help="at most this many tasks at once (0: no limit)")
    p.add_argument("--tokenizer", required=True, metavar="MODEL")
    p.add_argument("--output", required=True, metavar="DIR")
    p.add_argument("--seq-length", type=int, required=True)
    p.add_argument("--samples-per-shard", type=int, default=2048)
    p.add_argument("--sequences-per-sample", type=int, default=64)
    p.add_argument("--text-key", default="text")
    p.add_argument("--cpus-per-task", type=int, default=4, help="CPUs per task (its tokenizer workers)")
    p.add_argument("--partition", default=None)
    p.add_argument("--time", default=None)
    p.add_argument("--job-name", default="pretrain-prepare")
    p.add_argument("--log-dir", default=None, help="directory for the tasks' logs (default: Slurm's)")
    p.add_argument("--workdir", default=".", help="directory the jobs run in (default: here)")
    p.add_argument("--sbatch-option", action="append", default=[], metavar="OPT")
    p.add_argument("--script-dir", default=None, help="also write both rendered scripts here")
    p.add_argument("--dry-run", action="store_true", help="print both scripts instead of submitting them")
    p.set_defaults(func=_slurm_prepare)
