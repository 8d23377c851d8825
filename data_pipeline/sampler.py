"""The global sample order of blended shard sources: pure functions of the manifests and the seed (no I/O).

Megatron-style: there is ONE global sample sequence g = 0, 1, 2, ..., independent of the data-parallel size.

* Each source s has an infinite row stream (row k = epoch k // rows_per_epoch). In epoch e its shards come in
  the order `permutation(SeedSequence([seed, s, e]))` (identity without shuffle), its rows are the shards'
  blocks in that order, and rows are permuted inside windows of `window_blocks` consecutive blocks by
  `SeedSequence([seed, s, e, window])`. `SourcePlan` answers "which (epoch, shard, block, row) is row k".
* Global sample g goes to the source d with the largest `w_d * (g + 1) - count_d` (Megatron's blending rule,
  weights normalised, ties to the lower index); it takes that source's next row. `blend` continues from any
  (g, counts), so a resumed reader needs the counts, not a replay.
* Global batch k is samples [k*GB, (k+1)*GB); DP rank r owns the contiguous slice `rank_slice(...)`.

`SourceCursor` walks a source's stream window by window; the reading itself is injected (`read_window`), so
this module stays free of I/O and of webdataset.
"""

from __future__ import annotations

import sys
from typing import Callable, NamedTuple, Sequence

import numpy as np

from data_pipeline.errors import DataError


class Window(NamedTuple):
    """A shuffle window: consecutive blocks of one epoch, whose rows are permuted together."""
    epoch: int
    index: int
    start: int  # first row of the window within the epoch
    blocks: list[tuple[int, int, int]]  # (shard, block in shard, rows), in stream order
    order: np.ndarray  # int64 [rows]: stream position start + i is row order[i] of the window's blocks concatenated


class SourcePlan:
    """The row stream of one source: shard order, blocks and shuffle windows per epoch, from manifest counts."""

    def __init__(self, shard_rows: Sequence[int], rows_per_block: int, *, seed: int, source: int,
                 shuffle: bool = True, window_blocks: int = 8):
        """`shard_rows[i]`: sequences in shard i; every block holds `rows_per_block` rows but a shard's last."""
        self.shard_rows = np.asarray(shard_rows, dtype=np.int64)  # [shards]
        if rows_per_block <= 0 or window_blocks <= 0 or self.shard_rows.size == 0 or (self.shard_rows <= 0).any():
            raise ValueError(f"SourcePlan: need shards with rows > 0, rows_per_block > 0, window_blocks > 0; got "
                             f"{self.shard_rows.tolist()[:8]}, {rows_per_block}, {window_blocks}")
        self.rows_per_block, self.window_blocks = rows_per_block, window_blocks
        self.shard_blocks = -(-self.shard_rows // rows_per_block)  # [shards], ceil
        self.rows_per_epoch = int(self.shard_rows.sum())
        self.blocks_per_epoch = int(self.shard_blocks.sum())
        self.windows_per_epoch = -(-self.blocks_per_epoch // window_blocks)
        self.seed, self.source, self.shuffle = seed, source, shuffle
        self._layouts: dict[int, tuple[np.ndarray, np.ndarray, np.ndarray]] = {}

    def shard_order(self, epoch: int) -> np.ndarray:
        """Shard indices in the order epoch `epoch` reads them."""
        return self._layout(epoch)[0]

    def _layout(self, epoch: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """(shard order, first row of each shard in the epoch [shards+1], first block [shards+1])."""
        layout = self._layouts.get(epoch)  # one lookup: the read-ahead thread may clear the cache meanwhile
        if layout is None:
            n = len(self.shard_rows)
            order = (np.random.default_rng(np.random.SeedSequence([self.seed, self.source, epoch])).permutation(n)
                     if self.shuffle else np.arange(n))
            rows = np.concatenate([[0], np.cumsum(self.shard_rows[order])])
            blocks = np.concatenate([[0], np.cumsum(self.shard_blocks[order])])
            if len(self._layouts) > 4:  # resume and epoch boundaries touch at most two epochs at a time
                self._layouts.clear()
            layout = self._layouts[epoch] = (order, rows, blocks)
        return layout

    def window_of(self, epoch: int, row: int) -> int:
        """The window holding stream row `row` (0 <= row < rows_per_epoch) of `epoch`."""
        _, rows, blocks = self._layout(epoch)
        p = int(np.searchsorted(rows, row, side="right")) - 1  # position of the row's shard in the epoch
        return int(blocks[p] + (row - rows[p]) // self.rows_per_block) // self.window_blocks

    def window(self, epoch: int, index: int) -> Window:
        """Window `index` of `epoch`: its blocks and its row permutation."""
        order, rows, blocks = self._layout(epoch)
        first, last = index * self.window_blocks, min((index + 1) * self.window_blocks, self.blocks_per_epoch)
        gb = np.arange(first, last)  # the window's blocks, numbered within the epoch
        p = np.searchsorted(blocks, gb, side="right") - 1  # their shards' positions in the epoch order
        shard, b = order[p], gb - blocks[p]
        n_rows = np.minimum(self.rows_per_block, self.shard_rows[shard] - b * self.rows_per_block)
        out = list(zip(shard.tolist(), b.tolist(), n_rows.tolist()))
        start = int(rows[p[0]] + b[0] * self.rows_per_block)
        n = int(n_rows.sum())
        perm = (np.random.default_rng(np.random.SeedSequence([self.seed, self.source, epoch, index])).permutation(n)
                if self.shuffle else np.arange(n))
        return Window(epoch, index, start, out, perm)

    def locate(self, k: int) -> tuple[int, int, int, int]:
        """Row k of the infinite stream -> (epoch, shard, block in shard, row in block)."""
        epoch, row = divmod(int(k), self.rows_per_epoch)
        win = self.window(epoch, self.window_of(epoch, row))
        i = int(win.order[row - win.start])
        for shard, block, rows in win.blocks:
            if i < rows:
                return epoch, shard, block, i
            i -= rows
        raise AssertionError("unreachable: window rows add up")


class Exhausted(Exception):
    """A non-looping cursor reached the end of epoch 0."""


class SourceCursor:
    """Consume one source's stream from a position, window by window, keeping or dropping rows as asked.

    `read_window(window)` returns one array per block ([rows, seq_length + 1], any integer dtype) or None for
    a block that is unreadable and skipped (`on_bad_shard="skip"`). Skipped rows are stepped over: `position`
    counts stream rows, including skipped ones, so the position alone says where to resume.

    With `read_rows(window, rows)` (int64 window rows, as indices into its blocks concatenated -> [n, seq_length
    + 1]) no whole window is read, only the rows this reader keeps (every row is readable then: a bad one is an
    error): with `owned(positions) -> bool mask` (stream positions this reader will keep), a window's owned rows
    at once when it is loaded (one gather, all checked before any is used: at most one window ahead); without,
    each `read_parts` reads the rows it keeps.
    """

    def __init__(self, plan: SourcePlan, position: int, read_window: Callable[[Window], list], *,
                 loop: bool = True, name: str = "source", memory: "WindowMemory | None" = None,
                 read_rows: Callable[[Window, np.ndarray], np.ndarray] | None = None,
                 owned: Callable[[np.ndarray], np.ndarray] | None = None):
        """Start at stream row `position`; nothing is read before the first `read()`. `memory`: where windows
        are built (one per source that outlives cursors: its buffers are reused across iterations)."""
        self.plan, self._read_window, self.loop, self.name = plan, read_window, loop, name
        self._read_rows, self._owned_fn = read_rows, owned
        self._owned = self._slot = None  # row mode with `owned`: [window rows] bool, and index into _rows
        self._memory = memory or WindowMemory()
        self._target = int(position)  # where to start: resolved lazily on the first read
        self._window: Window | None = None
        self._rows = self._pos = None  # the window's readable rows in stream order, and their positions
        self._i = 0  # next entry of _rows / _pos
        # (epoch, window) starting the current run of windows without a readable row: a run that covers one
        # whole epoch, window 0 to its last, is fatal (every shard is bad); a run that only adds up to an
        # epoch's worth of windows across a boundary is not (the good shard moved within the order).
        self._empty_since: tuple[int, int] | None = None

    @property
    def position(self) -> int:
        """Stream row of the next row this cursor would hand out (or the window end, if none is left there)."""
        if self._window is None:
            return self._target
        base = self._window.epoch * self.plan.rows_per_epoch
        if self._i < len(self._pos):
            return base + int(self._pos[self._i])
        return base + self._window.start + len(self._window.order)

    def _load(self, epoch: int, index: int) -> None:
        if not self.loop and epoch > 0:
            raise Exhausted(self.name)
        win = self.plan.window(epoch, index)
        if self._read_rows is not None:  # only the rows this reader keeps
            self._rows, self._pos = None, win.start + np.arange(len(win.order))
            if self._owned_fn is not None:  # the window's owned rows now, in stream order
                self._owned = self._owned_fn(epoch * self.plan.rows_per_epoch + self._pos)
                self._slot = np.cumsum(self._owned) - 1
                self._rows = self._read_rows(win, win.order[self._owned])  # [owned rows, seq_length + 1]
            self._window, self._i = win, 0
            return
        arrays = self._read_window(win)
        sizes = [r for _, _, r in win.blocks]
        ok = np.repeat([a is not None for a in arrays], sizes)  # [window rows]: row readable?
        keep = ok[win.order]  # [window rows]: stream position readable?
        self._rows = None  # drop the last window first: its buffer may serve the next one
        self._rows = _in_stream_order(arrays, sizes, win.order[keep], self._memory)  # [readable rows, seq + 1]
        self._pos = win.start + np.flatnonzero(keep)  # positions (within the epoch) of the readable rows
        self._window, self._i = win, 0
        if len(self._pos):
            self._empty_since = None
            return
        since = self._empty_since = self._empty_since or (epoch, index)
        whole = since[0] if since[1] == 0 else since[0] + 1  # the first epoch the run can cover whole
        if epoch > whole or (epoch == whole and index == self.plan.windows_per_epoch - 1):
            raise DataError(f"{self.name}: no readable shard in a whole epoch (all skipped as bad)")

    def _ensure(self) -> None:
        """Make the current window hold at least one unconsumed row."""
        if self._window is None:
            epoch, row = divmod(self._target, self.plan.rows_per_epoch)
            self._load(epoch, self.plan.window_of(epoch, row))
            self._i = int(np.searchsorted(self._pos, row))
        while self._i >= len(self._pos):
            win = self._window
            if win.index + 1 < self.plan.windows_per_epoch:
                self._load(win.epoch, win.index + 1)
            else:
                self._load(win.epoch + 1, 0)

    def read(self, keep: np.ndarray, out: np.ndarray | None = None) -> np.ndarray:
        """Consume len(keep) rows; return those where keep is True: [keep.sum(), seq_length + 1].

        With `out` ([keep.sum(), seq_length + 1], any dtype) the rows are written (converted) into it; without,
        the result may be a view of the current window (no copy).
        """
        parts = self.read_parts(keep)
        if out is not None:
            filled = 0
            for rows in parts:
                out[filled: filled + len(rows)] = rows
                filled += len(rows)
            return out
        if not parts:
            return np.zeros((0, 0), dtype=np.uint16)
        return parts[0] if len(parts) == 1 else np.concatenate(parts)

    def read_parts(self, keep: np.ndarray | int) -> list[np.ndarray]:
        """Like `read`, as consecutive non-empty pieces (views of the windows where keep allows): no copy of
        the rows a caller converts anyway. `keep` may be a count n: the next n rows, all kept (no mask to test,
        which matters at one micro-batch per global batch)."""
        every = isinstance(keep, int)
        parts, done, n = [], 0, keep if every else len(keep)
        while done < n:
            self._ensure()
            chunk = min(n - done, len(self._pos) - self._i)
            if self._read_rows is not None:
                picked = np.arange(self._i, self._i + chunk)  # stream positions in the window
                if not every:
                    picked = picked[keep[done: done + chunk]]
                if self._owned is None:
                    rows = self._read_rows(self._window, self._window.order[picked])
                else:
                    if not self._owned[picked].all():
                        raise AssertionError(f"{self.name}: asked for rows the owned mask left out")
                    slots = self._slot[picked]
                    whole = len(slots) and slots[-1] - slots[0] + 1 == len(slots)
                    rows = self._rows[slots[0]: slots[-1] + 1] if whole else self._rows[slots]  # a view if whole
            else:
                rows = self._rows[self._i: self._i + chunk]  # a view: consecutive rows
                if not every and not keep[done: done + chunk].all():
                    rows = rows[keep[done: done + chunk]]
            if len(rows):
                parts.append(rows)
            self._i += chunk
            done += chunk
        return parts


# numpy asks the kernel for transparent huge pages (madvise) for arrays of 4 MiB and more: a window buffer of
# 2-4 MiB is rounded up to that (at most 2x its size, 4 buffers per source) to be faulted in 2 MiB at a time.
HUGE_MIN = 4 << 20


class WindowMemory:
    """Buffers for shuffle windows, reused once nothing references them.

    Each window used to be a fresh array (~2 MB at seq_length 2048: 8 blocks x 64 rows): whenever the allocator
    had handed such memory back to the OS, filling it cost a page fault per 4 KiB. Measured on bench/data.py's
    shards, per epoch of 97 windows: ~3,900 such faults in the 1st pass and ~1,000 in each later one (a few µs
    each in this VM); with kept 4 MiB buffers ~400 in the 1st pass and none later. A buffer is reused only when
    its reference count says nothing views it: every row the reader hands out is a numpy view that keeps its
    base buffer alive (as does a torch tensor made from it), so a row a caller holds never changes.
    """

    def __init__(self, keep: int = 4):
        self._buffers: list[np.ndarray] = []  # uint8, each owning its memory
        self._keep = keep  # windows in use at once: the cursor's, the batch being handed out, the caller's

    def __getstate__(self) -> dict:  # a DataLoader worker builds its own
        return {"_buffers": [], "_keep": self._keep}

    def empty(self, shape: tuple[int, int], dtype: np.dtype) -> np.ndarray:
        """An uninitialised array of `shape` and `dtype`, in a free kept buffer if one is large enough."""
        nbytes = shape[0] * shape[1] * np.dtype(dtype).itemsize
        for buf in self._buffers:
            # 3 references when free: the list, the loop variable and getrefcount's own argument.
            if buf.nbytes >= nbytes and sys.getrefcount(buf) == 3:
                return buf[:nbytes].view(dtype).reshape(shape)
        if len(self._buffers) >= self._keep:  # all in use: a one-off array
            return np.empty(shape, dtype=dtype)
        buf = np.empty(HUGE_MIN if HUGE_MIN // 2 <= nbytes < HUGE_MIN else nbytes, dtype=np.uint8)
        self._buffers.append(buf)
        return buf[:nbytes].view(dtype).reshape(shape)


def _in_stream_order(arrays: list, sizes: list[int], src: np.ndarray, memory: WindowMemory) -> np.ndarray | None:
    """The window's readable rows in stream order: row i is row src[i] of the blocks concatenated.

    Rows go straight from each block into their stream slots (one copy): concatenating the blocks first and
    then gathering would copy every row twice. src only names rows of readable blocks.
    """
    first = next((a for a in arrays if a is not None), None)
    if first is None:
        return None
    out = memory.empty((len(src), first.shape[1]), first.dtype)
    slot = np.empty(sum(sizes), dtype=np.int64)  # [window rows]: stream slot of each readable block row
    slot[src] = np.arange(len(src))
    start = 0
    for a, n in zip(arrays, sizes):  # each block's rows land in their slots with one contiguous read
        if a is not None:
            out[slot[start: start + n]] = a
        start += n
    return out


def blend(weights: Sequence[float], start: int, counts: np.ndarray, n: int) -> np.ndarray:
    """Sources of global samples start .. start+n-1 (int64 [n]); `counts` (samples per source before `start`)
    is advanced in place.

    Megatron's rule, `argmax_d w_d * (g + 1) - count_d` with normalised weights. megatron-core's compiled
    `build_blending_indices` uses `max(g, 1)` instead of `g + 1` and always starts from zero counts, so it can
    neither give this rule exactly nor continue from a checkpoint; at a few sources this loop is ~1 µs/sample.
    """
    if len(weights) == 1:  # checked first: at a global batch per micro-batch, this is per-micro-batch work
        counts[0] += n
        return np.zeros(n, dtype=np.int64)
    w = [float(x) for x in np.asarray(weights, dtype=np.float64) / np.sum(weights)]
    c = [int(x) for x in counts]
    out = np.empty(n, dtype=np.int64)
    for i in range(n):
        g1 = start + i + 1
        best, best_err = 0, w[0] * g1 - c[0]
        for d in range(1, len(w)):
            err = w[d] * g1 - c[d]
            if err > best_err:
                best, best_err = d, err
        out[i] = best
        c[best] += 1
    counts[:] = c
    return out


def rank_slice(global_batch_size: int, dp_rank: int, dp_size: int) -> tuple[int, int]:
    """[lo, hi): the samples of each global batch that data-parallel rank `dp_rank` owns (contiguous)."""
    per_rank = global_batch_size // dp_size
    return dp_rank * per_rank, (dp_rank + 1) * per_rank


def check_batch_sizes(micro_batch_size: int, global_batch_size: int, dp_size: int) -> int:
    """Validate the batch geometry; return micro-batches per rank per global batch (accumulation steps)."""
    if micro_batch_size <= 0 or dp_size <= 0 or global_batch_size <= 0 or \
            global_batch_size % (micro_batch_size * dp_size):
        raise ValueError(f"global_batch_size {global_batch_size} must be a positive multiple of "
                         f"micro_batch_size {micro_batch_size} x dp_size {dp_size}")
    return global_batch_size // (micro_batch_size * dp_size)
