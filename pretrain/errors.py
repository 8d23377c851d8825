"""The errors a user can act on: each message is one line naming the key, file or directory at fault.

The bottom floor of the package (it imports nothing of ours), so every module can raise them. The command line
prints them as one ``error:`` line and exits with 2 (data_pipeline.errors.DataError likewise, for bad data).
"""


class ConfigError(ValueError):
    """A bad config key or value (or command-line flag). The message is one line and names the key."""


class CheckpointError(RuntimeError):
    """A checkpoint that cannot be loaded; the message is one line and names the directory or file."""
