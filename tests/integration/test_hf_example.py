"""scripts/hf_continue_pretraining.sh, the README's Hugging Face example: a random-init LlamaForCausalLM built here
is imported at TP=2 (giving HF's logits in our code), pretrained 20 more steps, exported and loaded by transformers;
the export imported and exported again is byte-identical."""

from __future__ import annotations

import json
import subprocess

import pytest

from tests.conftest import REPO, cli_env
from tests.integration.test_export_hf import REL_TOL, compare, corpus, export  # noqa: F401 - corpus: a fixture
from tests.integration.test_import_hf import LLAMA_CONFIG, hf_model, import_hf


@pytest.mark.slow
def test_import_at_tp2_continue_export_and_load_with_transformers(shakespeare, tmp_path, corpus):
    hf_dir = hf_model("llama", shakespeare["tokenizer"], tmp_path / "hf_in")
    work = tmp_path / "work"
    result = subprocess.run(["bash", "scripts/hf_continue_pretraining.sh", str(hf_dir), str(LLAMA_CONFIG), str(work),
                             "--train.eval_batches=2", "--train.eval_every=20"], capture_output=True, text=True,
                            cwd=REPO, env={**cli_env(), "DATA": str(shakespeare["train"].parent)}, timeout=900)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    assert "transformers: LlamaForCausalLM continues 'To be, or not to be" in result.stdout, result.stdout[-2000:]
    step_0 = work / "run" / "checkpoints" / "step_0"
    assert json.loads((step_0 / "COMMITTED").read_text())["layout"]["tensor"] == 2
    imported = compare(step_0, hf_dir, corpus)  # the TP=2 shards consolidated, against the HF model itself
    assert imported["logits_rel_err"] <= REL_TOL, imported["logits_rel_err"]
    metrics = [json.loads(line) for line in (work / "run" / "metrics.jsonl").read_text().splitlines()]
    losses = [m["loss"] for m in metrics if "loss" in m]
    assert [m["step"] for m in metrics if "loss" in m][-1] == 20 and losses[-1] < losses[0]  # it kept learning
    assert (work / "hf" / "config.json").is_file() and (work / "hf" / "generation_config.json").is_file()
    # export -> import -> export of the trained model is byte-identical: nothing is lost or reordered either way.
    again = export(import_hf(work / "hf", LLAMA_CONFIG, tmp_path / "reimported", shakespeare), tmp_path / "again")
    assert (work / "hf" / "model.safetensors").read_bytes() == (again / "model.safetensors").read_bytes()
    assert (work / "hf" / "config.json").read_text() == (again / "config.json").read_text()
