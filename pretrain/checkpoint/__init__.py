"""Checkpointing. From the bottom up: the on-disk format (format: commit marker, names, fit checks), reading files
without running code (safe_load), writing one rank's files (writer), saving/committing/verifying/resuming
(manager), and joining or re-splitting shards for another layout (consolidate, reshard)."""
