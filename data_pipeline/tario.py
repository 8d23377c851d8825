"""Samples of a local, uncompressed tar shard, read with `tarfile`'s random-access mode; and `ReadAhead`,
the bounded background thread that reads shards while the consumer converts and hands out rows.

webdataset reads a tar as a stream (`tarfile.open(mode="r|*")` under `tar_file_expander`/`group_by_keys`),
which is what pipes and http need, but for a file on disk it costs ~2.5x a plain random-access read of the same
members (bench/data.py): stream mode copies every member through tarfile's 10 KiB-step buffer, and the two
generator layers add per-member Python work. Here `tarfile` (mode "r:") parses the headers and gives each
member's data offset; each member is then a view of the memory-mapped file (`map_whole`), and the members of
samples the caller does not want (before a resume point) are not touched at all. No tar format is parsed by hand.

The samples are webdataset's: the same members are kept (regular files, not `__...__` metadata), grouped into
samples by consecutive key with webdataset's own `base_plus_ext`, lower-cased suffixes, and a duplicate suffix
within a sample is an error, so `stream.read_shard` checks and yields the same blocks on both paths (tested).
"""

from __future__ import annotations

import mmap
import os
import queue
import re
import tarfile
import threading
from typing import BinaryIO, Iterator

import numpy as np
from webdataset.tariterators import base_plus_ext

# Compressed tars stay on webdataset's stream path (random access into a compressed stream re-decompresses).
_COMPRESSED_MAGIC = (b"\x1f\x8b", b"BZh", b"\xfd7zXZ")
_SKIP_META = re.compile(r"__[^/]*__($|/)")  # webdataset's tar_file_iterator default skip_meta
_INDEX_SHARDS = 100_000  # member tables kept per index: a bound on memory (~100 bytes per member)


def seekable_plain_tar(f: BinaryIO) -> bool:
    """True if `f` (at offset 0, seekable) does not start like a gzip/bzip2/xz stream; leaves it at offset 0."""
    head = f.read(6)
    f.seek(0)
    return not head.startswith(_COMPRESSED_MAGIC)


def map_whole(f: BinaryIO) -> memoryview | None:
    """The whole file `f` memory-mapped read-only (None for an empty file): members become views of the page
    cache, with no read() copy and no buffer to allocate, as Megatron-LM's mmap'd indexed datasets do.

    Measured on bench/data.py shards: a read() into a buffer cost as much as raw tarfile's whole epoch, and fresh
    buffers another ~40% (page faults), since rows stay alive in the shuffle window after their shard is done.
    The mapping lives as long as an array still views it. A shard truncated while mapped would fault (SIGBUS):
    shards are immutable inputs, their size is checked against the manifest at open and checksum before use.
    """
    if os.fstat(f.fileno()).st_size == 0:
        return None
    mapped = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ)
    if hasattr(mmap, "MADV_HUGEPAGE"):  # Linux
        # Pages of a shard that is not yet in the page cache are then read into 2 MiB folios and mapped 2 MiB
        # per fault, here and in every later mapping of it (other ranks, later epochs, later runs); without, a
        # fault maps 64 KiB. Measured (4 shards, 64 MB, read cold): 40 faults instead of 1,039, and later
        # mappings plus xxh3 in 2.9 ms instead of 9.3 ms. Pages already cached in small folios (e.g. shards
        # just written on this machine) stay as they are. MAP_POPULATE, MADV_POPULATE_READ, MADV_WILLNEED and
        # MADV_SEQUENTIAL were measured too: the same 64 KiB faults at the same cost.
        try:
            mapped.madvise(mmap.MADV_HUGEPAGE)
        except OSError:  # a kernel without transparent huge pages: the mapping works as it is
            pass
    return memoryview(mapped)


def file_identity(f: BinaryIO) -> tuple:
    """(device, inode, size, mtime) of an open file: a rewritten or replaced file gets a new identity."""
    st = os.fstat(f.fileno())
    return st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns


def check_members(data: memoryview, table: list[tuple[str, int, int]]) -> str | None:
    """None if tarfile would read exactly `table` ((name, data offset, size) per member) from the tar bytes
    `data`, for tars as `tarfile` writes them (ustar headers, no PAX/GNU extension records); else what differs.

    For a table known from elsewhere (the manifest), so a reader need not parse the headers (~15 µs each in
    tarfile) yet never trusts a wrong table: the members must sit back to back from offset 0, each header must
    be a regular-file header with the table's name (and no ustar prefix), the table's size in tarfile's octal
    form and a valid header checksum, and the archive must end with a zero block after the last member. All
    members of a shard are checked at once with numpy (~0.1 ms for 64 members; tarfile parses them in ~1.2 ms).
    """
    n = len(table)
    if n == 0:
        return "empty member table"
    buf = np.frombuffer(data, dtype=np.uint8)
    offsets = np.array([offset for _, offset, _ in table], dtype=np.int64)
    sizes = np.array([size for _, _, size in table], dtype=np.int64)
    ends = offsets + -(-sizes // tarfile.BLOCKSIZE) * tarfile.BLOCKSIZE  # each member's padded data end
    starts = offsets - tarfile.BLOCKSIZE  # header offsets
    if starts[0] != 0 or not np.array_equal(starts[1:], ends[:-1]):
        return "members are not back to back from offset 0"
    if ends[-1] + tarfile.BLOCKSIZE > len(buf) or buf[ends[-1]: ends[-1] + tarfile.BLOCKSIZE].any():
        return f"no end-of-archive block at byte {ends[-1]}"
    headers = buf[starts[:, None] + np.arange(tarfile.BLOCKSIZE)]  # [n, 512] copies of the header blocks
    names = [name.encode("utf-8") for name, _, _ in table]
    if max(map(len, names)) > 100:  # tarfile would have written an extension record for it
        return "a member name is longer than a ustar header holds"
    # tarfile's writer: size as 11 octal digits + NUL, checksum as 6 octal digits + NUL + space, where the
    # checksum is the sum of the header's bytes with its own 8-byte field counted as spaces.
    checksums = headers[:, :148].sum(axis=1, dtype=np.int64) + headers[:, 156:].sum(axis=1, dtype=np.int64) + 256
    expected = {
        (0, 100): np.array(names, dtype="S100"),  # name, NUL-padded
        (124, 136): np.array([b"%011o\0" % size for size in sizes.tolist()], dtype="S12"),
        (148, 156): np.array([b"%06o\0 " % c for c in checksums.tolist()], dtype="S8"),
        (156, 157): np.array([tarfile.REGTYPE] * n, dtype="S1"),
        (345, 500): np.zeros(n, dtype="S155"),  # ustar prefix: empty, so the name is the whole path
    }
    for (lo, hi), want in expected.items():
        bad = np.flatnonzero((headers[:, lo:hi] != want.view(np.uint8).reshape(n, hi - lo)).any(axis=1))
        if len(bad):
            i = int(bad[0])
            return f"member {i} ({table[i][0]}) header bytes {lo}..{hi} differ from the table"
    return None


def iter_samples(f: BinaryIO, read_from: int = 0, index: dict | None = None,
                 data: memoryview | None = None, members: list | None = None) -> Iterator[dict]:
    """Yield webdataset-style samples `{"__key__": key, suffix: bytes, ...}` of the tar in `f`, in order.

    Samples before index `read_from` come with `None` instead of their bytes (not read: a resume skips them).
    A truncated archive raises `tarfile.ReadError` or `EOFError` where the stream path would; a corrupt header
    after the first reads as the archive's end, as it does in tarfile's stream mode. `index` (a dict owned by
    the caller, e.g. one per reader): member tables of files fully scanned before, keyed by file identity, so
    later epochs skip tarfile's header parsing (~40% of reading a shard of 262 KB members). `data`: the file's
    bytes already mapped (`map_whole`): members are then views of it, not read again. `members`: the member
    table, known from elsewhere and checked against these bytes (`check_members`): no header is parsed.
    """
    table: list | None = None
    if members is None and index is not None:
        key = file_identity(f)
        members = index.get(key)
    if members is None:
        table = [] if index is not None else None
        members = _scan(f, table)
    index_no, sample = -1, None
    for name, offset, size, read in members:
        prefix, suffix = base_plus_ext(name)
        if prefix is None:
            continue
        suffix = suffix.lower()
        if sample is None or prefix != sample["__key__"]:
            if sample is not None:
                yield sample
            index_no, sample = index_no + 1, {"__key__": prefix}
        if suffix in sample:
            raise ValueError(f"{name}: duplicate file name in tar file {suffix} {list(sample)}")
        if index_no >= read_from:
            if read is not None:
                member = read()
            elif data is not None:
                member = data[offset: offset + size]
            else:
                f.seek(offset)
                member = f.read(size)  # one read per member: no stream buffering in between
            if len(member) != size:
                raise EOFError(f"unexpected end of data in member {name}")
        else:
            member = None
        sample[suffix] = member
    if sample is not None:
        yield sample
    if table is not None and None not in table and len(index) < _INDEX_SHARDS:  # scanned to the end: keep
        index[key] = table


def _scan(f: BinaryIO, table: list | None) -> Iterator[tuple]:
    """(name, data offset, size, None) of the members webdataset keeps, parsed lazily by tarfile; appended to
    `table` as they come, unless a member needs tarfile to read it (GNU sparse: then read is its reader)."""
    tar = tarfile.open(fileobj=f, mode="r:")  # parses the first header now; the rest lazily, as iterated
    for member in tar:
        name = member.name
        # tarfile keeps every TarInfo it has seen (for getmembers); nothing here needs them, and a shard can
        # hold many members, so drop them as stream mode does (webdataset sets `stream.members = []` too).
        tar.members = []
        if not member.isreg() or ("/" not in name and name.startswith("__") and name.endswith("__")) \
                or _SKIP_META.match(name):
            continue
        if member.sparse is not None:  # GNU sparse (never written by ShardWriter): let tarfile assemble it
            if table is not None:
                table.append(None)  # marks the table unusable: such a file is scanned every time
            yield name, 0, 0, lambda m=member: tar.extractfile(m).read()
            continue
        entry = (name, member.offset_data, member.size, None)
        if table is not None:
            table.append(entry)
        yield entry


_ITEM, _END, _ERROR = range(3)


class ReadAhead:
    """Iterate `items` in one daemon thread, at most `depth` items ahead of the consumer.

    File reads, sha256 and numpy copies release the GIL, so on two cores the thread's reading overlaps the
    consumer's work. An exception in the thread is re-raised by `next()` (the same object: a DataError keeps
    its one-line message), after the items produced before it. `close()` (also on garbage collection) stops
    the thread and closes `items`; it never lingers past the consumer.
    """

    def __init__(self, items: Iterator, depth: int = 2, name: str = "shard-read-ahead"):
        self._queue: queue.Queue = queue.Queue(depth)
        self._stop = threading.Event()
        self._pid, self._done = os.getpid(), False
        # The thread holds the iterator, queue and event but not `self`: an abandoned ReadAhead is garbage at
        # once, and its __del__ stops the thread.
        self._thread = threading.Thread(target=_pump, args=(items, self._queue, self._stop), name=name,
                                        daemon=True)
        self._thread.start()

    def __iter__(self) -> "ReadAhead":
        return self

    def __next__(self):
        if self._done:
            raise StopIteration
        kind, value = self._queue.get()
        if kind == _ITEM:
            return value
        self._done = True
        if kind == _ERROR:
            raise value
        raise StopIteration

    def close(self, wait: float = 10.0) -> None:
        """Stop the thread (waiting up to `wait` s for the item it is producing); idempotent."""
        self._done = True
        if self._pid != os.getpid():  # a forked copy: the thread (and maybe the queue's lock) are the parent's
            return
        self._stop.set()
        while True:  # unblock a put() waiting for room; the thread then sees the stop event
            try:
                self._queue.get_nowait()
            except queue.Empty:
                break
        if wait and self._thread is not threading.current_thread():
            self._thread.join(wait)

    def __del__(self) -> None:
        # No join here: garbage collection may run in any thread, the read-ahead thread included.
        self.close(wait=0)


def _pump(items: Iterator, q: queue.Queue, stop: threading.Event) -> None:
    """The read-ahead thread: items, then the end or the exception, into `q` until `stop` is set."""
    try:
        for item in items:
            if not _put(q, stop, (_ITEM, item)):
                return
        _put(q, stop, (_END, None))
    except BaseException as exc:  # noqa: BLE001 - handed to the consumer, which re-raises it
        _put(q, stop, (_ERROR, exc))
    finally:
        close = getattr(items, "close", None)
        if close is not None:
            close()  # a generator's finally blocks (open shard files) run now, in this thread


def _put(q: queue.Queue, stop: threading.Event, entry: tuple) -> bool:
    while not stop.is_set():
        try:
            q.put(entry, timeout=0.1)
            return True
        except queue.Full:
            continue
    return False
