"""Random access to the rows of local packed shards, verified row by row: what a DP rank reads when it reads only
the rows it owns.

Why rows, not shards: the global order shuffles rows inside windows of consecutive blocks (sampler.py), so the
GB/dp rows one rank owns in a global batch are spread over every block of the window. Reading whole blocks or
shards per rank reads the data dp times over (1 PB per epoch of a 2 TB corpus at dp = 512); reading rows reads it
once, whatever dp. The manifest's member table gives every row's byte range: block b's data starts at
b * stride + 512 and row r of it r * row_bytes later, so no tar header is parsed to find a row.

Integrity: a shard's whole-file checksum would need every byte of it on every rank that reads any of its rows.
Instead each row is checked against its xxh3_128 digest in the shard's `row_digests` file (integrity.py), the
first time this process reads it; reading a row costs its bytes plus 16 (once). The tar headers are not read:
checking them on every rank would cost 512 bytes per block per rank (100% more at dp = 512 with 64 rows of 2049
uint16 tokens per block), and they add nothing once the rows themselves are verified: a member table that puts a
row at the wrong offset gives bytes that fail the row's digest, an error, never wrong rows. The file size is
checked before anything is read, so no read goes past the end of a truncated file.

Files are memory-mapped without huge pages and with MADV_RANDOM: the kernel then reads the pages a row touches,
not a 2 MiB folio or a read-ahead window around it (which would read other ranks' rows too).
"""

from __future__ import annotations

import mmap
import os
from typing import NamedTuple

import numpy as np
import xxhash

from data_pipeline import tario
from data_pipeline.errors import DataError
from data_pipeline.integrity import ROW_DIGEST_BYTES, member_table, packed_stride
from data_pipeline.shards import DTYPES, MANIFEST_NAME
from data_pipeline.stream import Source, is_local, local_path

_HEADER = 512
_KEEP_OPEN = 128  # shards mapped at once per source (address space and file descriptors stay bounded)


def rows_readable(src: Source) -> bool:
    """Whether every shard of `src` can be read row by row: local files with a member table and row digests."""
    return all(is_local(url) and "members" in info and "row_digests" in info
               for url, info in zip(src.urls, src.manifest["shards"]))


class _Shard(NamedTuple):
    blocks: np.ndarray  # [blocks, rows_per_block, row] strided view of the mapped file (last block: valid rows)
    digests: np.ndarray  # uint8 [sequences, 16]: the row digests file, mapped
    verified: np.ndarray  # bool [sequences]: rows this process has checked


class RowFiles:
    """The rows of one source's shards, read on request and verified once per process (module docstring).
    `bytes_read` counts what is read: row bytes, and 16 per row verified (once)."""

    def __init__(self, src: Source):
        self.src, m = src, src.manifest
        self.dtype, self.ext = np.dtype(DTYPES[m["dtype"]][0]), DTYPES[m["dtype"]][1]
        self.spp, self.row = m["sequences_per_sample"], src.row
        self.stride = packed_stride(m, self.dtype.itemsize)
        self.bytes_read = 0
        self._open: dict[int, _Shard] = {}  # shard -> its mapping, most recently opened last
        self._verified: dict[tuple, np.ndarray] = {}  # file identity -> rows checked, kept when unmapped

    def __getstate__(self) -> dict:  # a DataLoader worker maps the files itself
        return {**self.__dict__, "_open": {}}

    def gather(self, shard: int, blocks: np.ndarray, rows: np.ndarray) -> np.ndarray:
        """Row rows[i] of block blocks[i] of `shard` as out[i] ([n, seq_length + 1], a new array), verifying rows
        not checked before; a row that fails its digest is a one-line DataError naming the shard."""
        f = self._open.get(shard) or self._map(shard)
        out = f.blocks[blocks, rows]  # one gather from the page cache (a copy: the mapping may go)
        index = blocks * self.spp + rows  # the rows' numbers in the shard
        new = ~f.verified[index]
        self.bytes_read += out.nbytes + int(new.sum()) * ROW_DIGEST_BYTES
        for i in np.flatnonzero(new):
            if xxhash.xxh3_128_digest(out[i].tobytes()) != f.digests[index[i]].tobytes():
                raise DataError(f"{self.src.urls[shard]}: xxh3_128 does not match {MANIFEST_NAME} (row {rows[i]} "
                                f"of block {blocks[i]} against {self.src.manifest['shards'][shard]['row_digests']};"
                                f" corrupt or replaced shard)")
        f.verified[index[new]] = True
        return out

    def _blocks_view(self, data: memoryview, info: dict) -> np.ndarray:
        """[blocks, rows_per_block, row] view of the mapped shard: block b's rows start at b * stride + 512
        (strides in bytes); only (block, row) pairs that exist are ever indexed (the last block may be short)."""
        base = np.frombuffer(data, dtype=self.dtype, count=(len(data) - _HEADER) // self.dtype.itemsize,
                             offset=_HEADER)
        item = self.dtype.itemsize
        return np.lib.stride_tricks.as_strided(base, shape=(info["blocks"], self.spp, self.row),
                                               strides=(self.stride, self.row * item, item), writeable=False)

    def _map(self, shard: int) -> _Shard:
        url, info = self.src.urls[shard], self.src.manifest["shards"][shard]
        path = local_path(url)
        digest_path = path.parent / info["row_digests"]
        member_table(self.src.manifest, info, self.ext, self.dtype.itemsize)  # a malformed entry: DataError
        need = (info["blocks"] - 1) * self.stride + _HEADER + (info["sequences"] - (info["blocks"] - 1) * self.spp) \
            * self.row * self.dtype.itemsize
        try:
            with open(path, "rb") as f:
                key, size = tario.file_identity(f), os.fstat(f.fileno()).st_size
                if size < need:
                    raise DataError(f"{url}: truncated shard, {size} bytes, its member table needs {need}")
                data = _map_random(f)
            with open(digest_path, "rb") as f:
                digests = np.frombuffer(_map_random(f) or b"", dtype=np.uint8)
        except OSError as exc:
            raise DataError(f"{url}: cannot open shard or {digest_path.name} ({type(exc).__name__}: {exc})") from None
        if len(digests) != info["sequences"] * ROW_DIGEST_BYTES:
            raise DataError(f"{digest_path}: {len(digests)} bytes, {info['sequences']} rows need "
                            f"{info['sequences'] * ROW_DIGEST_BYTES} (truncated or replaced)")
        if key not in self._verified:  # a replaced file (new identity) is verified afresh
            self._verified[key] = np.zeros(info["sequences"], dtype=bool)
        if len(self._open) >= _KEEP_OPEN:
            self._open.pop(next(iter(self._open)))  # the oldest mapping goes when nothing views it any more
        entry = self._open[shard] = _Shard(self._blocks_view(data, info), digests.reshape(-1, ROW_DIGEST_BYTES),
                                           self._verified[key])
        return entry


def _map_random(f) -> memoryview | None:
    """`f` mapped read-only for random reads: no huge pages, no read-ahead around a faulting page."""
    if os.fstat(f.fileno()).st_size == 0:
        return None
    mapped = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ)
    if hasattr(mmap, "MADV_RANDOM"):
        mapped.madvise(mmap.MADV_RANDOM)
    return memoryview(mapped)
