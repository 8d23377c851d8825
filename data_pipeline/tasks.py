"""`data prepare` as independent tasks (a Slurm job array) and `data merge`: preparation that scales with nodes.

Split. The inputs (in `expand_inputs` order) are laid end to end as one byte space and cut into `num_tasks`
equal byte ranges. A plain `.jsonl` file is split by byte range: a task takes the lines that *start* in its
range, so every line goes to exactly one task. `.txt` files (one file = one document) and compressed `.jsonl.gz`
/ `.jsonl.xz` (not seekable) go whole to the task whose range holds their first byte. The split depends only on
the inputs' names and sizes and `num_tasks`: every task computes it alone, nothing is exchanged.

Output. Task i tokenizes its share with `prepare_shards` into `DIR/.tasks/task-<i>.tmp/` (prefix
`task<i>`), then moves its shards (and row digests) into DIR and writes `DIR/.tasks/task-<i>.done` last
(its manifest, the final partial row's ids in `task-<i>.tail.npy`). A finished task reruns as a no-op; a killed
one left no marker, so a rerun deletes whatever it had written and starts over.

Merge. `data merge DIR` checks that every task's marker is there (else names the missing ones), writes the
tasks' tails, concatenated in task order, as shards `tails-*` (rows cut as a single prepare would, the last
partial row dropped) and `manifest.json` (tasks in order, then tails; totals; checksums as written). So the
merged data holds exactly the tokens a single-task prepare stores: the same documents in the same count, and
the same number of tokens; each task's last partial row of a document sits in the tails instead.
"""

from __future__ import annotations

import json
import os
import pathlib
import shutil
from typing import Iterator

import numpy as np
from tqdm import tqdm

from data_pipeline.corpus import expand_inputs, read_documents
from data_pipeline.errors import DataError
from data_pipeline.shards import MANIFEST_NAME, prepare_shards

TASKS_DIR = ".tasks"


def task_index_default() -> int | None:
    """The task index from Slurm (`SLURM_ARRAY_TASK_ID`), or None outside a job array."""
    value = os.environ.get("SLURM_ARRAY_TASK_ID", "")
    return int(value) if value.isdigit() else None


def task_share(files: list[pathlib.Path], num_tasks: int, task_index: int) -> list[tuple[pathlib.Path, int, int]]:
    """(file, start byte, end byte) pieces of task `task_index` (module docstring); a whole file is (f, 0, size)."""
    sizes = [f.stat().st_size for f in files]
    total = sum(sizes)
    lo, hi = total * task_index // num_tasks, total * (task_index + 1) // num_tasks
    share, offset = [], 0
    for f, size in zip(files, sizes):
        if f.name.endswith(".jsonl"):  # lines starting in [lo, hi)
            start, end = max(lo - offset, 0), min(hi - offset, size)
            if start < end:
                share.append((f, start, end))
        elif lo <= offset < hi or (size == 0 and offset == hi == total and task_index == num_tasks - 1):
            share.append((f, 0, size))
        offset += size
    return share


def _lines_from(path: pathlib.Path, start: int, end: int) -> Iterator[bytes]:
    """The lines of `path` that start at a byte in [start, end)."""
    with open(path, "rb") as f:
        if start > 0:
            f.seek(start - 1)
            f.readline()  # the line in progress at start - 1 belongs to the range before (unless it ended there)
        while f.tell() < end:
            line = f.readline()
            if not line:
                return
            yield line


def share_documents(share: list[tuple[pathlib.Path, int, int]], text_key: str) -> Iterator[str]:
    """The documents of a task's share, in input order."""
    for path, start, end in share:
        if not path.name.endswith(".jsonl"):
            yield from read_documents(path, text_key=text_key)
            continue
        for number, line in enumerate(_lines_from(path, start, end)):
            if not line.strip():
                continue
            try:
                text = json.loads(line)[text_key]
            except (ValueError, KeyError, TypeError) as exc:
                raise DataError(f"{path} (byte range {start}-{end}, line {number + 1} of it): not a JSON object "
                                f"with a {text_key!r} string ({type(exc).__name__})") from None
            if not isinstance(text, str):
                raise DataError(f"{path}: {text_key!r} is not a string in a line of bytes {start}-{end}")
            yield text


def _marker(out: pathlib.Path, i: int) -> pathlib.Path:
    return out / TASKS_DIR / f"task-{i:05d}.done"


def prepare_task(inputs: list[str], tokenizer: str, output_dir: str, seq_length: int, *, num_tasks: int,
                 task_index: int, samples_per_shard: int = 2048, sequences_per_sample: int = 64,
                 text_key: str = "text", workers: int | None = None) -> bool:
    """Prepare task `task_index` of `num_tasks` (module docstring); False if it had already finished."""
    if not 0 <= task_index < num_tasks:
        raise DataError(f"data prepare: --task-index {task_index} outside 0..{num_tasks - 1} (--num-tasks "
                        f"{num_tasks})")
    out = pathlib.Path(output_dir)
    files = expand_inputs(inputs)
    marker, prefix = _marker(out, task_index), f"task{task_index:05d}"
    settings = {"num_tasks": num_tasks, "inputs": [str(f) for f in files], "seq_length": seq_length,
                "sequences_per_sample": sequences_per_sample, "samples_per_shard": samples_per_shard,
                "tokenizer": str(pathlib.Path(tokenizer).resolve()), "text_key": text_key}
    if marker.is_file():
        done = json.loads(marker.read_text())
        if done["settings"] != settings:
            raise DataError(f"{marker}: task {task_index} finished with other settings ({done['settings']}); use "
                            f"a fresh --output directory")
        return False
    for stale in out.glob(f"{prefix}-*"):  # a killed earlier try: start over
        stale.unlink()
    tmp = out / TASKS_DIR / f"task-{task_index:05d}.tmp"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    share = task_share(files, num_tasks, task_index)
    tail = out / TASKS_DIR / f"task-{task_index:05d}.tail.npy"
    manifest = prepare_shards([str(p) for p, _, _ in share], tokenizer, str(tmp), seq_length,
                              samples_per_shard=samples_per_shard, sequences_per_sample=sequences_per_sample,
                              text_key=text_key, prefix=prefix, workers=workers,
                              documents=share_documents(share, text_key), tail_path=str(tail))
    for info in manifest["shards"]:
        os.replace(tmp / info["name"], out / info["name"])
        os.replace(tmp / info["row_digests"], out / info["row_digests"])
    shutil.rmtree(tmp)
    record = {"settings": settings, "task_index": task_index, "manifest": manifest}
    part = marker.with_suffix(".part")
    part.write_text(json.dumps(record) + "\n")
    os.replace(part, marker)  # last: the task is done only once this exists
    return True


def merge_tasks(output_dir: str) -> dict:
    """Check every task finished and write the tails' shards and manifest.json; return the manifest."""
    out = pathlib.Path(output_dir)
    markers = sorted((out / TASKS_DIR).glob("task-*.done"))
    if not markers:
        raise DataError(f"{out}: no finished prepare task (no {TASKS_DIR}/task-*.done); run data prepare "
                        f"--num-tasks N --task-index I first")
    records = [json.loads(m.read_text())  # a bar on a terminal only (disable=None): thousands of tasks take a while
               for m in tqdm(markers, desc="data merge: tasks", unit="task", mininterval=1.0, disable=None)]
    settings = records[0]["settings"]
    num_tasks = settings["num_tasks"]
    have = {r["task_index"] for r in records if r["settings"] == settings}
    missing = [i for i in range(num_tasks) if i not in have]
    if missing or len(records) != num_tasks:
        raise DataError(f"{out}: {len(missing)} of {num_tasks} prepare tasks not finished: "
                        f"{', '.join(map(str, missing[:20]))}{' ...' if len(missing) > 20 else ''} (rerun them)")
    records.sort(key=lambda r: r["task_index"])
    tails = [np.load(out / TASKS_DIR / f"task-{r['task_index']:05d}.tail.npy") for r in records]
    for stale in out.glob("tails-*"):
        stale.unlink()
    tmp = out / TASKS_DIR / "tails.tmp"
    shutil.rmtree(tmp, ignore_errors=True)
    tail_manifest = prepare_shards([], settings["tokenizer"], str(tmp), settings["seq_length"],
                                   samples_per_shard=settings["samples_per_shard"],
                                   sequences_per_sample=settings["sequences_per_sample"], prefix="tails",
                                   token_ids=[np.concatenate(tails)] if tails else [], tail_path=str(tmp / "x.npy"))
    for info in tail_manifest["shards"]:
        os.replace(tmp / info["name"], out / info["name"])
        os.replace(tmp / info["row_digests"], out / info["row_digests"])
    shutil.rmtree(tmp)
    header = next((r["manifest"] for r in records if r["manifest"]["shards"]), None)
    if header is None and not tail_manifest["shards"]:
        raise DataError(f"{out}: the tasks hold fewer than one sequence of seq_length+1 tokens in all")
    header = header or tail_manifest
    shards = [info for r in records for info in r["manifest"]["shards"]] + tail_manifest["shards"]
    manifest = {k: v for k, v in header.items() if k not in ("shards",)}
    num_sequences = sum(s["sequences"] for s in shards)
    manifest.update(num_documents=sum(r["manifest"]["num_documents"] for r in records),
                    num_sequences=num_sequences, num_tokens=num_sequences * (settings["seq_length"] + 1),
                    dropped_tokens=tail_manifest["dropped_tokens"], tasks=num_tasks, shards=shards)
    tmp_manifest = out / (MANIFEST_NAME + ".tmp")
    tmp_manifest.write_text(json.dumps(manifest, indent=1) + "\n", encoding="utf-8")
    os.replace(tmp_manifest, out / MANIFEST_NAME)
    return manifest

