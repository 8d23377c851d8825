"""`pretrain launch slurm-prepare` on the real one-node Slurm: a 4-task `data prepare` array (2 at a time), one
task requeued while it runs (and leftovers of an earlier killed try in its way), the afterok merge job, then
training on the merged data (issue 21, item 3)."""

from __future__ import annotations

import json
import subprocess
import time

import pytest

from data_pipeline.shards import prepare_shards
from data_pipeline.testing import write_corpus_slice
from tests.conftest import TINY_CONFIG, read_metrics, run_cli
from tests.slurm.conftest import job_fields, wait_for_job

pytestmark = [pytest.mark.slurm, pytest.mark.slow]


def test_prepare_array_requeue_merge_and_train(slurm_cluster, shakespeare, tmp_path):
    corpus = write_corpus_slice(tmp_path / "plays.jsonl", num_docs=12, chars_per_doc=6000)
    out, logs = tmp_path / "data", tmp_path / "logs"
    # What a task killed mid-way leaves behind: a shard without its completion marker, a temporary directory.
    (out / ".tasks" / "task-00001.tmp").mkdir(parents=True)
    (out / "task00001-000000.tar").write_bytes(b"half a shard")
    result = run_cli("launch", "slurm-prepare", str(corpus), "--tasks=4", "--max-parallel=2", "--cpus-per-task=1",
                     f"--tokenizer={shakespeare['tokenizer']}", f"--output={out}", "--seq-length=128",
                     "--samples-per-shard=2", f"--log-dir={logs}", f"--script-dir={tmp_path}")
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-2000:]
    array_id, merge_id = result.stdout.split("array ")[1].split()[0], result.stdout.split("merge job ")[1].split()[0]
    assert f"--dependency=afterok:{array_id}" in (tmp_path / "prepare-merge.sbatch").read_text()
    deadline = time.monotonic() + 120
    while job_fields(f"{array_id}_1").get("JobState") != "RUNNING":  # requeue task 1 while it runs
        assert time.monotonic() < deadline, job_fields(f"{array_id}_1")
        time.sleep(0.1)
    subprocess.run(["scontrol", "requeue", f"{array_id}_1"], check=True)
    fields = wait_for_job(merge_id, logs / "merge.log", timeout=400)
    merge_log = next(logs.glob("*merge*.log")).read_text()
    assert fields["JobState"] == "COMPLETED", merge_log[-2000:]
    assert int(job_fields(f"{array_id}_1").get("Restarts", "0")) >= 1
    assert "data merge: 4 tasks" in merge_log
    merged = json.loads((out / "manifest.json").read_text())
    single = prepare_shards([str(corpus)], str(shakespeare["tokenizer"]), str(tmp_path / "single"), 128,
                            samples_per_shard=2, workers=0)
    assert (merged["num_documents"], merged["num_tokens"]) == (single["num_documents"], single["num_tokens"])
    assert not (out / "task00001-000000.tar").read_bytes().startswith(b"half")  # redone by the task
    run_dir = tmp_path / "run"
    trained = run_cli("train", str(TINY_CONFIG), "--train.steps=3", "--train.log_every=1",
                      "--checkpoint.every_steps=0", "--model.num_layers=2", "--model.hidden_size=64",
                      "--train.micro_batch_size=4", f"--data.train={out}", "--data.valid=",
                      f"--data.tokenizer={shakespeare['tokenizer']}", f"--run.dir={run_dir}")
    assert trained.returncode == 0, trained.stderr[-2000:]
    assert sorted(read_metrics(run_dir)) == [1, 2, 3]
