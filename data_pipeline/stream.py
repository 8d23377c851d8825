"""Streaming token blocks out of shards, and the ordered Transformer-XL stream reader.

Shard I/O shared by `ShardReader` (reader.py) and `StreamReader` (below):
* a source is a manifest plus one URL per manifest shard: a directory (shards next to the manifest), or a
  manifest file/URL with `shards=` as a brace pattern (`shard-{000000..000127}.tar`) or a URL list that
  webdataset opens (`pipe:cat ...`, http via curl, plain paths);
* `read_shard` reads one shard with webdataset's tar iterators and checks every block against the manifest.
  Local shards: size checked at open, checksum (xxh3_128; sha256 for older manifests) before first use, member
  table (integrity.py) checked against the headers. Other URLs: the checksum is computed while streaming and
  compared at the end of the shard (rows of earlier blocks have been handed out by then; each block's token
  count is still checked as it arrives).

`StreamReader`: the Transformer-XL `LMOrderedIterator` layout. The corpus's rows are cut from one token stream
without overlap (shards.py), so the stream is all rows concatenated in manifest order. It is split into
`batch_size` contiguous lanes of L = tokens // batch_size; segment k of lane b is tokens
[b*L + k*tgt_len, b*L + (k+1)*tgt_len + 1): inputs [:, :-1], targets [:, 1:], and row b of segment k+1
continues row b of segment k. Each DP rank reads only its lanes, each through its own cursor that starts at the
lane's offset (earlier shards are not opened), so memory is a block per lane, whatever the corpus size.
"""

from __future__ import annotations

import dataclasses
import json
import os
import pathlib
import urllib.parse
from typing import Any, Iterator

import numpy as np
import webdataset as wds
from webdataset import tariterators
from webdataset.gopen import gopen, set_options

from data_pipeline import tario
from data_pipeline.errors import DataError
from data_pipeline.integrity import HASHERS, Verifier, manifest_checksum
from data_pipeline.shards import DTYPES, FORMAT_VERSION, MANIFEST_NAME

# tarfile's stream mode (what webdataset reads with) asks for 10 KiB at a time and buffers any excess; handing
# it 64 KiB per call makes the whole reader ~1.3x faster on 262 KB members (measured, bench/data.py shards).
_READ_CHUNK = 1 << 16


def is_local(url: str) -> bool:
    """True for plain paths and file: URLs (size and checksum are checked up front), False for pipe:, http, ..."""
    return urllib.parse.urlparse(url).scheme in ("", "file")


def local_path(url: str) -> pathlib.Path:
    """The filesystem path of a local shard URL."""
    return pathlib.Path(url[len("file://"):] if url.startswith("file://") else url.removeprefix("file:"))


def load_manifest(location: str | os.PathLike) -> dict:
    """Read and validate a manifest: a shard directory, a manifest file, or a URL webdataset can open."""
    return _read_manifest(location)[0]


def _read_manifest(location: str | os.PathLike) -> tuple[dict, str]:
    """(validated manifest, where it was read from) for `load_manifest`."""
    loc = str(location)
    try:
        if is_local(loc):
            path = local_path(loc)
            loc = str(path / MANIFEST_NAME if path.is_dir() else path)
            text = pathlib.Path(loc).read_text(encoding="utf-8")
        else:
            with gopen(loc) as f:
                text = f.read().decode("utf-8")
        manifest = json.loads(text)
    except FileNotFoundError:
        raise DataError(f"{loc}: manifest not found (run `pretrain data prepare` to create shards)") from None
    except (OSError, ValueError) as exc:
        raise DataError(f"{loc}: unreadable manifest ({exc})") from None
    required = ("format_version", "seq_length", "dtype", "sequences_per_sample", "tokenizer_sha256", "shards")
    missing = [k for k in required if k not in manifest]
    if missing:
        raise DataError(f"{loc}: manifest lacks {', '.join(missing)}")
    if manifest["format_version"] != FORMAT_VERSION:
        raise DataError(f"{loc}: format_version {manifest['format_version']}, this reader reads {FORMAT_VERSION}")
    if manifest["dtype"] not in DTYPES:
        raise DataError(f"{loc}: unknown dtype {manifest['dtype']!r}")
    if not manifest["shards"]:
        raise DataError(f"{loc}: manifest lists no shards")
    spp = manifest["sequences_per_sample"]
    for info in manifest["shards"]:
        if not (info["blocks"] - 1) * spp < info["sequences"] <= info["blocks"] * spp:
            raise DataError(f"{loc}: manifest counts {info['sequences']} sequences in {info['blocks']} blocks "
                            f"for {info['name']}")
    return manifest, loc


@dataclasses.dataclass
class Source:
    """One shard source: its manifest, one URL per manifest shard (manifest order), and its blend weight."""
    name: str  # where the manifest came from, for messages
    manifest: dict
    urls: list[str]
    weight: float

    @property
    def row(self) -> int:
        """Tokens per row: seq_length + 1 (inputs and shifted targets)."""
        return int(self.manifest["seq_length"]) + 1


def resolve_source(spec: Any) -> Source:
    """`DIR` | `{path: DIR}` | `{manifest: FILE_OR_URL, shards: PATTERN_OR_URLS}`, each with optional weight."""
    spec = {"path": spec} if isinstance(spec, (str, os.PathLike)) else dict(spec)
    unknown = set(spec) - {"path", "manifest", "shards", "weight"}
    if unknown or ("path" in spec) == ("manifest" in spec):
        raise ValueError(f"data source {spec}: give exactly one of path / manifest (plus shards, weight)")
    weight = float(spec.get("weight", 1.0))
    if not weight > 0:
        raise ValueError(f"data source {spec}: weight must be > 0")
    manifest, loc = _read_manifest(spec.get("path") or spec["manifest"])
    names = [s["name"] for s in manifest["shards"]]
    if "shards" in spec:
        shards = spec["shards"]
        urls = wds.shardlists.expand_urls(shards) if isinstance(shards, str) else [str(u) for u in shards]
        if len(urls) != len(names):
            raise DataError(f"{loc}: lists {len(names)} shards, shards= gives {len(urls)} ({str(shards)[:80]})")
        for name, url in zip(names, urls):
            if name not in url:  # catches a pattern in the wrong order or pointing at other data
                raise DataError(f"{url}: does not name manifest shard {name} (shards must follow {loc}'s order)")
    elif is_local(loc):
        urls = [str(pathlib.Path(loc).parent / name) for name in names]
    else:
        raise DataError(f"{loc}: a manifest given by URL needs shards= (a brace pattern or URL list)")
    return Source(loc, manifest, urls, weight)


def local_shard_problems(src: Source) -> list[tuple[int, DataError]]:
    """Cheap up-front checks of local shard files (present, manifest size); URLs are checked while read."""
    problems = []
    for shard, url in enumerate(src.urls):
        if not is_local(url):
            continue
        path, info = local_path(url), src.manifest["shards"][shard]
        if not path.is_file():
            problems.append((shard, DataError(f"{url}: shard listed in {MANIFEST_NAME} is missing")))
        elif "bytes" in info and path.stat().st_size != info["bytes"]:
            problems.append((shard, DataError(f"{url}: {path.stat().st_size} bytes, {MANIFEST_NAME} says "
                                              f"{info['bytes']} (truncated or replaced)")))
    return problems


class _ChunkedReader:
    """File wrapper for tarfile's stream reader: hands it >= 64 KiB per read and hashes what passes through."""

    def __init__(self, f, hasher):
        self.f, self.hasher = f, hasher

    def read(self, n: int = -1) -> bytes:
        """At least min(n, what is left) bytes: more than asked, which tarfile's stream reader buffers."""
        data = self.f.read(max(n, _READ_CHUNK) if n is not None and n >= 0 else -1)
        if self.hasher is not None:
            self.hasher.update(data)
        return data

    def drain(self) -> None:
        """Read to EOF: tarfile stops before the archive's padding, which the checksum covers too."""
        while self.read(_READ_CHUNK):
            pass


def read_shard(src: Source, shard: int, start_block: int = 0, verify: bool = True,
               verifier: Verifier | None = None) -> Iterator[tuple[int, np.ndarray]]:
    """Yield (block, rows [n, seq_length + 1]) for blocks >= start_block of one shard, checking as it goes.

    Local shards: checksum (xxh3_128, or sha256 in older manifests; integrity.py) checked before the first row,
    once per `verifier` and file, then read with `tarfile` random access (tario.py): members before start_block
    are not read; the manifest's member table, checked against the headers (integrity.py), replaces tarfile's
    header parsing. Other URLs (and compressed local tars) stream through webdataset; their checksum is
    computed while streaming and checked at the end of the shard (after its last block), and earlier blocks
    are read, not decoded.
    """
    info, url, m = src.manifest["shards"][shard], src.urls[shard], src.manifest
    local = is_local(url)
    verifier = verifier or Verifier()
    np_dtype, ext = DTYPES[m["dtype"]]
    spp, row = m["sequences_per_sample"], src.row
    checksum = manifest_checksum(info) if verify else None  # (algorithm, hex digest) or None
    hasher = HASHERS[checksum[0]]() if checksum and not local else None
    try:
        stream = open(local_path(url), "rb") if local else gopen(url)
    except Exception as exc:
        raise DataError(f"{url}: cannot open shard ({type(exc).__name__}: {exc})") from None
    wrapped, complete = _ChunkedReader(stream, hasher), False
    try:
        data = verifier.mapped(stream) if local else None  # page-cache views, hashed in place
        members = None
        if checksum and local and not verifier.ok(stream, *checksum, data):
            raise DataError(f"{url}: {checksum[0]} does not match {MANIFEST_NAME} (corrupt or replaced shard)")
        if data is not None:  # the manifest's member table, checked against the headers, replaces parsing them
            members = verifier.table(stream, url, data, m, info, ext, np.dtype(np_dtype).itemsize, bool(checksum))
        if local and tario.seekable_plain_tar(stream):
            samples = tario.iter_samples(stream, start_block, verifier.tar_index, data, members)
        else:
            samples = tariterators.group_by_keys(tariterators.tar_file_expander([{"url": url, "stream": wrapped}]))
        pos = 0
        for sample in samples:
            if pos >= info["blocks"]:
                raise DataError(f"{url}: more tar members than the {info['blocks']} blocks in {MANIFEST_NAME}")
            if pos >= start_block:
                if ext not in sample:
                    raise DataError(f"{url}: member {sample.get('__key__')} has no {ext} entry")
                rows = min(spp, info["sequences"] - pos * spp)
                arr = np.frombuffer(sample[ext], dtype=np_dtype)
                if arr.size != rows * row:
                    raise DataError(f"{url}: block {pos} holds {arr.size} tokens, expected {rows}x{row}")
                yield pos, arr.reshape(rows, row)  # [rows, seq_length + 1]
            pos += 1
        if pos != info["blocks"]:
            raise DataError(f"{url}: truncated shard, {pos} of {info['blocks']} blocks readable")
        if hasher is not None:
            wrapped.drain()
            if hasher.hexdigest() != checksum[1]:
                raise DataError(f"{url}: {checksum[0]} does not match {MANIFEST_NAME} (corrupt or replaced shard)")
        complete = True
    except (DataError, GeneratorExit):
        raise
    except Exception as exc:  # tarfile.ReadError, EOFError, a pipe's exit status, ... as raised via webdataset
        detail = str(exc.args[0]) if exc.args else type(exc).__name__
        raise DataError(f"{url}: truncated or corrupt tar ({type(exc).__name__}: {detail})") from None
    finally:
        if not local:
            set_options(stream, ignore_errors=not complete)  # an abandoned pipe dies of SIGPIPE: fine
        try:
            stream.close()
        except Exception as exc:
            if complete:  # the whole shard was read, yet the command failed (e.g. `pipe:` exit status != 0)
                raise DataError(f"{url}: {exc}") from None


class _Lane:
    """A cursor over the token stream from one offset: reads blocks in manifest order, a small buffer ahead."""

    def __init__(self, reader: "StreamReader", offset: int):
        self.reader, self.buf = reader, np.zeros(0, dtype=DTYPES[reader.manifest["dtype"]][0])
        self._blocks = self._tokens_from(offset)

    def _tokens_from(self, offset: int) -> Iterator[np.ndarray]:
        r = self.reader
        shard = int(np.searchsorted(r.shard_starts, offset, side="right")) - 1
        within = offset - int(r.shard_starts[shard])
        block, skip = divmod(within, r.block_tokens)
        for s in range(shard, len(r.src.urls)):
            for _, rows in read_shard(r.src, s, block, r.verify, r.verifier):
                r.blocks_bytes += rows.nbytes + 512  # the block and its tar header
                yield rows.reshape(-1)[skip:]  # [tokens], consecutive stream tokens
                skip = 0
            block = 0

    def peek(self, n: int) -> np.ndarray:
        """The next n tokens (not consumed)."""
        while len(self.buf) < n:
            self.buf = np.concatenate([self.buf, next(self._blocks)])
        return self.buf[:n]

    def advance(self, n: int) -> None:
        """Consume n tokens."""
        self.buf = self.buf[n:]

    def close(self) -> None:
        """Close the shard being read."""
        self._blocks.close()


class StreamReader:
    """Ordered contiguous segments int64 [batch_size // dp_size, tgt_len + 1] for this DP rank's lanes.

    `reset_lanes` is True when the segment just yielded starts the lanes afresh (first segment of an epoch):
    the model must clear its memory then. State = (epoch, lane offset), exact after a restart and under a
    different dp_size (the lanes are global). `loop=False` (evaluation): every `iter()` is one pass from the
    current position (the beginning, unless a state was loaded); the reference's last partial segment is dropped.
    """

    def __init__(self, source, *, batch_size: int, tgt_len: int, dp_rank: int = 0, dp_size: int = 1,
                 expected_tokenizer_sha256: str | None = None, verify_checksums: bool = True, loop: bool = True):
        """Resolve the source and check its manifest and local shard files; nothing is read yet."""
        if tgt_len <= 0 or not 0 <= dp_rank < dp_size or batch_size <= 0 or batch_size % dp_size:
            raise ValueError(f"StreamReader: need tgt_len > 0, 0 <= dp_rank < dp_size, batch_size a positive "
                             f"multiple of dp_size; got {tgt_len}, {dp_rank}, {dp_size}, {batch_size}")
        self.src = resolve_source(source)
        self.manifest = m = self.src.manifest
        sha = m["tokenizer_sha256"]
        if expected_tokenizer_sha256 is not None and sha != expected_tokenizer_sha256:
            raise DataError(f"{self.src.name}: shards were tokenized with tokenizer sha256 {sha[:16]}…, expected "
                            f"{expected_tokenizer_sha256[:16]}… (wrong tokenizer or data dir)")
        for _, exc in local_shard_problems(self.src)[:1]:
            raise exc
        self.batch_size, self.tgt_len, self.dp_rank, self.dp_size = batch_size, tgt_len, dp_rank, dp_size
        self.verify, self.loop, self.verifier = verify_checksums, loop, Verifier()
        self.blocks_bytes = 0  # bytes of the blocks read (and their headers); the checksums' in verifier
        row = self.src.row
        self.block_tokens = m["sequences_per_sample"] * row
        # Stream offset of each shard's first token, in manifest order: offset -> (shard, block) by bisection.
        self.shard_starts = np.concatenate([[0], np.cumsum([s["sequences"] * row for s in m["shards"]])])
        self.lane_len = int(self.shard_starts[-1]) // batch_size  # L: the tail beyond batch_size * L is unused
        self.segments_per_epoch = (self.lane_len - 1) // tgt_len  # full segments only: fixed shapes
        if self.segments_per_epoch == 0:
            raise DataError(f"{self.src.name}: {int(self.shard_starts[-1])} tokens make no segment of "
                            f"{tgt_len}+1 tokens in {batch_size} lanes")
        self.epoch, self.offset = 0, 0  # offset: tokens of each lane consumed in this epoch
        self.reset_lanes = False

    @property
    def bytes_read(self) -> int:
        """Bytes read from shard files by this rank's lanes (each lane reads its own stretch of the stream):
        blocks with their headers, plus each shard hashed once for its checksum."""
        return self.blocks_bytes + self.verifier.bytes_hashed

    def state_dict(self) -> dict:
        """Position of the next segment (JSON-serialisable)."""
        return {"version": 1, "epoch": self.epoch, "offset": self.offset, "batch_size": self.batch_size,
                "tgt_len": self.tgt_len}

    def load_state_dict(self, state: dict) -> None:
        """Continue at `state`: exact for any dp_size. Lanes depend on batch_size, which must match; the
        position is in tokens, so a different tgt_len continues at the same place of every lane."""
        if state.get("version") != 1 or state["batch_size"] != self.batch_size:
            raise DataError(f"{self.src.name}: stream state {state} does not fit batch_size {self.batch_size} "
                            f"(lanes are cut per global batch size)")
        if not 0 <= state["offset"] < self.lane_len:
            raise DataError(f"{self.src.name}: stream offset {state['offset']} outside lane length {self.lane_len}")
        self.epoch, self.offset = int(state["epoch"]), int(state["offset"])

    def __iter__(self) -> Iterator[np.ndarray]:
        """Yield segments from the current position; with loop, forever (lanes restart each epoch)."""
        per_rank = self.batch_size // self.dp_size
        lane_ids = range(self.dp_rank * per_rank, (self.dp_rank + 1) * per_rank)  # this rank's lanes
        lanes = None
        try:
            while True:
                if self.offset + self.tgt_len + 1 > self.lane_len:  # no full segment left: next epoch
                    for lane in lanes or []:
                        lane.close()
                    self.epoch, self.offset, lanes = self.epoch + 1, 0, None
                    if not self.loop:
                        return
                if lanes is None:
                    lanes = [_Lane(self, b * self.lane_len + self.offset) for b in lane_ids]
                out = np.empty((per_rank, self.tgt_len + 1), dtype=np.int64)  # [b/dp, tgt_len + 1]
                for j, lane in enumerate(lanes):
                    out[j] = lane.peek(self.tgt_len + 1)
                    lane.advance(self.tgt_len)  # the last token is the next segment's first input
                self.reset_lanes = self.offset == 0
                self.offset += self.tgt_len
                yield out
        finally:
            for lane in lanes or []:
                lane.close()
            if not self.loop:  # a pass that ended or was abandoned: the next iter() starts from the beginning
                self.epoch, self.offset = 0, 0
