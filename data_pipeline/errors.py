"""The one exception type the data pipeline raises for bad input."""


class DataError(ValueError):
    """Bad or inconsistent data: missing/corrupt shard, missing manifest, tokenizer mismatch, unreadable corpus.

    The message is always a single line that names the offending file or shard, so it reads well in a log
    line from any of hundreds of ranks.
    """

    def __init__(self, message: str):
        # Collapse any newline a wrapped library error may carry: one event, one log line.
        super().__init__(" ".join(str(message).split()))
