"""Turning a config into processes: torchrun argv (``local``), Slurm env → torch env (``slurm_env``), sbatch
rendering and submission (``slurm``), and the ``pretrain launch local|slurm`` subcommands (``cli``).

`pretrain train` reads the standard launcher environment (RANK, WORLD_SIZE, LOCAL_RANK, MASTER_ADDR, MASTER_PORT)
that torchrun exports; as a bare ``srun`` task it derives the same from SLURM_* (``slurm_env.apply``).
"""
