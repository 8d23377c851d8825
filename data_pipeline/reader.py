"""Deterministic, exactly resumable reading of token shards, split by data-parallel rank.

The stream a DP rank sees is a pure function of (manifest, seed, epoch, dp_rank, dp_size, micro_batch_size):

1. Shard order per epoch: a permutation seeded by `SeedSequence([seed, epoch])` (identity without shuffle),
   the same on every rank; rank r takes `order[r::dp_size]` (the caller passes the DATA-parallel rank: TP/PP
   peers must see the same batches, so the global RANK from the environment would be wrong).
2. The rank's blocks, in that shard order, are grouped into windows of `SHUFFLE_WINDOW_BLOCKS` consecutive
   blocks; rows are permuted within each window by `SeedSequence([seed, epoch, dp_rank, window])`.
3. Micro-batch k is rows [k*B, (k+1)*B) of that stream, for k < `steps_per_epoch`, which is the same on every
   rank (see `_steps_per_epoch`), so no rank waits in a collective while another starts the next epoch.

DataLoader workers (num_workers > 0) split the stream by micro-batch index, not by shard: worker w builds
batches g0 + w, g0 + w + W, ... and the DataLoader's round-robin hands them back in order, so the stream is
identical for every num_workers and a checkpoint taken with 2 workers resumes exactly with 0 or 4. The price:
each worker reads every shard of its rank (decoding only the windows it needs). Reading packed blocks is cheap
(~180k sequences/s/core), so this is the right trade at this scale.
"""

from __future__ import annotations

import bisect
import itertools
import json
import os
import pathlib
import warnings
from typing import Callable, Iterator, NamedTuple

import numpy as np
import webdataset as wds

from data_pipeline.errors import DataError
from data_pipeline.shards import DTYPES, FORMAT_VERSION, MANIFEST_NAME, file_sha256

# Rows are shuffled within windows of this many consecutive blocks (8 x 64 rows by default): wide enough to
# mix documents within a batch, small enough to hold in memory (8 x 64 x 2049 x uint16 = 8 MB).
SHUFFLE_WINDOW_BLOCKS = 8
_ERROR_TAG = "__data_error__"  # worker -> main process: a DataError message, re-raised as one line


class _Block(NamedTuple):
    shard: int  # index into manifest["shards"]
    index: int  # position of the block within its shard
    rows: int
    start: int  # first row of this block in the rank's epoch stream


def load_manifest(data_dir: str | os.PathLike) -> dict:
    """Read and validate `data_dir/manifest.json`; any problem raises a one-line DataError naming the file."""
    path = pathlib.Path(data_dir) / MANIFEST_NAME
    try:
        manifest = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise DataError(f"{path}: manifest not found (run `pretrain data prepare` to create shards)") from None
    except (OSError, json.JSONDecodeError) as exc:
        raise DataError(f"{path}: unreadable manifest ({exc})") from None
    required = ("format_version", "seq_length", "dtype", "sequences_per_sample", "tokenizer_sha256", "shards")
    missing = [k for k in required if k not in manifest]
    if missing:
        raise DataError(f"{path}: manifest lacks {', '.join(missing)}")
    if manifest["format_version"] != FORMAT_VERSION:
        raise DataError(f"{path}: format_version {manifest['format_version']}, this reader reads {FORMAT_VERSION}")
    if manifest["dtype"] not in DTYPES:
        raise DataError(f"{path}: unknown dtype {manifest['dtype']!r}")
    if not manifest["shards"]:
        raise DataError(f"{path}: manifest lists no shards")
    return manifest


class ShardReader:
    """Iterate int64 micro-batches `[micro_batch_size, seq_length + 1]` from a shard directory, for one DP rank.

    Stateful: iteration continues from the current position (`state_dict()`), advancing it as batches are
    yielded. With `loop=True` the iterator is infinite over epochs (call `iter()` once, train from it); with
    `loop=False` each `iter()` is one pass over the rest of the current epoch (for evaluation). Position is
    counted in micro-batches handed to the caller, so prefetching workers never skew it.
    """

    def __init__(self, data_dir: str, *, micro_batch_size: int, dp_rank: int = 0, dp_size: int = 1, seed: int = 0,
                 shuffle: bool = True, loop: bool = True, num_workers: int = 0,
                 expected_tokenizer_sha256: str | None = None, verify_checksums: bool = True):
        """Open `data_dir` (its manifest and shard files are checked now; shard checksums before first read)."""
        if micro_batch_size <= 0 or dp_size <= 0 or not 0 <= dp_rank < dp_size or num_workers < 0:
            raise ValueError(f"ShardReader: need micro_batch_size > 0, 0 <= dp_rank < dp_size, num_workers >= 0; "
                             f"got {micro_batch_size}, {dp_rank}, {dp_size}, {num_workers}")
        self.data_dir = pathlib.Path(data_dir)
        self.manifest = load_manifest(self.data_dir)
        self.seq_length = int(self.manifest["seq_length"])
        self.micro_batch_size, self.dp_rank, self.dp_size = micro_batch_size, dp_rank, dp_size
        self.seed, self.shuffle, self.loop, self.num_workers = seed, shuffle, loop, num_workers
        self.verify_checksums = verify_checksums
        sha = self.manifest["tokenizer_sha256"]
        if expected_tokenizer_sha256 is not None and expected_tokenizer_sha256 != sha:
            raise DataError(f"{self.data_dir / MANIFEST_NAME}: shards were tokenized with tokenizer sha256 "
                            f"{sha[:16]}…, expected {expected_tokenizer_sha256[:16]}… "
                            f"(wrong tokenizer or data dir)")
        self._check_shard_files()
        self.steps_per_epoch = self._steps_per_epoch()
        self._epoch, self._batch = 0, 0
        self._verified: set[str] = set()  # shards whose sha256 this process has checked

    # ----- plan: everything below is computed from the manifest alone, identically on every rank -----

    def _check_shard_files(self) -> None:
        spp = self.manifest["sequences_per_sample"]
        for info in self.manifest["shards"]:
            path = self.data_dir / info["name"]
            if not path.is_file():
                raise DataError(f"{path}: shard listed in {MANIFEST_NAME} is missing")
            size = path.stat().st_size
            if "bytes" in info and size != info["bytes"]:
                raise DataError(f"{path}: {size} bytes, {MANIFEST_NAME} says {info['bytes']} (truncated or replaced)")
            if not (info["blocks"] - 1) * spp < info["sequences"] <= info["blocks"] * spp:
                raise DataError(f"{path}: manifest counts {info['sequences']} sequences in {info['blocks']} blocks")

    def _shard_order(self, epoch: int) -> np.ndarray:
        n = len(self.manifest["shards"])
        if not self.shuffle:
            return np.arange(n)
        return np.random.default_rng(np.random.SeedSequence([self.seed, epoch])).permutation(n)

    def _steps_per_epoch(self) -> int:
        """Micro-batches per epoch, the same on every rank and every epoch, from the manifest alone.

        With shuffling, a rank may get any `len(shards) // dp_size` shards in some epoch, so the guaranteed rows
        per rank are the sum of that many smallest shards; without shuffling the assignment is fixed and the
        smallest rank's actual share decides. Each rank truncates its epoch to this many batches.
        """
        counts = [s["sequences"] for s in self.manifest["shards"]]
        where = self.data_dir / MANIFEST_NAME
        if len(counts) < self.dp_size:
            raise DataError(f"{where}: {len(counts)} shard(s) cannot feed dp_size={self.dp_size} ranks "
                            f"(re-run data prepare with a smaller --samples-per-shard)")
        if self.shuffle:
            rows = sum(sorted(counts)[: len(counts) // self.dp_size])
        else:
            rows = min(sum(counts[i] for i in range(r, len(counts), self.dp_size)) for r in range(self.dp_size))
        steps = rows // self.micro_batch_size
        if steps == 0:
            raise DataError(f"{where}: a rank's {rows} guaranteed sequences make no micro-batch of "
                            f"{self.micro_batch_size}")
        return steps

    def _windows(self, epoch: int) -> list[tuple[int, list[_Block]]]:
        """This rank's blocks for `epoch`, grouped into shuffle windows: [(first row, blocks), ...]."""
        spp = self.manifest["sequences_per_sample"]
        blocks, pos = [], 0
        for s in self._shard_order(epoch)[self.dp_rank:: self.dp_size]:
            info = self.manifest["shards"][s]
            for b in range(info["blocks"]):
                rows = min(spp, info["sequences"] - b * spp)
                blocks.append(_Block(int(s), b, rows, pos))
                pos += rows
        k = SHUFFLE_WINDOW_BLOCKS
        return [(blocks[i].start, blocks[i: i + k]) for i in range(0, len(blocks), k)]

    # ----- reading -----

    def _read_shard(self, shard: int) -> Iterator[tuple[int, np.ndarray]]:
        """Yield (block position, rows [n, seq_length + 1]) for every block of one shard, checking as it goes."""
        info = self.manifest["shards"][shard]
        path = self.data_dir / info["name"]
        if self.verify_checksums and info["name"] not in self._verified:
            if file_sha256(path) != info["sha256"]:
                raise DataError(f"{path}: sha256 does not match {MANIFEST_NAME} (corrupt or replaced shard)")
            self._verified.add(info["name"])
        np_dtype, ext = DTYPES[self.manifest["dtype"]]
        spp, row = self.manifest["sequences_per_sample"], self.seq_length + 1
        pipeline = wds.DataPipeline(wds.SimpleShardList([str(path)]), wds.tarfile_to_samples())
        pos = 0
        try:
            for sample in pipeline:
                if ext not in sample:
                    raise DataError(f"{path}: member {sample.get('__key__')} has no {ext} entry")
                rows = min(spp, info["sequences"] - pos * spp)
                arr = np.frombuffer(sample[ext], dtype=np_dtype)
                if arr.size != rows * row:
                    raise DataError(f"{path}: block {pos} holds {arr.size} tokens, expected {rows}x{row}")
                yield pos, arr.reshape(rows, row)
                pos += 1
        except DataError:
            raise
        except Exception as exc:  # tarfile.ReadError, EOFError, ... as raised through webdataset
            detail = exc.args[0] if exc.args else type(exc).__name__
            raise DataError(f"{path}: truncated or corrupt tar ({type(exc).__name__}: {detail})") from None
        if pos != info["blocks"]:
            raise DataError(f"{path}: truncated shard, {pos} of {info['blocks']} blocks readable")

    def _read_blocks(self, wanted: list[_Block]) -> Iterator[np.ndarray]:
        """Rows of the `wanted` blocks, in order; shards holding none of them are not opened."""
        for shard, group in itertools.groupby(wanted, key=lambda b: b.shard):
            want = {b.index for b in group}
            for pos, rows in self._read_shard(shard):
                if pos in want:
                    yield rows

    def _iter_epoch(self, epoch: int, first: int, owned: Callable[[int], bool]) -> Iterator[np.ndarray]:
        """Batches k >= first of `epoch` for which owned(k), in order: int64 [micro_batch_size, seq_length+1]."""
        B = self.micro_batch_size
        ks = [k for k in range(first, self.steps_per_epoch) if owned(k)]
        if not ks:
            return
        windows = self._windows(epoch)
        starts = [start for start, _ in windows]
        need = sorted({w for k in ks for w in range(bisect.bisect_right(starts, k * B) - 1,
                                                    bisect.bisect_left(starts, (k + 1) * B))})
        blocks = self._read_blocks([b for w in need for b in windows[w][1]])

        def window_rows() -> Iterator[tuple[int, np.ndarray]]:
            for w in need:
                start, wblocks = windows[w]
                rows = np.concatenate([next(blocks) for _ in wblocks])  # [window rows, seq_length + 1]
                if self.shuffle:
                    seq = np.random.SeedSequence([self.seed, epoch, self.dp_rank, w])
                    rows = rows[np.random.default_rng(seq).permutation(len(rows))]
                yield start, rows

        pending: list[tuple[int, np.ndarray]] = []  # windows overlapping the current batch
        source = window_rows()
        for k in ks:
            lo, hi = k * B, (k + 1) * B
            pending = [(s, r) for s, r in pending if s + len(r) > lo]
            while not pending or pending[-1][0] + len(pending[-1][1]) < hi:
                pending.append(next(source))
            parts = [r[max(lo - s, 0): hi - s] for s, r in pending if s < hi]
            yield np.concatenate(parts).astype(np.int64)  # [B, seq_length + 1]

    # ----- iteration and position -----

    def _advance(self) -> None:
        self._batch += 1
        if self._batch == self.steps_per_epoch:
            self._epoch, self._batch = self._epoch + 1, 0

    def _global_batches(self, begin: int, end: int | None, worker: int, workers: int) -> Iterator[np.ndarray]:
        """Batches g = epoch * steps_per_epoch + k in [begin, end) with g ≡ begin + worker (mod workers)."""
        steps = self.steps_per_epoch
        for epoch in itertools.count(begin // steps):
            if end is not None and epoch * steps >= end:
                return
            first = max(begin - epoch * steps, 0)
            last = steps if end is None else min(steps, end - epoch * steps)
            yield from self._iter_epoch(
                epoch, first, lambda k: k < last and (epoch * steps + k - begin) % workers == worker)

    def __iter__(self) -> Iterator[np.ndarray]:
        """Yield micro-batches from the current position: forever if `loop`, else to the end of this epoch.

        With `loop=False` every iteration is one pass: stopping early (e.g. an eval capped at N batches) still
        ends the epoch, so the next pass starts at batch 0 of the next epoch. Unshuffled, that is the same data,
        which is what repeated evaluation needs.
        """
        steps = self.steps_per_epoch
        epoch, begin = self._epoch, self._epoch * steps + self._batch
        end = None if self.loop else (self._epoch + 1) * steps
        if self.num_workers == 0:
            source: Iterator = self._global_batches(begin, end, 0, 1)
        else:
            source = _worker_loader(self, begin, end)
        try:
            for batch in source:
                if isinstance(batch, tuple) and batch[0] == _ERROR_TAG:
                    raise DataError(batch[1])
                # Advance before yielding: a state_dict() taken after receiving this batch points at the next.
                self._advance()
                yield batch
        finally:
            if not self.loop and self._epoch == epoch:  # pass abandoned mid-epoch: the epoch is over
                self._epoch, self._batch = epoch + 1, 0
            # Stop DataLoader workers now, also when the caller stops early or an error propagates: otherwise
            # they linger until garbage collection, and exit waits ~5 s per worker for them.
            shutdown = getattr(source, "_shutdown_workers", None)
            if shutdown is not None:
                shutdown()

    def state_dict(self) -> dict:
        """The position of the next batch, JSON-serialisable (plus the settings it is meaningful for)."""
        # Exact resume re-reads the epoch up to this batch (cheap at this scale). The data-pipeline follow-up
        # replaces (epoch, batch) with a global consumed-samples position and seeks directly.
        return {"epoch": self._epoch, "batch_in_epoch": self._batch, "seed": self.seed,
                "micro_batch_size": self.micro_batch_size, "dp_size": self.dp_size,
                "steps_per_epoch": self.steps_per_epoch}

    def load_state_dict(self, state: dict) -> None:
        """Continue from `state`: the next batch yielded is the one an uninterrupted reader would yield next."""
        epoch, batch = int(state["epoch"]), int(state["batch_in_epoch"])
        if epoch < 0 or not 0 <= batch < self.steps_per_epoch:
            raise DataError(f"{self.data_dir}: data position epoch={epoch} batch_in_epoch={batch} is outside "
                            f"0..{self.steps_per_epoch - 1} batches per epoch")
        changed = [f"{k} {state[k]} -> {getattr(self, k)}" for k in ("seed", "micro_batch_size", "dp_size",
                                                                     "steps_per_epoch")
                   if k in state and state[k] != getattr(self, k)]
        if changed:
            # Resuming under different settings still works, but it is no longer the stream that would have come.
            warnings.warn(f"{self.data_dir}: data position restored under changed settings ({', '.join(changed)}); "
                          f"the continuation is not the uninterrupted stream", stacklevel=2)
        self._epoch, self._batch = epoch, batch


def _identity(x):
    return x


class _WorkerStream:
    """The batches of one DataLoader worker, as a picklable callable (a webdataset pipeline source)."""

    def __init__(self, reader: ShardReader, begin: int, end: int | None):
        self.reader, self.begin, self.end = reader, begin, end

    def __call__(self) -> Iterator:
        import torch.utils.data

        info = torch.utils.data.get_worker_info()
        try:
            yield from self.reader._global_batches(self.begin, self.end, info.id, info.num_workers)
        except DataError as exc:
            # Torch would re-raise in the main process with a multi-line traceback; send the one line instead.
            yield (_ERROR_TAG, str(exc))


def _worker_loader(reader: ShardReader, begin: int, end: int | None) -> Iterator:
    """Batches [begin, end) built by `reader.num_workers` DataLoader workers, returned in stream order."""
    import torch.utils.data  # optional dependency: only needed when num_workers > 0

    # wds.DataPipeline is a torch IterableDataset, so DataLoader gives each worker its own copy of the stream.
    # batch_size=None + identity collate: workers already build whole micro-batches, and numpy stays numpy.
    # In-order delivery of round-robin tasks makes worker w's i-th batch the global batch begin + w + i*W.
    loader = torch.utils.data.DataLoader(wds.DataPipeline(_WorkerStream(reader, begin, end)), batch_size=None,
                                         num_workers=reader.num_workers, collate_fn=_identity,
                                         persistent_workers=False)
    return iter(loader)
