"""Shard integrity: the manifest's per-shard checksums and member tables, and what a reader learns checking them.

Checksums. `pretrain data prepare` records two per shard: `sha256` (provenance: the digest people and tools
compare; `sha256sum` checks it) and `xxh3_128` (what the reader verifies: xxHash's XXH3, 128-bit, ~30 GB/s on
one core here against ~2 GB/s for sha256, so verifying a shard costs ~1/5 of reading it instead of ~4x).
XXH3 is not cryptographic: it detects corruption, truncation and replaced files (a 2^-128 chance of missing
one), not a deliberate forgery; sha256 stays in the manifest for that. Manifests written before `xxh3_128`
existed are verified with sha256 (`manifest_checksum`).

Member tables. Shards written by `prepare_shards` are "packed": member i's 512-byte header starts at
i * stride, with stride = 512 + the full block's bytes rounded up to 512 (headers back to back, nothing
between), its name is the global block index `first_key + i` zero-padded to the width of `first_key`, plus
the dtype's extension. The manifest records this as `"members": {"first_key": "0000000128", "stride": N}` (two
numbers per shard, whatever its member count), and the reader skips tarfile's header parsing (~15 µs per
member in Python: ~1 ms per 64-member shard, twice the cost of hashing it with xxh3). Every header is still
checked against the table, all at once with numpy (`tario.check_members`): with the shard's checksum verified,
a table its headers contradict is a wrong manifest, an error; unverified, tarfile parses the shard as before
and reports what is wrong with it. Shards without the entry (older manifests) are parsed by tarfile too.
"""

from __future__ import annotations

import hashlib
import os
from typing import Callable

import xxhash

from data_pipeline import tario
from data_pipeline.errors import DataError

FAST_CHECKSUM = "xxh3_128"
# Row digests (the manifest's per-shard "row_digests" file, written by `data prepare`): xxh3_128 of each row's
# token bytes, 16 bytes per row in row order, so a reader that reads only the rows it owns verifies exactly
# those (rows.py). 16 bytes per row of 2049 uint16 tokens: 0.4% of the data.
ROW_DIGESTS_SUFFIX = ".rowsums"
ROW_DIGEST_BYTES = 16
# Algorithms a manifest may carry, the reader's preference first; each maps to a streaming hasher factory.
HASHERS: dict[str, Callable] = {FAST_CHECKSUM: xxhash.xxh3_128, "sha256": hashlib.sha256}
_TAR_BLOCK = 512
# Shard mappings a reader keeps between epochs (Megatron keeps its dataset mapped for the whole run): mapping a
# shard afresh costs a page-table fault per 64 KiB touched, ~15 ms per 200 MB epoch here, as much as the copy of
# the rows itself. Mapped page-cache pages stay reclaimable; the bounds are on address space and on open files
# (Python's mmap holds a duplicate of the file descriptor until it is unmapped, and `ulimit -n` is often 1024).
_KEEP_MAPPED_BYTES = 16 << 30
_KEEP_MAPPED_SHARDS = 128


def file_digests(path: str | os.PathLike, algorithms: tuple[str, ...] = tuple(HASHERS),
                 chunk: int = 1 << 22) -> dict[str, str]:
    """{algorithm: hex digest} of a file for each of ``algorithms`` (default: every one a manifest records),
    computed in one read (4 MiB chunks: the hashers release the GIL)."""
    hashers = {name: HASHERS[name]() for name in algorithms}
    with open(path, "rb") as f:
        while block := f.read(chunk):
            for h in hashers.values():
                h.update(block)
    return {name: h.hexdigest() for name, h in hashers.items()}


def row_digests(rows) -> bytes:
    """The xxh3_128 digests (16 bytes each, canonical big-endian) of each row of `rows` [n, seq_length + 1],
    concatenated: what a `row_digests` file holds for these rows."""
    return b"".join(xxhash.xxh3_128_digest(row.tobytes()) for row in rows)


def manifest_checksum(info: dict) -> tuple[str, str] | None:
    """(algorithm, hex digest) the reader verifies for one manifest shard entry: xxh3_128 when the manifest has
    it, else sha256 (manifests written before xxh3_128); None when it has neither."""
    for name in HASHERS:
        if name in info:
            return name, info[name]
    return None


def digest(algorithm: str, data) -> str:
    """Hex digest of a bytes-like object (a mapped shard) with one of HASHERS (the GIL is released inside)."""
    if algorithm == FAST_CHECKSUM:
        return xxhash.xxh3_128_hexdigest(data)  # one-shot: no state object, GIL released above 64 KiB
    return hashlib.sha256(data).hexdigest()


def packed_stride(manifest: dict, itemsize: int) -> int:
    """Bytes from one member's header to the next in a packed shard: a header plus a full block, padded."""
    block_bytes = manifest["sequences_per_sample"] * (int(manifest["seq_length"]) + 1) * itemsize
    return _TAR_BLOCK + -(-block_bytes // _TAR_BLOCK) * _TAR_BLOCK


def member_table(manifest: dict, info: dict, ext: str, itemsize: int) -> list[tuple[str, int, int]] | None:
    """(name, data offset, size) of every member of a packed shard, from its manifest `members` entry (module
    docstring); None without one. A malformed entry is a DataError naming the shard."""
    entry = info.get("members")
    if entry is None:
        return None
    stride, spp = packed_stride(manifest, itemsize), manifest["sequences_per_sample"]
    first = entry.get("first_key") if isinstance(entry, dict) else None
    if not (isinstance(first, str) and first.isdigit() and entry.get("stride") == stride):
        raise DataError(f"{info['name']}: manifest members entry {entry} is not a packed layout (stride {stride})")
    row_bytes = (int(manifest["seq_length"]) + 1) * itemsize
    key, width = int(first), len(first)
    return [(f"{key + i:0{width}d}.{ext}", i * stride + _TAR_BLOCK,
             min(spp, info["sequences"] - i * spp) * row_bytes) for i in range(info["blocks"])]


def packed_members_entry(path: str | os.PathLike, manifest: dict, info: dict, first_key: str, ext: str,
                         itemsize: int) -> dict | None:
    """The `members` entry for a shard just written, or None if its tar is not packed as the reader expects.

    Recorded only if the table it implies equals tarfile's own scan of the file and the reader's header check
    (`tario.check_members`) accepts it, so readers never meet a table they reject.
    """
    import tarfile

    entry = {"first_key": first_key, "stride": packed_stride(manifest, itemsize)}
    table = member_table(manifest, {**info, "members": entry}, ext, itemsize)
    with open(path, "rb") as f:
        scanned = [(m.name, m.offset_data, m.size) for m in tarfile.open(fileobj=f, mode="r:")]
        data = tario.map_whole(f)
    if data is None or table != scanned or tario.check_members(data, table) is not None:
        return None
    return entry


class Verifier:
    """What one reader learns about its local shard files, per file identity (a replaced file is checked
    afresh): checksums (verified once before first use, from the mapped bytes the reader then uses: one pass
    over them), member tables checked against the headers, `tar_index` (each fully scanned shard's member
    table, tario.py, so later epochs skip header parsing) and `mapped` (the shards' mappings, kept within
    bounds so later epochs do not fault pages in again)."""

    def __init__(self, keep_mapped_bytes: int = _KEEP_MAPPED_BYTES, keep_mapped_shards: int = _KEEP_MAPPED_SHARDS):
        self.tar_index: dict = {}
        self._done: dict[tuple, bool] = {}
        self._tables: dict[tuple, list | None] = {}
        self._maps: dict[tuple, memoryview] = {}  # file identity -> its mapping, kept for later epochs
        self._mapped = 0  # bytes in _maps
        self._keep = (keep_mapped_bytes, keep_mapped_shards)
        self.bytes_hashed = 0  # bytes read to verify checksums (each file once)

    def __getstate__(self) -> dict:  # a process of its own (DataLoader worker) maps the files again
        return {**self.__dict__, "_maps": {}, "_mapped": 0}

    def mapped(self, f) -> memoryview | None:
        """`f` mapped whole (`tario.map_whole`), reusing this reader's mapping of the same file identity: a
        rewritten file (new inode, size or mtime) is mapped afresh."""
        key = tario.file_identity(f)
        data = self._maps.get(key)
        if data is None:
            data = tario.map_whole(f)
            if data is not None and self._mapped + len(data) <= self._keep[0] and len(self._maps) < self._keep[1]:
                self._maps[key] = data
                self._mapped += len(data)
        return data

    def ok(self, f, algorithm: str, expected: str, data=None) -> bool:
        """Whether the open file `f` (its bytes as mapped, if given: no second read) hashes to `expected`."""
        key = tario.file_identity(f)
        if key not in self._done:
            got = digest(algorithm, data) if data is not None else file_digests(f.name, (algorithm,))[algorithm]
            self.bytes_hashed += os.fstat(f.fileno()).st_size
            self._done[key] = got == expected
        return self._done[key]

    def table(self, f, url: str, data: memoryview, manifest: dict, info: dict, ext: str, itemsize: int,
              verified: bool) -> list[tuple] | None:
        """The member table of the open shard `f` from the manifest, checked once against its headers
        (`tario.check_members`: it is then exactly what tarfile would read from these bytes), or None: no
        table in the manifest, or (unverified bytes) one the headers contradict, so tarfile reads them and
        reports what is wrong as before. With the checksum `verified`, the bytes are those the table was
        checked on when written: a contradiction means a wrong manifest, a DataError naming the shard."""
        key = tario.file_identity(f)
        if key not in self._tables:
            table = member_table(manifest, info, ext, itemsize)
            problem = tario.check_members(data, table) if table is not None else None
            if problem is not None and verified:
                raise DataError(f"{url}: members entry of manifest.json does not match the tar ({problem})")
            self._tables[key] = None if table is None or problem else [(*entry, None) for entry in table]
        return self._tables[key]
