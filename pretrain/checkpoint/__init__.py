"""Checkpointing: commit-marker directories (manager), their files read without running code (safe_load)."""

from pretrain.checkpoint.manager import (CheckpointDisagreement, CheckpointError, CheckpointManager,  # noqa: F401
                                         ResumePoint, read_marker)
from pretrain.checkpoint.safe_load import load_checkpoint_file  # noqa: F401
