"""Tokenize a corpus into fixed-length sequences and write them as reproducible WebDataset tar shards.

Layout on disk (`output_dir/`):

    shard-000000.tar ...   tar members `<block>.tokens.u16` (or `.tokens.i32`): one block of up to
                           `sequences_per_sample` rows of `seq_length + 1` little-endian token ids
    shard-000000.rowsums   per row, in row order, the xxh3_128 digest (16 bytes) of its token bytes: lets a
                           reader that reads only some rows (integrity.py, rows.py) verify exactly those
    manifest.json          format, seq_length, dtype, tokenizer identity, per shard: counts, bytes, sha256,
                           xxh3_128 and the member table (integrity.py); written last, so its presence means
                           the shards are complete

Why blocks of many sequences per tar member: reading costs ~100 µs per member, so one sequence per member caps
a reader at ~10k sequences/s/core, while 64-100 per member reads as fast as a memory map (STACK_NOTES.md).

Tokenization runs in worker processes (sentencepiece encodes ~1M tokens per CPU-second, the bottleneck); this
process reads documents, hands them out in chunks, and writes the encoded chunks strictly in input order, so the
bytes do not depend on the number of workers.
"""

from __future__ import annotations

import collections
import contextlib
import itertools
import json
import logging
import multiprocessing
import os
import pathlib
import time
from typing import Any, Iterable, Iterator

import numpy as np
import webdataset as wds
from tqdm import tqdm

from data_pipeline.corpus import expand_inputs, read_documents
from data_pipeline.errors import DataError
from data_pipeline.integrity import FAST_CHECKSUM, ROW_DIGESTS_SUFFIX, file_digests, packed_members_entry, row_digests
from data_pipeline.tokenizer import Tokenizer, encode_documents, init_encode_worker

logger = logging.getLogger(__name__)

FORMAT_VERSION = 1
MANIFEST_NAME = "manifest.json"
# dtype name in the manifest -> (numpy little-endian dtype, tar member extension)
DTYPES = {"uint16": ("<u2", "tokens.u16"), "int32": ("<i4", "tokens.i32")}
# Tar member key of a block: its global index in the dataset (unique across shards, no '.' for webdataset).
BLOCK_KEY = "{:010d}"
# Documents per worker task: up to CHUNK_DOCS documents or CHUNK_CHARS characters (whichever comes first), so a
# task is ~0.1-0.3 s of encoding whether documents are tweets or books. Output does not depend on these.
CHUNK_DOCS = 256
CHUNK_CHARS = 1 << 20
# Chunks in flight per worker: enough to keep workers busy while this process writes, few enough to bound memory
# (workers x 2 x 1 MiB of text).
INFLIGHT_PER_WORKER = 2


def default_workers() -> int:
    """min(4, CPUs this process may use): tokenizing beyond ~4 workers is limited by the single writer."""
    try:
        cpus = len(os.sched_getaffinity(0))  # respects Slurm/cgroup CPU binding, unlike os.cpu_count()
    except AttributeError:  # macOS
        cpus = os.cpu_count() or 1
    return min(4, cpus)


def _check_positive(**values: int) -> None:
    for name, value in values.items():
        if not isinstance(value, int) or value <= 0:
            raise DataError(f"data prepare: {name} must be a positive integer, got {value!r}")


def prepare_shards(
    inputs: list[str],
    tokenizer_path: str,
    output_dir: str,
    seq_length: int,
    samples_per_shard: int = 2048,
    sequences_per_sample: int = 64,
    text_key: str = "text",
    prefix: str = "shard",
    workers: int | None = None,
    documents: Iterable[str] | None = None,
    token_ids: Iterable[np.ndarray] | None = None,
    tail_path: str | None = None,
) -> dict:
    """Tokenize `inputs` (paths or globs) into WebDataset shards under `output_dir`; return the manifest.

    Each document's ids are followed by the tokenizer's eos id; all documents form one token stream, cut into
    non-overlapping rows of `seq_length + 1` tokens (inputs and shifted targets); the final partial row is
    dropped. `sequences_per_sample` consecutive rows form one tar member (a WebDataset "sample"; the last may
    hold fewer), and `samples_per_shard` members form one shard. The same inputs and tokenizer give
    byte-identical shards and manifest (fixed tar mtime, no PAX headers, no timestamps in the manifest), for
    any number of `workers`.

    `workers` tokenizer processes (default `default_workers()`; 0 or 1 encodes in this process, as does an
    input that fits in one chunk). Workers are spawned, not forked (the caller may hold threads, e.g. torch's),
    so a script calling this with workers > 1 needs the usual `if __name__ == "__main__":` guard.

    For tasks (tasks.py): `documents` replaces reading `inputs` (then only named in messages); `token_ids`
    (arrays of ids, eos included) replaces reading and encoding; `tail_path` keeps the final partial row's ids
    there (np.save) instead of dropping them, so a merge can carry them on.
    """
    _check_positive(seq_length=seq_length, samples_per_shard=samples_per_shard,
                    sequences_per_sample=sequences_per_sample)
    workers = default_workers() if workers is None else workers
    if not isinstance(workers, int) or workers < 0:
        raise DataError(f"data prepare: workers must be an integer >= 0, got {workers!r}")
    if not prefix or "/" in prefix or "." in prefix:
        raise DataError(f"data prepare: prefix must be a plain name without '/' or '.', got {prefix!r}")
    files = expand_inputs(inputs) if documents is None and token_ids is None else [pathlib.Path(i) for i in inputs]
    tok = Tokenizer(tokenizer_path)
    dtype_name = "uint16" if tok.vocab_size <= 65535 else "int32"
    np_dtype, ext = DTYPES[dtype_name]
    row = seq_length + 1

    out = pathlib.Path(output_dir)
    out.mkdir(parents=True, exist_ok=True)
    # Remove the manifest first (it marks completeness), then shards a previous run left behind: a smaller
    # rerun would otherwise leave stale shard files next to a manifest that does not list them.
    (out / MANIFEST_NAME).unlink(missing_ok=True)
    for stale in sorted(out.glob(f"{prefix}-[0-9][0-9][0-9][0-9][0-9][0-9].tar")):
        stale.unlink()
        stale.with_suffix(ROW_DIGESTS_SUFFIX).unlink(missing_ok=True)

    stats: dict[str, list[int]] = {}  # shard file -> [sequences, blocks], in writing order
    digests_of: dict[str, list[bytes]] = {}  # shard file -> its rows' xxh3_128 digests, in row order
    carry = np.zeros(0, dtype=np.int64)  # tokens not yet filling a whole row
    pending: list[np.ndarray] = []  # complete rows not yet filling a whole block
    pending_rows = 0
    num_docs = num_blocks = text_bytes = encoded_tokens = dropped_tokens = 0
    start = time.perf_counter()

    def write_block(rows: np.ndarray) -> None:
        nonlocal num_blocks
        # Global block index as the key: unique across shards, and no '.' (webdataset splits keys at dots).
        rows = rows.astype(np_dtype, copy=False)
        writer.write({"__key__": BLOCK_KEY.format(num_blocks), ext: rows.tobytes()})
        name = os.path.basename(writer.fname)
        digests_of.setdefault(name, []).append(row_digests(rows))
        entry = stats.setdefault(name, [0, 0])
        entry[0] += len(rows)
        entry[1] += 1
        num_blocks += 1

    # mtime=0 (a TarWriter kwarg ShardWriter forwards): fixed member times and no PAX headers, so the bytes are
    # reproducible. verbose=0: tqdm reports progress instead of ShardWriter's per-shard prints. maxsize is left
    # at its 3 GB default as a safety valve; the manifest records whatever split actually happened.
    writer = wds.ShardWriter(str(out / f"{prefix}-%06d.tar"), maxcount=samples_per_shard, verbose=0, mtime=0)
    docs = documents if documents is not None else (doc for path in files
                                                    for doc in read_documents(path, text_key=text_key))
    used_workers = 0
    with contextlib.ExitStack() as stack:
        stack.callback(writer.close)
        chunks = _chunks(docs)
        first = list(itertools.islice(chunks, 2))
        chunks = itertools.chain(first, chunks)
        if token_ids is not None:
            encoded = ((0, 0, np.asarray(ids, dtype=np.int32)) for ids in token_ids)
        elif workers > 1 and len(first) > 1:  # a pool costs ~0.5 s to start: not for inputs of one chunk
            used_workers = workers
            encoded = _encode_in_pool(chunks, tok, workers, stack)
        else:
            encoded = ((len(c), *encode_documents(c, tok)) for c in chunks)
        bar = stack.enter_context(tqdm(desc="data prepare", unit="doc", mininterval=1.0, disable=None))  # TTY only
        for n_docs, n_bytes, ids in encoded:  # ids: int32 [tokens of n_docs documents, each followed by eos]
            num_docs += n_docs
            text_bytes += n_bytes
            encoded_tokens += len(ids)
            stream = np.concatenate([carry, ids.astype(np.int64)])
            n = len(stream) // row
            carry = stream[n * row:]
            if n:
                pending.append(stream[: n * row].reshape(n, row))  # [n, seq_length + 1]
                pending_rows += n
            if pending_rows >= sequences_per_sample:
                rows = np.concatenate(pending)
                full = (len(rows) // sequences_per_sample) * sequences_per_sample
                for i in range(0, full, sequences_per_sample):
                    write_block(rows[i: i + sequences_per_sample])
                pending, pending_rows = [rows[full:]], len(rows) - full
            bar.update(n_docs)
            rate = encoded_tokens / max(time.perf_counter() - start, 1e-9)
            bar.set_postfix_str(f"{rate / 1e6:.2f}M tok/s", refresh=False)
        if pending_rows:
            write_block(np.concatenate(pending))  # the one short block, at the very end
        dropped_tokens = len(carry)
        if tail_path is not None:
            np.save(tail_path, carry.astype(np.int32))
    if num_blocks == 0 and tail_path is not None:  # a task too small for one row: all of it is tail
        for path in out.glob(f"{prefix}-*.tar"):
            path.unlink()
        return {"num_documents": num_docs, "num_sequences": 0, "shards": [], "dropped_tokens": dropped_tokens}
    if num_blocks == 0:
        for path in out.glob(f"{prefix}-*.tar"):  # ShardWriter opens its first shard eagerly
            path.unlink()
        raise DataError(f"data prepare: {len(files)} input file(s) gave {dropped_tokens} tokens, fewer than one "
                        f"sequence of seq_length+1={row}")

    shards = []
    for name, (seqs, blocks) in stats.items():
        # sha256 (provenance) and xxh3_128 (what readers verify, ~15x faster): integrity.py.
        digests = file_digests(out / name, ("sha256", FAST_CHECKSUM))
        rowsums = pathlib.Path(name).with_suffix(ROW_DIGESTS_SUFFIX).name
        (out / rowsums).write_bytes(b"".join(digests_of[name]))
        shards.append({"name": name, "sequences": seqs, "blocks": blocks, **digests,
                       "bytes": (out / name).stat().st_size, "row_digests": rowsums})
    num_sequences = sum(s["sequences"] for s in shards)
    manifest: dict[str, Any] = {
        "format_version": FORMAT_VERSION,
        "seq_length": seq_length,
        "dtype": dtype_name,
        "sequences_per_sample": sequences_per_sample,
        "tokenizer_sha256": tok.sha256,
        "vocab_size": tok.vocab_size,
        "eos_id": tok.eos_id,
        "pad_id": tok.pad_id,
        # Added in place (format_version stays 1: readers of version 1 ignore keys they do not know). The
        # batch builders take their special ids from here, so training needs no tokenizer file.
        "bos_id": tok.bos_id,
        "unk_id": tok.unk_id,
        "cls_id": tok.cls_id,  # None (null) when the tokenizer has no [CLS]; likewise sep/mask
        "sep_id": tok.sep_id,
        "mask_id": tok.mask_id,
        "special_ids": sorted(tok.special_ids),
        "num_documents": num_docs,
        "num_sequences": num_sequences,
        "num_tokens": num_sequences * row,  # tokens stored, each row seq_length + 1
        "dropped_tokens": dropped_tokens,  # the final partial row
        "shards": shards,
    }
    # Member tables (added in place, like xxh3_128: format_version 1 readers ignore them): let readers skip
    # tarfile's header parsing; recorded only where the shard is laid out as integrity.member_table says.
    first_block = 0
    for info in shards:
        entry = packed_members_entry(out / info["name"], manifest, info, BLOCK_KEY.format(first_block), ext,
                                     np.dtype(np_dtype).itemsize)
        if entry is not None:
            info["members"] = entry
        first_block += info["blocks"]
    tmp = out / (MANIFEST_NAME + ".tmp")
    tmp.write_text(json.dumps(manifest, indent=1) + "\n", encoding="utf-8")
    os.replace(tmp, out / MANIFEST_NAME)  # atomic: readers never see a half-written manifest

    elapsed = max(time.perf_counter() - start, 1e-9)
    how = f"{used_workers} workers" if used_workers else "in-process"
    logger.info("data prepare: %d documents, %d tokens, %d sequences of %d tokens, %d shard(s) in %s (%.1fs, "
                "%.1f MB/s of text, %.2fM tokens/s, %s)", num_docs, num_sequences * row, num_sequences, row,
                len(shards), out, elapsed, text_bytes / 1e6 / elapsed, encoded_tokens / 1e6 / elapsed, how)
    return manifest


def _chunks(docs: Iterable[str]) -> Iterator[list[str]]:
    """Group documents into worker tasks of at most CHUNK_DOCS documents / CHUNK_CHARS characters."""
    chunk: list[str] = []
    chars = 0
    for doc in docs:
        chunk.append(doc)
        chars += len(doc)
        if len(chunk) >= CHUNK_DOCS or chars >= CHUNK_CHARS:
            yield chunk
            chunk, chars = [], 0
    if chunk:
        yield chunk


def _encode_in_pool(chunks: Iterable[list[str]], tok: Tokenizer, workers: int,
                    stack: contextlib.ExitStack) -> Iterator[tuple[int, int, np.ndarray]]:
    """Encode chunks in `workers` processes; yield (documents, text bytes, ids) per chunk, in input order.

    Why not `pool.imap(..., chunksize)`: its result queue grows without bound whenever this process writes
    slower than the workers encode, and its feeder thread reads ahead of the writer. Here at most
    `INFLIGHT_PER_WORKER * workers` chunks exist at a time, so memory stays bounded on any corpus size.
    `stack` owns the pool: it is terminated when the caller's `with` exits, also on errors.
    """
    # spawn: forking a parent that holds threads (torch, tqdm's monitor) can deadlock the child.
    ctx = multiprocessing.get_context("spawn")
    pool = stack.enter_context(ctx.Pool(workers, initializer=init_encode_worker, initargs=(tok.model_proto(),)))
    inflight: collections.deque = collections.deque()
    for chunk in chunks:
        inflight.append((len(chunk), pool.apply_async(encode_documents, (chunk,))))
        if len(inflight) >= INFLIGHT_PER_WORKER * workers:
            n, result = inflight.popleft()
            yield n, *result.get()
    while inflight:
        n, result = inflight.popleft()
        yield n, *result.get()
