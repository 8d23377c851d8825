"""Parallel layout (ParallelDims), process groups (megatron-core parallel_state) and the ZeRO engine adapter."""

from pretrain.parallel.dims import ParallelDims, init_process_groups  # noqa: F401
