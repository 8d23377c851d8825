"""Turning a config into processes: torchrun on this node (``local``), sbatch rendering and submission
(``slurm``), and the ``pretrain launch local|slurm`` subcommands (``cli``). The top floor: it imports pretrain,
never the reverse.

`pretrain train` reads the standard launcher environment (RANK, WORLD_SIZE, LOCAL_RANK, MASTER_ADDR, MASTER_PORT)
that torchrun exports; as a bare ``srun`` task it derives the same from SLURM_* (pretrain/parallel/slurm_env.py).
"""
