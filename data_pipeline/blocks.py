"""Blocks of one source in stream order, read ahead in a background thread.

`BlockSource` serves the tar members ("blocks" of packed rows) of one source in the order `sampler.SourcePlan`
gives, so the reader's shuffling and slicing never touch files. Reading runs one shard ahead in a daemon thread
(`tario.ReadAhead`): whole shards are read (and checksummed on first use) while the caller shuffles and widens rows.
It follows the same block order as inline reading, so rows and resume positions do not depend on it.
"""

from __future__ import annotations

from typing import Iterator, NamedTuple

import numpy as np

from data_pipeline import tario
from data_pipeline.errors import DataError
from data_pipeline.integrity import Verifier
from data_pipeline.rows import RowFiles, rows_readable
from data_pipeline.sampler import SourcePlan, Window, WindowMemory
from data_pipeline.stream import Source, local_shard_problems, read_shard

# Read-ahead: chunks of up to _CHUNK_BYTES of one shard (a whole shard of ~16 MB as written by default: one
# queue hand-off per shard, not per block), at most _READ_AHEAD_CHUNKS queued (memory ~ (2 + 1) x 32 MB).
_CHUNK_BYTES = 32 << 20
_READ_AHEAD_CHUNKS = 2


class _Chunk(NamedTuple):
    """Consecutive blocks of one shard as read ahead; `error` (the shard's DataError, if any) comes after them,
    and only the last chunk of a shard holds its last block and error (end-of-shard checks come with it)."""
    epoch: int
    shard: int
    blocks: dict  # block in shard -> rows [n, seq_length + 1]
    error: DataError | None


def _read_chunks(src: Source, plan: SourcePlan, bad: dict, verify: bool, verifier: Verifier, loop: bool,
                 epoch: int, pos: int, block: int, counted: list) -> Iterator[_Chunk]:
    """The source's blocks in stream order from `block` of the `pos`-th shard of `epoch` (the read-ahead
    thread's work). Shards known bad from their first block are passed over, as the consumer never asks for
    them; a shard's error ends its chunks and reading goes on with the next shard, as the consumer does."""
    while True:
        order = plan.shard_order(epoch)
        if pos == 0 and all(bad.get(int(shard)) == 0 for shard in order):
            return  # every shard bad from its first block: nothing left to read (and no endless loop here)
        for p in range(pos, len(order)):
            shard = int(order[p])
            if bad.get(shard) == 0:
                block = 0
                continue
            blocks, size, error = {}, 0, None
            try:
                for b, rows in read_shard(src, shard, block, verify, verifier):
                    if size >= _CHUNK_BYTES:  # flush before adding: the last block stays in the last chunk
                        yield _Chunk(epoch, shard, blocks, None)
                        blocks, size = {}, 0
                    blocks[b] = rows
                    size += rows.nbytes
                    counted[0] += rows.nbytes + 512  # the block and its tar header
            except DataError as exc:
                error = exc
            yield _Chunk(epoch, shard, blocks, error)
            block = 0
        if not loop:
            return
        epoch, pos = epoch + 1, 0


class BlockSource:
    """Blocks of one source in stream order, read ahead in a background thread (`tario.ReadAhead`; inline
    with read_ahead=False), and (on_bad_shard="skip") a bad shard's remaining blocks as None, deterministically
    on every rank. The read-ahead follows the plan's shard order; a request it did not foresee (the first
    one, a resume) restarts it there, so positions and results do not depend on it."""

    def __init__(self, src: Source, plan: SourcePlan, *, verify: bool, skip_bad: bool, loop: bool = True,
                 read_ahead: bool = True, owned_rows: bool = False):
        """owned_rows: read only the rows asked for (`read_rows`, rows.py) where the source allows it: local
        packed shards with row digests, verified, bad shards an error (a skip must be seen by every rank alike,
        so it needs every rank to read every row); else whole shards as before."""
        self.src, self.plan, self.verify, self.skip_bad = src, plan, verify, skip_bad
        self.rows = RowFiles(src) if owned_rows and verify and not skip_bad and rows_readable(src) else None
        self._counted = [0]  # bytes of blocks read whole (+ their headers); updated by the read-ahead thread
        self.loop, self.read_ahead = loop, read_ahead
        self.verifier = Verifier()
        self.window_memory = WindowMemory()  # the shuffle windows' buffers, kept across iterations
        self.bad: dict[int, int] = {}  # shard -> first unusable block
        self.messages: list[str] = []  # one per skipped shard, in order
        self._ahead: Iterator[_Chunk] | None = None
        self._chunk: _Chunk | None = None
        for shard, exc in local_shard_problems(src):
            self._bad(shard, 0, exc)

    def _bad(self, shard: int, block: int, exc: DataError) -> None:
        if not self.skip_bad:
            raise exc
        self.bad[shard] = min(block, self.bad.get(shard, block))
        self.messages.append(f"{exc}; skipping its blocks from {block} on (on_bad_shard=skip)")

    @property
    def bytes_read(self) -> int:
        """Bytes this process has read from the source's shard files: rows (and row digests and headers) when
        reading rows, else whole blocks with their headers plus each shard hashed once for its checksum."""
        return self._counted[0] + self.verifier.bytes_hashed + (self.rows.bytes_read if self.rows else 0)

    def read_rows(self, win: Window, rows: np.ndarray) -> np.ndarray:
        """Rows of `win` (indices into its blocks' rows concatenated) -> [n, seq_length + 1], read one by one."""
        sizes = np.array([n for _, _, n in win.blocks], dtype=np.int64)
        starts = np.cumsum(sizes) - sizes
        k = np.searchsorted(starts, rows, side="right") - 1  # [n] block of the window each row sits in
        shards = np.array([s for s, _, _ in win.blocks], dtype=np.int64)[k]
        blocks = np.array([b for _, b, _ in win.blocks], dtype=np.int64)[k]
        within = rows - starts[k]
        if len(rows) and (shards == shards[0]).all():  # the usual case: the rows of one shard, one copy
            return self.rows.gather(int(shards[0]), blocks, within)
        out = np.empty((len(rows), self.src.row), dtype=self.rows.dtype)
        for shard in np.unique(shards):
            mine = np.flatnonzero(shards == shard)
            out[mine] = self.rows.gather(int(shard), blocks[mine], within[mine])
        return out

    def close(self) -> None:
        """Stop the read-ahead, if any (a new iteration starts from wherever its cursor says)."""
        ahead, self._ahead, self._chunk = self._ahead, None, None
        if ahead is not None:
            ahead.close()

    def __getstate__(self) -> dict:  # DataLoader workers get a copy without the parent's thread
        return {**self.__dict__, "_ahead": None, "_chunk": None}

    def read_window(self, win: Window) -> list[np.ndarray | None]:
        """Arrays for the window's blocks (None: skipped as bad); plugged into SourceCursor."""
        return [self._block(win.epoch, shard, block) for shard, block, _ in win.blocks]

    def _restart(self, epoch: int, shard: int, block: int) -> None:
        self.close()
        pos = int(np.flatnonzero(self.plan.shard_order(epoch) == shard)[0])
        chunks = _read_chunks(self.src, self.plan, self.bad, self.verify, self.verifier, self.loop, epoch, pos,
                              block, self._counted)
        self._ahead = tario.ReadAhead(chunks, _READ_AHEAD_CHUNKS) if self.read_ahead else chunks

    def _fetch(self) -> None:
        try:
            self._chunk = next(self._ahead)
        except StopIteration:  # the end of a non-looping stream
            self._chunk = None

    def _block(self, epoch: int, shard: int, block: int) -> np.ndarray | None:
        if block >= self.bad.get(shard, block + 1):
            return None
        last = self.src.manifest["shards"][shard]["blocks"] - 1
        restarts, other = 0, False
        while True:
            c = self._chunk
            if c is not None and (c.epoch, c.shard) == (epoch, shard):
                rows = c.blocks.get(block)
                if rows is not None and (block != last or c.error is None):
                    return rows
                top = max(c.blocks, default=-1)
                if c.error is not None and block >= top:  # at or past the error (the last block: its checks)
                    return self._fail(shard, block, c.error)
                if block > top:  # further on in this shard: its next chunk
                    self._fetch()
                    continue
            elif c is not None and self._ahead is not None and not other:  # the next shard: the next chunk
                other = True
                self._fetch()
                continue
            if restarts:  # read from this very block, and it is not there
                return self._fail(shard, block, DataError(f"{self.src.urls[shard]}: truncated shard, block "
                                                          f"{block} missing"))
            restarts, other = 1, True
            self._restart(epoch, shard, block)  # not foreseen: the first block, a resume, a gap behind
            self._fetch()

    def _fail(self, shard: int, block: int, exc: DataError) -> None:
        self._bad(shard, block, exc)  # raises unless skipping
        return None
