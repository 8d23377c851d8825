"""Deterministic, exactly resumable, blended reading of token shards, split by data-parallel rank.

The order is Megatron-style and does not depend on the data-parallel size (details in `sampler.py`): each
source has a seeded infinite row stream, global samples are drawn from the sources by Megatron's blending
rule, and global batch k is samples [k*GB, (k+1)*GB). DP rank r keeps the contiguous slice
[k*GB + r*GB/dp, k*GB + (r+1)*GB/dp) and yields it as GB/(dp*micro) micro-batches (accumulation steps).

With `owned_rows=True` (training) a rank reads only the rows it owns, at their offsets in the shard files, each
checked against the shard's row digests the first time this process reads it (rows.py): the job reads each byte
once per epoch whatever dp is. With one source a rank reads its rows of a shuffle window when it reaches the
window (one gather, checked before any row is used: one window ahead at most); blended sources read them per
global batch. The same code walks the same windows and positions on every rank, so the order is
independent of dp, TP/PP peers (same dp_rank) see identical batches and every rank takes the same number of
steps. Without it, and where rows cannot be read one by one (on_bad_shard="skip", URLs, manifests without row
digests or member tables), every rank reads the whole stream and keeps its rows (read amplification = dp): a bad
shard is then seen identically by every rank, so skipping it keeps the ranks in step. `bytes_read` counts both.

Resume: the state holds consumed_samples plus, per source, the blend count and the stream position; loading it
seeks straight to the window holding that position (earlier shards are not opened). It is exact also under a
different dp_size or micro_batch_size; under a different global_batch_size it continues from consumed_samples
with the new size, still exact in the global sample sequence.

Reading: one daemon thread per source (`read_ahead=True`, `tario.ReadAhead`) reads whole shards (and hashes
them, 1st use) up to two chunks ahead while the caller's thread shuffles and widens rows; it follows the same
block order, so rows and positions are identical without it, and it stops with the iterator.

DataLoader workers (num_workers > 0; data_pipeline/workers.py) split by groups of micro-batches
(WORKER_ITEM_ROWS rows): worker w builds
this rank's groups w, w + W, ... (reading only its own rows with owned_rows, else the whole stream), and the
DataLoader's in-order round-robin returns them in stream order, so the stream is identical for every
num_workers. Workers overlap reading with training (reading whole shards, they add no read throughput: each
reads everything); they report their bytes read with each item.
"""

from __future__ import annotations

import os
import warnings
from typing import Iterator

import numpy as np

from data_pipeline.blocks import BlockSource
from data_pipeline.errors import DataError
from data_pipeline.sampler import Exhausted, SourceCursor, SourcePlan, blend, check_batch_sizes, rank_slice
from data_pipeline.shards import DTYPES
from data_pipeline.stream import load_manifest, resolve_source  # noqa: F401  (load_manifest: re-exported)
from data_pipeline.workers import ERROR_TAG, worker_loader

STATE_VERSION = 2


class ShardReader:
    """Iterate micro-batches `[micro_batch_size, seq_length + 1]` for one DP rank (see module docstring): int64,
    or with `dtype="native"` the shards' own dtype (uint16 for vocabularies under 65536: a quarter of the bytes
    to copy and to send to the accelerator, which widens them; the model batch functions accept either).

    Stateful: iteration continues from `state_dict()` and advances it per yielded micro-batch. `loop=True`:
    infinite over epochs (sources loop independently). `loop=False` (validation): one pass over epoch 0 of a
    single source, last partial global batch dropped; every `iter()` starts a pass from the beginning.
    """

    def __init__(self, sources, *, micro_batch_size: int, global_batch_size: int = 0, dp_rank: int = 0,
                 dp_size: int = 1, seed: int = 0, shuffle: bool = True, loop: bool = True, num_workers: int = 0,
                 expected_tokenizer_sha256: str | None = None, verify_checksums: bool = True,
                 on_bad_shard: str = "error", shuffle_window_blocks: int = 8, read_ahead: bool = True,
                 dtype: str = "int64", owned_rows: bool = False):
        """Resolve sources and check manifests and local shard files now; checksums are checked before use.
        read_ahead: read shards in a background thread while this one converts and hands out rows (the
        stream is identical without it). owned_rows: read only the rows this rank (and worker) keeps, for
        every source that allows it (module docstring); the stream is identical either way."""
        if not 0 <= dp_rank < dp_size or num_workers < 0 or on_bad_shard not in ("error", "skip") \
                or dtype not in ("int64", "native"):
            raise ValueError(f"ShardReader: need 0 <= dp_rank < dp_size, num_workers >= 0, on_bad_shard "
                             f"error|skip, dtype int64|native; got {dp_rank}, {dp_size}, {num_workers}, "
                             f"{on_bad_shard!r}, {dtype!r}")
        self.global_batch_size = global_batch_size or micro_batch_size * dp_size
        self.accumulation = check_batch_sizes(micro_batch_size, self.global_batch_size, dp_size)
        specs = [sources] if isinstance(sources, (str, os.PathLike, dict)) else list(sources)
        if not specs or (not loop and len(specs) != 1):
            raise ValueError(f"ShardReader: need one or more sources (exactly one with loop=False), got {specs}")
        self.sources = [resolve_source(s) for s in specs]
        self.manifest = self.sources[0].manifest
        self.seq_length = int(self.manifest["seq_length"])
        for src in self.sources:
            sha = src.manifest["tokenizer_sha256"]
            if expected_tokenizer_sha256 is not None and sha != expected_tokenizer_sha256:
                raise DataError(f"{src.name}: shards were tokenized with tokenizer sha256 {sha[:16]}…, expected "
                                f"{expected_tokenizer_sha256[:16]}… (wrong tokenizer or data dir)")
            for key in ("seq_length", "vocab_size", "tokenizer_sha256"):
                if src.manifest.get(key) != self.manifest.get(key):
                    raise DataError(f"{src.name}: {key} {src.manifest.get(key)} differs from "
                                    f"{self.manifest.get(key)} in {self.sources[0].name}")
        self.micro_batch_size, self.dp_rank, self.dp_size = micro_batch_size, dp_rank, dp_size
        self.seed, self.shuffle, self.loop, self.num_workers = seed, shuffle, loop, num_workers
        self.weights = [s.weight for s in self.sources]
        self.shuffle_window_blocks = shuffle_window_blocks
        self.dtype = np.dtype(np.int64) if dtype == "int64" else self._wire_dtype()
        self.plans = [SourcePlan([i["sequences"] for i in s.manifest["shards"]], s.manifest["sequences_per_sample"],
                                 seed=seed, source=d, shuffle=shuffle, window_blocks=shuffle_window_blocks)
                      for d, s in enumerate(self.sources)]
        self._blocks = [BlockSource(s, p, verify=verify_checksums, skip_bad=on_bad_shard == "skip", loop=loop,
                                    read_ahead=read_ahead, owned_rows=owned_rows)
                        for s, p in zip(self.sources, self.plans)]
        self._worker_bytes = 0  # bytes read by DataLoader workers (num_workers > 0), as they reported them
        self._warned: set[str] = set()
        self._note_skips([m for b in self._blocks for m in b.messages])
        self.num_batches = None
        if not loop:
            self.num_batches = self.plans[0].rows_per_epoch // self.global_batch_size * self.accumulation
            if self.num_batches == 0:
                raise DataError(f"{self.sources[0].name}: {self.plans[0].rows_per_epoch} sequences make no "
                                f"global batch of {self.global_batch_size}")
        self._state = self._initial_state()
        self._first_index: int | None = None  # global sample index of the last micro-batch's first row

    @property
    def last_indices(self) -> np.ndarray:
        """Global sample indices (int64 [micro_batch_size]) of the micro-batch yielded last (empty before)."""
        if self._first_index is None:
            return np.zeros(0, dtype=np.int64)
        return np.arange(self._first_index, self._first_index + self.micro_batch_size, dtype=np.int64)

    # ----- position -----

    def _initial_state(self) -> dict:
        n = len(self.sources)
        return {"consumed_samples": 0, "micro_batch": 0, "counts": [0] * n, "positions": [0] * n}

    def state_dict(self) -> dict:
        """Position of the next micro-batch, JSON-serialisable, plus the settings it is meaningful for.

        consumed_samples: global samples of completed global batches; micro_batch: micro-batches of this rank
        already yielded from the current global batch (0 at step boundaries); counts/positions: per source,
        blend count and stream row at consumed_samples.
        """
        state = {k: list(v) if isinstance(v, list) else v for k, v in self._state.items()}  # caller's own copy
        return {"version": STATE_VERSION, **state, "seed": self.seed, "weights": list(self.weights),
                "global_batch_size": self.global_batch_size, "dp_size": self.dp_size,
                "micro_batch_size": self.micro_batch_size, "shuffle": self.shuffle,
                "shuffle_window_blocks": self.shuffle_window_blocks}

    def load_state_dict(self, state: dict) -> None:
        """Continue from `state`: the next micro-batch is the one the saving run would have yielded next.

        Exact under a different dp_size / micro_batch_size at a step boundary; under a different
        global_batch_size, global batches restart at consumed_samples with the new size.
        """
        where = self.sources[0].name
        if state.get("version") != STATE_VERSION:
            raise DataError(f"{where}: data state version {state.get('version')} (keys {sorted(state)[:4]}), this "
                            f"reader resumes version {STATE_VERSION}; start the data position afresh")
        if len(state["counts"]) != len(self.sources) or len(state["positions"]) != len(self.sources):
            raise DataError(f"{where}: data state has {len(state['counts'])} sources, this run {len(self.sources)}")
        same_geometry = all(state[k] == getattr(self, k) for k in ("global_batch_size", "dp_size",
                                                                    "micro_batch_size"))
        if state["micro_batch"] and not same_geometry:
            raise DataError(f"{where}: data state is mid global batch (micro_batch {state['micro_batch']}); it "
                            f"resumes only with the same global/micro batch size and dp_size")
        changed = [f"{k} {state[k]} -> {getattr(self, k)}" for k in ("seed", "shuffle", "shuffle_window_blocks",
                                                                     "weights") if state[k] != getattr(self, k)]
        if changed:  # still works, but it is no longer the stream that would have come
            warnings.warn(f"{where}: data position restored under changed settings ({', '.join(changed)}); the "
                          f"continuation is not the uninterrupted stream", stacklevel=2)
        self._state = {k: state[k] for k in ("consumed_samples", "micro_batch", "counts", "positions")}

    def source_fractions(self) -> list[float]:
        """Achieved share of each source among the consumed global samples (the weights before any)."""
        counts = np.asarray(self._state["counts"], dtype=np.float64)
        total = counts.sum()
        return (counts / total if total else np.asarray(self.weights) / sum(self.weights)).tolist()

    @property
    def bytes_read(self) -> int:
        """Bytes this rank's reader has read from shard files so far (its DataLoader workers' included): a
        counter for metrics (`data_read_bytes`). Reading rows (owned_rows), about the bytes of the rows it
        kept; reading whole shards, every shard's bytes per epoch."""
        return self._worker_bytes + sum(b.bytes_read for b in self._blocks)

    @property
    def skipped_shards(self) -> int:
        """Bad shards skipped so far by this process (on_bad_shard="skip"); a counter for metrics."""
        return len(self._warned)

    def _note_skips(self, messages: list[str]) -> None:
        for msg in messages:
            if msg not in self._warned:
                self._warned.add(msg)
                warnings.warn(msg, RuntimeWarning, stacklevel=3)

    # ----- the stream -----

    def _produce(self, start: dict, worker: int = 0, workers: int = 1, group: int = 1) -> Iterator[list]:
        """Per global batch, a list of (n, micro-batch, its first global sample index, state after it, skip
        messages) for the micro-batches n = 0, 1, ... from `start` that this worker builds: those with
        (n // group) % workers == worker. Micro-batches are in the shards' dtype (`_wire_dtype`): views of the
        shuffle windows where possible; the consumer converts each as it hands it out."""
        for b in self._blocks:
            b.close()
        try:
            yield from self._micro_batches(start, worker, workers, group)
        finally:  # stop the read-ahead threads with the iteration (closed, abandoned or failed)
            for b in self._blocks:
                b.close()

    def _micro_batches(self, start: dict, worker: int, workers: int, group: int) -> Iterator[list]:
        # One list per global batch, not one generator step per micro-batch: with micro-batches that are views
        # (no copy), the per-micro-batch Python work is what limits the reader.
        GB, B, m = self.global_batch_size, self.micro_batch_size, self.accumulation
        lo, _ = rank_slice(GB, self.dp_rank, self.dp_size)
        owned = self._owned_positions(start, worker, workers, group) if len(self._blocks) == 1 else None
        cursors = [SourceCursor(p, pos, b.read_window, loop=self.loop, name=s.name, memory=b.window_memory,
                                read_rows=b.read_rows if b.rows is not None else None, owned=owned)
                   for p, b, s, pos in zip(self.plans, self._blocks, self.sources, start["positions"])]
        consumed, first, counts = start["consumed_samples"], start["micro_batch"], np.array(start["counts"])
        n_msgs, local, masks = sum(len(b.messages) for b in self._blocks), 0, {}
        after = {"consumed_samples": consumed, "micro_batch": 0, "counts": counts.tolist(),
                 "positions": [c.position for c in cursors]}
        while True:
            before = after  # the state at this global batch's start
            mine = (tuple(range(first, m)) if workers == 1 else
                    tuple(i for i in range(first, m) if (local + i - first) // group % workers == worker))
            wanted = masks.get(mine)
            if wanted is None:
                wanted = np.zeros(GB, dtype=bool)  # [GB]: positions this worker materialises
                for i in mine:
                    wanted[lo + i * B: lo + (i + 1) * B] = True
                masks[mine] = wanted = int(GB) if wanted.all() else wanted  # all: a count (read_parts' fast path)
            assign = blend(self.weights, consumed, counts, GB)  # [GB] source of each sample
            try:
                parts = self._gather(cursors, assign, wanted)  # [len(mine) * B, seq_length + 1] in pieces
            except Exhausted:
                return
            consumed += GB
            after = {"consumed_samples": consumed, "micro_batch": 0, "counts": counts.tolist(),
                     "positions": [c.position for c in cursors]}
            msgs = self._blocks[0].messages if len(self._blocks) == 1 else [x for b in self._blocks
                                                                            for x in b.messages]
            items, new, index = [], msgs[n_msgs:], consumed - GB + lo
            for i, batch in zip(mine, _split(parts, B)):
                state = after if i == m - 1 else {**before, "micro_batch": i + 1}
                items.append((local + i - first, batch, index + i * B, state, new))
                new = ()  # skip messages come with the first micro-batch after they were found
            if items:
                n_msgs = len(msgs)
                yield items
            local += m - first
            first = 0

    def _owned_positions(self, start: dict, worker: int, workers: int, group: int):
        """For one source: stream positions -> whether this rank and worker keep them (what `_micro_batches`
        keeps). Every row is read in order then (owned rows have no skips), so position p is global sample
        consumed + (p - position) of the iteration's start: global batch k = (p - position) // GB of it."""
        GB, B, m, first = self.global_batch_size, self.micro_batch_size, self.accumulation, start["micro_batch"]
        lo, hi = rank_slice(GB, self.dp_rank, self.dp_size)
        p0 = start["positions"][0]

        def owned(positions: np.ndarray) -> np.ndarray:
            k, s = np.divmod(positions - p0, GB)  # [n] global batch (from the start) and place in it
            i = (s - lo) // B  # this rank's micro-batch, where lo <= s < hi
            mine = (positions >= p0) & (s >= lo) & (s < hi) & ((k > 0) | (i >= first))
            if workers > 1:  # DataLoader worker w builds micro-batch groups w, w + W, ... (counted from the start)
                mine &= (k * m + i - first) // group % workers == worker
            return mine

        return owned

    def _gather(self, cursors: list[SourceCursor], assign: np.ndarray, wanted: np.ndarray | int) -> list:
        """Advance every source through one global batch; return the wanted rows in order, in the shards' dtype,
        as consecutive pieces (views of the shuffle windows where possible: no copy here)."""
        if len(cursors) == 1:  # the common case
            return cursors[0].read_parts(wanted)
        if isinstance(wanted, int):  # every position of the global batch
            wanted = np.ones(wanted, dtype=bool)
        out = np.empty((int(wanted.sum()), self.seq_length + 1), dtype=self._wire_dtype())
        dest = np.cumsum(wanted) - 1  # [GB] global batch position -> row of out
        for d, cursor in enumerate(cursors):
            where = np.flatnonzero(assign == d)
            if len(where):
                keep = wanted[where]
                rows = cursor.read(keep)
                if len(rows):
                    out[dest[where[keep]]] = rows
        return [out]

    def _wire_dtype(self) -> np.dtype:
        """The shards' own token dtype (uint16 unless a source is int32): rows stay in it until `__iter__`."""
        return np.result_type(*(np.dtype(DTYPES[s.manifest["dtype"]][0]) for s in self.sources))

    def __iter__(self) -> Iterator[np.ndarray]:
        """Yield micro-batches from the current position (see the class docstring for loop=False)."""
        source = (self._produce(dict(self._state)) if self.num_workers == 0
                  else worker_loader(self, dict(self._state)))
        dtype = self.dtype
        try:
            for items in source:
                if isinstance(items, tuple):
                    if items[0] == ERROR_TAG:
                        raise DataError(items[1])
                    self._worker_bytes += items[1]  # (BYTES_TAG, bytes read since the last item, items)
                    items = items[2]
                # The lean loop: per-micro-batch work is what limits small micro-batches.
                for _, batch, self._first_index, state, messages in items:
                    if messages:
                        self._note_skips(messages)
                    # Advance before yielding: a state_dict() taken after receiving a batch points at the next.
                    self._state = state
                    # Converted one micro-batch at a time (int64): a small array, still in cache for the caller.
                    yield batch if batch.dtype == dtype else batch.astype(dtype)
        finally:
            if not self.loop:  # a pass that ended or was abandoned: the next iter() starts from the beginning
                self._state = self._initial_state()
            # Stop DataLoader workers now, also when the caller stops early or an error propagates: otherwise
            # they linger until garbage collection, and exit waits ~5 s per worker for them.
            shutdown = getattr(source, "_shutdown_workers", None)
            if shutdown is not None:
                shutdown()


def _split(parts: list[np.ndarray], rows: int) -> list[np.ndarray]:
    """Consecutive `rows`-row arrays out of the pieces: views where a piece holds a whole micro-batch (the pieces
    are fresh shuffle windows nothing else writes), else one copy joining the pieces it straddles."""
    out, batches, filled = None, [], 0
    for part in parts:
        n, at = len(part), 0
        while at < n:
            if filled == 0:  # the usual case: the piece's whole micro-batches from here on, as views
                whole = at + (n - at) // rows * rows
                batches += [part[k: k + rows] for k in range(at, whole, rows)]
                if whole == n:
                    break
                at = whole
            if out is None:
                out = np.empty((rows, part.shape[1]), dtype=part.dtype)
            k = min(rows - filled, n - at)
            out[filled: filled + k] = part[at: at + k]
            filled, at = filled + k, at + k
            if filled == rows:
                batches.append(out)
                out, filled = None, 0
    return batches
