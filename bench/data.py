"""Benchmark (not a test): ShardReader throughput against a raw `tarfile` read of the same shards.

    python bench/data.py [--repeat 5] [--page-cache reader|read] [--mb 200] [--dir /tmp/pretrain-bench-data]
    python bench/data.py --dp-sweep 1,2,4,8 [--mb 200]
    python bench/data.py --prepare-tasks 1,2 [--mb 50]

--dp-sweep: the data-parallel sweep of issue 21 instead (`dp_sweep`): every rank of each dp size, in this process,
reads two epochs as training does (owned rows) and as before (whole shards on every rank); per rank and pass, rows
handed out per second, and the bytes all ranks read over the rows' bytes (read amplification).
--prepare-tasks: `data prepare` of ~--mb MB of tokens as N concurrent tasks (`--num-tasks N`, one tokenizer
process each) plus `data merge`, per N: seconds and tokens/s (`prepare_tasks`).

Builds (once, cached in --dir) about --mb MB of shards: the bundled corpus repeated, tokenized with a real
sentencepiece BPE tokenizer (32k vocab), seq_length 2048, 64 sequences per tar member. Then drops them from
the page cache and reads them back in one way (`fill_page_cache`: as the reader maps them on a training node,
in 2 MiB folios, or with plain read() calls, in small ones), and reads them all, side by side in one run, with
the page cache warm for every contender:

* BASE: raw tarfile random access as a user would write it (`tarfile.open(path)`, `extractfile(m).read()`,
  np.frombuffer); raw tarfile in stream mode (`r|`, how webdataset reads, which works for pipes and http too);
  and BASE64: BASE + widening to int64, which is what the reader must hand out (4x the bytes of uint16);
* ShardReader (dp_size 1, micro-batch 8, global batch 512; uint16 = dtype="native", what the trainer uses, or
  int64) with 0 and 2 DataLoader workers; with the default verification (xxh3_128 from the manifest) and
  without; on the same shards under older manifests (no member table: tar headers parsed by tarfile; and
  neither table nor xxh3_128: verified with sha256); with a global batch of 8 (one micro-batch per step: the
  per-step overhead at its worst); and "inline": without the read-ahead thread (reading in the calling
  thread). Two consecutive epochs of one reader are timed: the 1st pass (each shard mapped, verified, its
  member table checked against its headers or the headers parsed) and the steady state of a multi-epoch run
  (shards still mapped, member tables known). The shards are mapped and verified by the reader's read-ahead
  thread while the calling thread shuffles rows into windows and hands out micro-batches.

Contenders run round-robin (each round runs every contender once; the best and the median of --repeat rounds
are reported, with the CPU time of the best and the page faults), so load from other processes on a shared
machine falls on all of them alike.

Prints rows/s, tokens/s and the ratio to raw tar, next to the token rate an H100 needs to train a 1.3B GPT
(6 N FLOPs per token at ~400 TFLOP/s achieved).
"""

from __future__ import annotations

import argparse
import itertools
import json
import os
import pathlib
import resource
import sys
import tarfile
import time

import numpy as np

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1]))  # run from anywhere in the checkout

from data_pipeline import tario  # noqa: E402
from data_pipeline.corpus import bundled_corpus_path, iter_records  # noqa: E402
from data_pipeline.reader import ShardReader  # noqa: E402
from data_pipeline.shards import prepare_shards  # noqa: E402
from data_pipeline.tokenizer import train_tokenizer  # noqa: E402

H100_FLOPS = 400e12  # achieved bf16 dense FLOP/s on an H100 for a well-tuned 1.3B GPT (~40% of peak)
GPT_PARAMS = 1.3e9


def build(out: pathlib.Path, mb: int, seq_length: int) -> dict:
    """Shards of ~mb MB under out/shards (reused when present with the same settings)."""
    shards = out / "shards"
    manifest_path = shards / "manifest.json"
    if manifest_path.is_file():
        manifest = json.loads(manifest_path.read_text())
        size = sum(s["bytes"] for s in manifest["shards"]) / 1e6
        current = all(k in manifest["shards"][0] for k in ("xxh3_128", "members", "row_digests"))  # else older
        if manifest["seq_length"] == seq_length and 0.8 * mb <= size <= 1.25 * mb and current:
            return manifest
    out.mkdir(parents=True, exist_ok=True)
    records = list(iter_records(bundled_corpus_path()))
    text_bytes = sum(len(r["text"].encode()) for r in records)
    copies = max(1, round(mb * 1e6 / 2 / (text_bytes / 3.5)))  # ~3.5 bytes of text per token, 2 bytes per token
    corpus = out / "corpus.jsonl"
    with open(corpus, "w", encoding="utf-8") as f:
        for copy in range(copies):
            for r in records:
                f.write(json.dumps({"text": r["text"]}) + "\n")
    print(f"bench: building shards from the bundled corpus x{copies} ({copies * text_bytes / 1e6:.0f} MB of text)")
    tok = train_tokenizer([str(bundled_corpus_path())], str(out / "tok"), 32000)
    manifest = prepare_shards([str(corpus)], str(tok), str(shards), seq_length, samples_per_shard=64,
                              sequences_per_sample=64)
    corpus.unlink()
    return manifest


def fill_page_cache(paths: list[pathlib.Path], how: str) -> None:
    """Drop the shards from the page cache (these files only) and read them back in as `how` says, so every run
    starts from the same page-cache state: "reader" maps them as the reader does (`tario.map_whole`, with
    MADV_HUGEPAGE: the kernel reads them into 2 MiB folios, as on a training node where the reader is the first
    to touch the shards); "read": plain read() calls (small folios, as after `cp`, `tar` or other tools read
    them, or right after `data prepare` wrote them on this machine): every later mapping faults 64 KiB at a time.
    """
    for path in paths:
        fd = os.open(path, os.O_RDONLY)
        try:
            os.fsync(fd)  # written back first: only clean pages can be dropped
            os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
        finally:
            os.close(fd)
    for path in paths:
        with open(path, "rb") as f:
            if how == "reader":
                data = tario.map_whole(f)
                int(np.frombuffer(data, dtype=np.uint8)[::4096].sum())  # touch every page
                del data
            else:
                while f.read(1 << 20):
                    pass


def minor_faults() -> int:
    """Minor page faults of this process so far (all threads)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_minflt


def raw_tar(paths: list[pathlib.Path], stream: bool, widen: bool = False) -> int:
    """Tokens in all members, read with tarfile alone: random access as a user would write it
    (`tarfile.open(path)`, `extractfile(m).read()`, `np.frombuffer`), or stream mode (`r|`, like webdataset)."""
    tokens = 0
    for path in paths:
        with tarfile.open(path, mode="r|" if stream else "r") as tar:
            for member in tar:
                block = np.frombuffer(tar.extractfile(member).read(), dtype="<u2")
                tokens += (block.astype(np.int64) if widen else block).size
    return tokens


def reader_passes(source, workers: int, verify: bool, global_batch: int = 512, read_ahead: bool = True,
                  dtype: str = "native") -> list[tuple]:
    """(seconds, tokens) of two consecutive epochs of micro-batches from one ShardReader (dp 1,
    micro-batch 8), one iterator: the first pass maps and verifies every shard and takes its member table (or
    parses its tar headers); the second is the steady state of a multi-epoch run (checksums verified once per
    process, member tables known, shards still mapped)."""
    r = ShardReader(source, micro_batch_size=8, global_batch_size=global_batch, seed=0, num_workers=workers,
                    verify_checksums=verify, read_ahead=read_ahead, dtype=dtype)
    batches = r.plans[0].rows_per_epoch // global_batch * r.accumulation
    it, out = iter(r), []
    for _ in range(2):
        start, cpu, faults = time.perf_counter(), time.process_time(), minor_faults()
        tokens = sum(b.size for b in itertools.islice(it, batches))
        # CPU seconds and page faults of this process (all its threads); DataLoader workers are other
        # processes: not counted.
        out.append((time.perf_counter() - start, tokens, time.process_time() - cpu if not workers else None,
                    minor_faults() - faults if not workers else None))
    it.close()
    return out


def older_manifest(shards: pathlib.Path, out: pathlib.Path, drop: tuple[str, ...]) -> dict:
    """A source spec for the same shards under a copy of the manifest without the per-shard keys `drop`, as
    older `data prepare` runs wrote it (no member table; no xxh3_128: verified with sha256)."""
    manifest = json.loads((shards / "manifest.json").read_text())
    for info in manifest["shards"]:
        for key in drop:
            info.pop(key, None)
    out.write_text(json.dumps(manifest))
    return {"manifest": str(out), "shards": [str(shards / info["name"]) for info in manifest["shards"]]}


def timed_round_robin(contenders: list[tuple[str, object]], repeat: int) -> dict[str, list[list[tuple]]]:
    """Per contender and pass, the (seconds, tokens, CPU seconds, faults) of each of `repeat` rounds; each round runs
    every contender once, in turn, so load from other processes on a shared machine falls on all alike."""
    runs: dict[str, list] = {}
    for _ in range(repeat):
        for name, fn in contenders:
            start, cpu, faults = time.perf_counter(), time.process_time(), minor_faults()
            got = fn()
            if isinstance(got, int):  # a raw tar read: one pass, in this thread
                got = [(time.perf_counter() - start, got, time.process_time() - cpu, minor_faults() - faults)]
            for k, one in enumerate(got):
                runs.setdefault(name, [[] for _ in got])[k].append(one)
    return runs


def dp_sweep(source: str, dps: list[int], global_batch: int = 512, repeat: int = 3) -> None:
    """Per dp size and reading mode, two epochs of every rank (ranks in turn, step by step, timed per rank):
    median rows/s per rank handed out (best of `repeat` sweeps: the machine is shared), and read amplification =
    bytes read by all ranks / bytes of the rows handed out."""
    best: dict[tuple, list] = {}
    for _ in range(repeat):
        _dp_sweep_once(source, dps, global_batch, best)
    print(f"\n{'dp':>3} {'reading':12} {'pass':8} {'rows/s/rank':>12} {'amplification':>13} {'GB read':>8}")
    for (dp, owned, epoch), (rate, amp, read) in best.items():
        print(f"{dp:3d} {('owned rows' if owned else 'whole shards'):12} {epoch:8} {rate:12.0f} {amp:13.3f} "
              f"{read / 1e9:8.2f}")


def _dp_sweep_once(source: str, dps: list[int], global_batch: int, best: dict) -> None:
    for dp in dps:
        for owned in (True, False):
            readers = [ShardReader(source, micro_batch_size=8, global_batch_size=global_batch, dp_rank=r, dp_size=dp,
                                   seed=0, dtype="native", owned_rows=owned) for r in range(dp)]
            row_bytes = readers[0].seq_length * 2 + 2
            steps = readers[0].plans[0].rows_per_epoch // global_batch
            its = [iter(r) for r in readers]
            for epoch in ("1st", "steady"):
                seconds, before = [0.0] * dp, sum(r.bytes_read for r in readers)
                for _ in range(steps):
                    for k, (r, it) in enumerate(zip(readers, its)):
                        start = time.perf_counter()
                        for _ in range(r.accumulation):
                            next(it)
                        seconds[k] += time.perf_counter() - start
                read = sum(r.bytes_read for r in readers) - before
                rate = sorted(steps * global_batch / dp / s for s in seconds)[dp // 2]
                amp = read / (steps * global_batch * row_bytes)
                key = (dp, owned, epoch)
                if key not in best or rate > best[key][0]:
                    best[key] = [rate, amp, read]
            for it in its:
                it.close()


def prepare_tasks(out: pathlib.Path, mb: int, task_counts: list[int]) -> None:
    """Wall time of N concurrent `data prepare --num-tasks N` processes (one tokenizer worker each) + the merge."""
    import subprocess

    corpus, tok = out / "prepare-corpus.jsonl", out / "prepare-tok.model"
    if not corpus.is_file():
        records = list(iter_records(bundled_corpus_path()))
        text_bytes = sum(len(r["text"].encode()) for r in records)
        with open(corpus, "w", encoding="utf-8") as f:
            for _ in range(max(1, round(mb * 1e6 / 2 / (text_bytes / 3.5)))):
                for r in records:
                    f.write(json.dumps({"text": r["text"]}) + "\n")
        train_tokenizer([str(bundled_corpus_path())], str(out / "prepare-tok"), 32000)
    print(f"\n{'tasks':>5} {'seconds':>8} {'Mtok/s':>7} {'merge s':>8} {'CPU s':>6} {'Mtok/CPU-s':>10}  "
          f"({corpus.stat().st_size / 1e6:.0f} MB of jsonl)")
    for n in task_counts:
        dest = out / f"prepare-{n}"
        if dest.exists():
            import shutil
            shutil.rmtree(dest)
        start, cpu = time.perf_counter(), resource.getrusage(resource.RUSAGE_CHILDREN)
        procs = [subprocess.Popen([sys.executable, "-m", "pretrain", "data", "prepare", "--input", str(corpus),
                                   "--tokenizer", str(tok), "--output", str(dest), "--seq-length", "2048",
                                   "--workers", "0", "--num-tasks", str(n), "--task-index", str(i)],
                                  stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL) for i in range(n)]
        assert all(p.wait() == 0 for p in procs)
        tasks_done = time.perf_counter()
        subprocess.run([sys.executable, "-m", "pretrain", "data", "merge", str(dest)], check=True,
                       stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        end = time.perf_counter()
        tokens = json.loads((dest / "manifest.json").read_text())["num_tokens"]
        used = resource.getrusage(resource.RUSAGE_CHILDREN)
        cpu_s = used.ru_utime + used.ru_stime - cpu.ru_utime - cpu.ru_stime  # the tasks' and the merge's CPU time
        print(f"{n:5d} {end - start:8.1f} {tokens / (end - start) / 1e6:7.2f} {end - tasks_done:8.1f} {cpu_s:6.1f} "
              f"{tokens / cpu_s / 1e6:10.2f}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--mb", type=int, default=200, help="approximate shard size in MB to build")
    parser.add_argument("--dir", default="/tmp/pretrain-bench-data")
    parser.add_argument("--seq-length", type=int, default=2048)
    parser.add_argument("--page-cache", choices=("reader", "read"), default="reader",
                        help="how the shards get into the page cache before the runs (fill_page_cache)")
    parser.add_argument("--repeat", type=int, default=5,
                        help="rounds; each runs every contender once (best and median are reported)")
    parser.add_argument("--prepare-tasks", default="", help="comma-separated task counts: time data prepare only")
    parser.add_argument("--dp-sweep", default="", help="comma-separated dp sizes: run the DP sweep (dp_sweep) only")
    args = parser.parse_args()

    if args.prepare_tasks:
        pathlib.Path(args.dir).mkdir(parents=True, exist_ok=True)
        prepare_tasks(pathlib.Path(args.dir), args.mb, [int(x) for x in args.prepare_tasks.split(",")])
        return
    if args.dp_sweep:
        manifest = build(pathlib.Path(args.dir), args.mb, args.seq_length)
        size = sum(s["bytes"] for s in manifest["shards"]) / 1e6
        print(f"bench: {len(manifest['shards'])} shards, {size:.0f} MB, {manifest['num_sequences']} rows")
        dp_sweep(str(pathlib.Path(args.dir) / "shards"), [int(x) for x in args.dp_sweep.split(",")])
        return
    manifest = build(pathlib.Path(args.dir), args.mb, args.seq_length)
    shards = pathlib.Path(args.dir) / "shards"
    paths = [shards / s["name"] for s in manifest["shards"]]
    row = manifest["seq_length"] + 1
    size = sum(p.stat().st_size for p in paths) / 1e6
    print(f"bench: {len(paths)} shards, {size:.0f} MB, {manifest['num_sequences']} rows of {row} tokens "
          f"({manifest['sequences_per_sample']} per tar member)")
    fill_page_cache(paths, args.page_cache)  # every contender reads from memory, from the same page cache
    print(f"bench: page cache filled by {args.page_cache!r} (see fill_page_cache)")

    no_table = older_manifest(shards, pathlib.Path(args.dir) / "manifest-no-members.json", ("members",))
    sha_only = older_manifest(shards, pathlib.Path(args.dir) / "manifest-sha256-only.json",
                              ("members", "xxh3_128"))
    src = str(shards)
    contenders = [
        ("raw tarfile.open+extractfile (BASE)", lambda: raw_tar(paths, stream=False)),
        ("raw tarfile, stream mode (r|)", lambda: raw_tar(paths, stream=True)),
        ("raw tarfile + int64 (BASE64)", lambda: raw_tar(paths, stream=False, widen=True)),
        ("reader w=0 xxh3 uint16", lambda: reader_passes(src, 0, True)),
        ("reader w=0 unverified uint16", lambda: reader_passes(src, 0, False)),
        ("reader w=0 xxh3 no-table uint16", lambda: reader_passes(no_table, 0, True)),
        ("reader w=0 sha256 no-table uint16", lambda: reader_passes(sha_only, 0, True)),
        ("reader w=0 xxh3 int64", lambda: reader_passes(src, 0, True, dtype="int64")),
        ("reader w=0 unverified int64", lambda: reader_passes(src, 0, False, dtype="int64")),
        ("reader w=2 xxh3 uint16", lambda: reader_passes(src, 2, True)),
        ("reader w=2 unverified uint16", lambda: reader_passes(src, 2, False)),
        ("reader w=0 xxh3 uint16 GB=8", lambda: reader_passes(src, 0, True, 8)),
        ("reader w=0 xxh3 uint16 inline", lambda: reader_passes(src, 0, True, read_ahead=False)),
    ]
    runs = timed_round_robin(contenders, args.repeat)
    results = []  # (name, best seconds, median seconds, tokens, best CPU seconds, median faults; None: n/a)
    for name, _ in contenders:
        for k, samples in enumerate(runs[name]):
            seconds = sorted(s for s, _, _, _ in samples)
            cpu = None if samples[0][2] is None else min(c for _, _, c, _ in samples)
            faults = None if samples[0][3] is None else sorted(f for _, _, _, f in samples)[len(samples) // 2]
            label = name if len(runs[name]) == 1 else f"{name}, {('1st pass', 'steady')[k]}"
            results.append((label, seconds[0], seconds[len(seconds) // 2], samples[0][1], cpu, faults))
    base, base_median, base64 = results[0][1], results[0][2], results[2][1]
    print(f"\n{'contender':42} {'best s':>7} {'rows/s':>9} {'Mtok/s':>7} {'x BASE':>6} {'x BASE64':>8} "
          f"{'median s':>8} {'x BASE':>6} {'CPU s':>6} {'faults':>6}")
    for name, best, median, tokens, cpu, faults in results:
        cpu_text = f"{cpu:6.3f}" if cpu is not None else f"{'-':>6}"
        fault_text = f"{faults:6d}" if faults is not None else f"{'-':>6}"
        print(f"{name:42} {best:7.3f} {tokens / best / row:9.0f} {tokens / best / 1e6:7.0f} "
              f"{base / best:6.2f} {base64 / best:8.2f} {median:8.3f} {base_median / median:6.2f} {cpu_text} "
              f"{fault_text}")
    print("Best / median of the rounds; x BASE = BASE's seconds / the row's (best: best over best; median: "
          "median over median); CPU s: process CPU time of the best round, all threads (not DataLoader workers); "
          "faults: the process's minor page faults, median round. "
          "BASE: tarfile.open(path), extractfile(m).read(), np.frombuffer (uint16, what a user would write); "
          "BASE64: the same + astype(int64). Reader rows: micro-batches of the dtype named (uint16 = dtype='native'); "
          "1st pass = a fresh reader (maps and verifies each shard, takes its member table or parses its tar "
          "headers), steady = its next epoch. xxh3 / sha256: the checksum verified (xxh3_128 from the manifest; "
          "sha256 for a manifest without it); no-table: a manifest without member tables (older data prepare).")
    need = H100_FLOPS / (6 * GPT_PARAMS)
    print(f"\nH100 training a {GPT_PARAMS / 1e9:.1f}B GPT at {H100_FLOPS / 1e12:.0f} TFLOP/s needs "
          f"{need / 1e3:.0f}k tokens/s ({need / row:.0f} rows/s of {row}); the slowest reader run above gives "
          f"{min(t / s for _, s, _, t, _, _ in results[3:]) / need:.0f}x that on one CPU core.")


if __name__ == "__main__":
    main()
