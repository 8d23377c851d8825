"""Checkpointing: commit-marker directories (manager) and loading a model for inference (load)."""

from pretrain.checkpoint.manager import CheckpointError, CheckpointManager, read_marker  # noqa: F401
