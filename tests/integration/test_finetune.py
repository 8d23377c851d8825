"""`pretrain finetune`: a classifier on the pretrained tiny GPT learns which play a passage is from."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from tests.conftest import REPO, cli_env, run_cli
from tests.integration.downstream_support import examples_file, pretrained_gpt, which_play_examples


@pytest.fixture(scope="module")
def plays(tmp_path_factory) -> Path:
    """240 passages of 8 lines, half from Hamlet, half from The Tempest (held-out plays), labelled by title."""
    return examples_file(tmp_path_factory, "plays", which_play_examples)


@pytest.mark.slow
def test_finetuned_gpt_classifies_held_out_passages_well_above_chance(shakespeare, tmp_path_factory, plays,
                                                                       tmp_path):
    run_dir = pretrained_gpt(shakespeare, tmp_path_factory)
    out = tmp_path / "classifier"
    result = run_cli("finetune", "--checkpoint", str(run_dir), "--data", str(plays), "--output", str(out),
                     "--lr", "5e-4", "--epochs", "3", "--max-length", "64", "--valid-fraction", "0.25")
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    assert [line.split(" |")[0] for line in result.stdout.splitlines() if "valid accuracy" in line][:3] == \
        [f"finetune: epoch {e}/3" for e in (1, 2, 3)]  # accuracy printed after every epoch
    record = json.loads((out / "finetune.json").read_text())
    assert record["labels"] == ["Hamlet", "The Tempest"]  # string labels -> class ids in sorted order
    assert (record["train_examples"], record["valid_examples"]) == (180, 60)
    # Chance is 0.5 on the balanced split; 45 of 60 right by chance has probability < 1e-4.
    assert record["valid_accuracy"] >= 0.75, result.stdout[-2000:]
    # The saved model, reloaded in a fresh process, scores the same held-out passages identically.
    reloaded = subprocess.run([sys.executable, "-m", "tests.integration.downstream_support", "finetuned",
                               str(out)], capture_output=True, text=True, cwd=REPO, env=cli_env(), timeout=600)
    assert reloaded.returncode == 0, reloaded.stderr[-3000:]
    assert json.loads(reloaded.stdout.strip().splitlines()[-1])["accuracy"] == record["valid_accuracy"]


def test_csv_integer_labels_and_seeded_split(tmp_path):
    from pretrain.finetune.data import class_ids, read_examples, split_indices

    path = tmp_path / "data.csv"
    path.write_text('body,y\n"a, b",10\nc,2\nd,2\n"e\nf",-1\n')
    texts, labels = read_examples(path, "body", "y")
    assert texts == ["a, b", "c", "d", "e\nf"]
    classes, ids = class_ids(labels, str(path), "y")
    assert classes == [-1, 2, 10] and ids == [2, 1, 1, 0]  # numeric order, not "10" < "2"
    train, valid = split_indices(100, 0.1, seed=7)
    assert len(valid) == 10 and sorted(train + valid) == list(range(100))
    assert (train, valid) == split_indices(100, 0.1, seed=7) and valid != split_indices(100, 0.1, seed=8)[1]


@pytest.mark.parametrize("name, content, flags, expected", [
    ("missing.jsonl", '{"text": "a", "y": 1}\n', [], "line 1 has no 'label' field"),
    ("empty.csv", "", [], "no examples"),
    ("one_class.csv", "text,label\na,x\nb,x\nc,x\n", [], "'label' has one class only ('x')"),
    ("wrong_text_key.csv", "text,label\na,x\nb,y\n", ["--text-key", "body"], "row 1 has no 'body' field"),
])
def test_bad_data_fails_with_one_line_naming_file_and_key(tmp_path, name, content, flags, expected):
    data = tmp_path / name
    data.write_text(content)
    out = tmp_path / "out"
    # The data is checked before the checkpoint is loaded: no model needed to reject it.
    result = run_cli("finetune", "--checkpoint", str(tmp_path), "--data", str(data), "--output", str(out), *flags,
                     timeout=120)
    assert result.returncode == 2, result.stdout[-2000:] + result.stderr[-2000:]
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith(f"error: {data}: ") and expected in lines[0], result.stderr
    assert not out.exists()
