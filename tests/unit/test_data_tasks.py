"""`data prepare --num-tasks N --task-index I` + `data merge`: the merged dataset holds the documents and token
count of a single-task prepare; finished tasks rerun as no-ops, killed ones rerun cleanly, missing ones are named
(issue 21, item 2)."""

import json
import os

import numpy as np
import pytest

from data_pipeline import DataError, ShardReader
from data_pipeline.shards import prepare_shards
from data_pipeline.tasks import merge_tasks, prepare_task, task_share
from data_pipeline.testing import write_corpus_slice
from pretrain.cli import main as pretrain_main
from tests.unit.reader_support import tiny  # noqa: F401

SEQ = 32


@pytest.fixture(scope="module")
def corpus(tiny, tmp_path_factory):
    """A .jsonl of 14 documents (split by byte range) and a .txt (one document, kept whole)."""
    d = tmp_path_factory.mktemp("corpus")
    jsonl = write_corpus_slice(d / "plays.jsonl", num_docs=14, chars_per_doc=1500)
    txt = d / "sonnet.txt"
    txt.write_text("Shall I compare thee to a summer's day? Thou art more lovely and more temperate. " * 8)
    return [str(jsonl), str(txt)]


def all_tokens(shard_dir):
    """Every stored token, as a sorted-insensitive histogram, read back through the verifying reader."""
    r = ShardReader(str(shard_dir), micro_batch_size=1, shuffle=False, loop=False, owned_rows=True)
    return np.bincount(np.concatenate(list(r)).reshape(-1), minlength=400), r.manifest


def prepare(corpus, tiny, out, tasks, index, **kw):
    return prepare_task(corpus, str(tiny["tokenizer"]), str(out), SEQ, num_tasks=tasks, task_index=index,
                        samples_per_shard=2, sequences_per_sample=4, workers=0, **kw)


def test_merged_tasks_hold_the_single_prepare_documents_and_tokens(corpus, tiny, tmp_path, monkeypatch):
    single = prepare_shards(corpus, str(tiny["tokenizer"]), str(tmp_path / "single"), SEQ, samples_per_shard=2,
                            sequences_per_sample=4, workers=0)
    out = tmp_path / "tasks"
    shares = [task_share([__import__("pathlib").Path(c) for c in corpus], 3, i) for i in range(3)]
    assert sum(len(s) for s in shares) > 3  # the .jsonl is cut into byte ranges across tasks
    assert prepare(corpus, tiny, out, 3, 0) and prepare(corpus, tiny, out, 3, 2)
    with pytest.raises(DataError, match="1 of 3 prepare tasks not finished: 1 "):
        merge_tasks(str(out))
    # Task 1 killed after moving its first shard: no marker, so the rerun removes what it wrote and redoes it.
    real_replace, moved = os.replace, []

    def dies_after_one(src, dst):
        if moved:
            raise KeyboardInterrupt("killed")
        moved.append(dst)
        return real_replace(src, dst)

    monkeypatch.setattr(os, "replace", dies_after_one)
    with pytest.raises(KeyboardInterrupt):
        prepare(corpus, tiny, out, 3, 1)
    monkeypatch.setattr(os, "replace", real_replace)
    assert moved and os.path.exists(moved[0])
    monkeypatch.setenv("SLURM_ARRAY_TASK_ID", "1")  # the CLI's default task index
    assert pretrain_main(["data", "prepare", "--input", corpus[0], "--input", corpus[1], "--tokenizer",
                          str(tiny["tokenizer"]), "--output", str(out), "--seq-length", str(SEQ),
                          "--samples-per-shard", "2", "--sequences-per-sample", "4", "--workers", "0",
                          "--num-tasks", "3"]) == 0
    assert not prepare(corpus, tiny, out, 3, 1)  # finished: a rerun does nothing
    assert pretrain_main(["data", "merge", str(out)]) == 0
    first = (out / "manifest.json").read_bytes()
    merged = merge_tasks(str(out))
    assert (out / "manifest.json").read_bytes() == first  # deterministic, rerunnable
    assert merged["num_documents"] == single["num_documents"] == 15
    assert merged["num_tokens"] == single["num_tokens"] and merged["dropped_tokens"] == single["dropped_tokens"]
    got, _ = all_tokens(out)
    want, _ = all_tokens(tmp_path / "single")
    assert np.array_equal(got, want)  # the same tokens (every document's), each as often
    assert sorted(p.name for p in out.glob("*.tar")) == sorted(s["name"] for s in merged["shards"])
    assert json.loads(first)["tasks"] == 3


def test_task_index_out_of_range_and_other_settings(corpus, tiny, tmp_path):
    with pytest.raises(DataError, match="--task-index 3 outside 0..2"):
        prepare(corpus, tiny, tmp_path, 3, 3)
    prepare(corpus, tiny, tmp_path, 2, 0)
    with pytest.raises(DataError, match="task 0 finished with other settings"):
        prepare(corpus, tiny, tmp_path, 3, 0)
