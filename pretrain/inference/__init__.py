"""Using a checkpoint outside training, in one process: load it whatever layout saved it (loading), its validation
loss (evaluation), continuing a prompt (generation); the ``eval`` and ``generate`` subcommands (cli)."""
