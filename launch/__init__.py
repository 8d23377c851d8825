"""Turning a config into processes: torchrun argv/env, Slurm env → torch env, sbatch rendering.

Today `pretrain train` reads the standard launcher environment (RANK, WORLD_SIZE, LOCAL_RANK, MASTER_ADDR,
MASTER_PORT) that torchrun exports, so `torchrun ... -m pretrain train CFG` works as is. The `pretrain launch`
subcommands and the Slurm mapping arrive with the launchers issue.
"""
