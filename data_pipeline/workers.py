"""ShardReader's DataLoader workers (num_workers > 0): worker w builds this rank's groups of micro-batches w, w + W,
... and the DataLoader's in-order round-robin returns them in stream order, so the stream is the same for every
num_workers. Each item carries the bytes the worker read for it; a DataError travels as one line."""

from __future__ import annotations

from typing import Iterator

import webdataset as wds

from data_pipeline.errors import DataError

# Rows per DataLoader item: a worker ships whole groups of micro-batches, because the loader's per-item cost
# (~100 µs) would otherwise cap it at ~10k items/s; 256 rows x 2049 tokens = 1 MB of uint16 per item.
WORKER_ITEM_ROWS = 256
ERROR_TAG = "__data_error__"  # worker -> main process: a DataError message, re-raised as one line
BYTES_TAG = "__bytes_read__"  # worker -> main process: (tag, bytes read since its last item, the items)


def _identity(x):
    return x


class WorkerStream:
    """The micro-batch groups of one DataLoader worker, as a picklable callable (a webdataset pipeline source).
    ``reader``: the ShardReader (not imported here: reader.py imports this module); ``group``: micro-batches per
    item, fixed by the main process (a worker's module globals are its own)."""

    def __init__(self, reader, start: dict, group: int):
        self.reader, self.start, self.group = reader, start, group

    def __call__(self) -> Iterator:
        import torch.utils.data

        info, r, group = torch.utils.data.get_worker_info(), self.reader, self.group
        # Ships the shards' own dtype (uint16: 4x less to pickle through the pipe); the main process widens.
        items: list[tuple] = []
        reported = r.bytes_read

        def shipped(items: list) -> tuple:  # the items with the bytes read for them (and since the last ones)
            nonlocal reported
            now = r.bytes_read
            delta, reported = now - reported, now
            return BYTES_TAG, delta, items

        try:
            for batch_items in r._produce(self.start, info.id, info.num_workers, group):
                for item in batch_items:
                    if items and item[0] // group != items[0][0] // group:
                        yield shipped(items)
                        items = []
                    items.append(item)
        except DataError as exc:
            # Torch would re-raise in the main process with a multi-line traceback; send the one line instead.
            if items:  # the micro-batches before the error come first, as they do without workers
                yield shipped(items)
            yield (ERROR_TAG, str(exc))
            return
        if items:
            yield shipped(items)


def worker_loader(reader, start: dict) -> Iterator:
    """This rank's micro-batches from `start`, built by the ShardReader ``reader``'s `num_workers` DataLoader
    workers, in order."""
    import multiprocessing

    import torch.utils.data  # optional dependency: only needed when num_workers > 0

    # wds.DataPipeline is a torch IterableDataset, so DataLoader gives each worker its own copy of the stream.
    # batch_size=None + identity collate: workers already build whole micro-batches, and numpy stays numpy.
    # In-order delivery of round-robin tasks makes worker w's i-th item this rank's micro-batch group w + i*W.
    # Workers come from multiprocessing's fork server, not a fork of this process: a trainer holds threads (watchdog,
    # checkpoint writer, metrics server, NCCL, tqdm's monitor), and a fork copies whatever lock or state they held
    # at that instant (a worker forked beside tqdm's monitor thread died of SIGSEGV in the test suite). The server
    # imports the reader once, so a worker starts in ~0.1 s, not the ~2 s of a fresh interpreter.
    multiprocessing.set_forkserver_preload(["data_pipeline.reader"])
    stream = WorkerStream(reader, start, group=max(1, WORKER_ITEM_ROWS // reader.micro_batch_size))
    loader = torch.utils.data.DataLoader(wds.DataPipeline(stream), batch_size=None,
                                         num_workers=reader.num_workers, collate_fn=_identity,
                                         persistent_workers=False, multiprocessing_context="forkserver")
    return iter(loader)
