"""`pretrain export hf`: checkpoints trained through the CLI load in transformers and give our logits."""

from __future__ import annotations

import atexit
import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from tests.conftest import REPO, TINY_CONFIG, cli_env, data_overrides, run_cli
from tests.integration.downstream_support import PADDED_VOCAB, pretrained_gpt, train_gpt

LLAMA_CONFIG = REPO / "configs" / "llama" / "tiny.yaml"

REL_TOL = 1e-5  # fp32, relative to the largest logit


@pytest.fixture(scope="module")
def corpus(tmp_path_factory) -> Path:
    """The held-out plays (never trained on) as JSONL: real text for the logits comparison."""
    from data_pipeline.corpus import extract_bundled

    return extract_bundled(tmp_path_factory.mktemp("corpus"))["valid"]


def export(checkpoint: Path, output: Path) -> Path:
    result = run_cli("export", "hf", "--checkpoint", str(checkpoint), "--output", str(output))
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    assert "export hf:" in result.stdout
    return output


#: The process that runs downstream_support.our_vs_hf for every ``compare`` of this pytest process (None: not
#: started yet, or exited).
_comparer: subprocess.Popen | None = None
_RESULT = "compare-result "


def compare(checkpoint: Path, export_dir: Path, corpus: Path) -> dict:
    """tests.integration.downstream_support.our_vs_hf, in a process of its own (load_model owns its process group),
    started once and reused: importing torch, megatron-core and transformers is most of a comparison's ~12 s, a
    reused process compares in 2-6 s. A comparison that raises fails the test with the worker's traceback."""
    global _comparer
    if _comparer is None or _comparer.poll() is not None:
        _comparer = subprocess.Popen([sys.executable, "-c", "from tests.integration.test_export_hf import "
                                      "serve_comparisons; serve_comparisons()"], stdin=subprocess.PIPE,
                                     stdout=subprocess.PIPE, text=True, cwd=REPO, env=cli_env())
        atexit.register(_comparer.stdin.close)  # the worker ends at the end of its input
    _comparer.stdin.write(json.dumps([str(checkpoint), str(export_dir), str(corpus)]) + "\n")
    _comparer.stdin.flush()
    line = _comparer.stdout.readline()
    assert line.startswith(_RESULT), f"comparison worker exited ({_comparer.poll()}); its stderr is above"
    result = json.loads(line.removeprefix(_RESULT))
    assert "error" not in result, result.get("error")
    return result


def serve_comparisons() -> None:
    """The comparison worker: one JSON [checkpoint, export_dir, corpus] per input line, one result line each (its
    protocol on a copy of stdout; anything the libraries print goes to stderr)."""
    import os
    import traceback

    from tests.integration.downstream_support import our_vs_hf

    protocol = os.fdopen(os.dup(1), "w")
    os.dup2(2, 1)
    for line in sys.stdin:
        try:
            result = our_vs_hf(*map(Path, json.loads(line)))
        except Exception:  # reported to the test, which fails with it; the worker serves the next one
            result = {"error": traceback.format_exc()}
        protocol.write(_RESULT + json.dumps(result) + "\n")
        protocol.flush()


@pytest.mark.slow
def test_gpt_export_loads_in_transformers_with_equal_logits(shakespeare, tmp_path_factory, tmp_path, corpus):
    run_dir = pretrained_gpt(shakespeare, tmp_path_factory)  # tied embeddings, gelu, 1100 padded vocab rows
    out = export(run_dir, tmp_path / "hf")
    assert {p.name for p in out.iterdir()} >= {"config.json", "model.safetensors", "tokenizer.model",
                                                "tokenizer_config.json", "README.md"}
    from safetensors.torch import load_file

    tensors = load_file(out / "model.safetensors")
    assert "lm_head.weight" not in tensors  # tied: stored once, re-tied by transformers
    assert tensors["transformer.wte.weight"].shape == (1024, 192)  # the tokenizer's vocabulary, not the 1100 rows
    assert tensors["transformer.h.0.attn.c_attn.weight"].shape == (192, 3 * 192)  # Conv1D: [in, out]
    result = compare(run_dir, out, corpus)
    assert result["logits_rel_err"] <= REL_TOL, result["logits_rel_err"]
    config = result["hf_config"]
    assert (config["n_layer"], config["n_embd"], config["n_head"], config["n_positions"]) == (4, 192, 4, 128)
    assert (config["vocab_size"], config["activation_function"], config["layer_norm_epsilon"]) == (1024, "gelu", 1e-5)
    assert result["lm_head_tied"] and config["tie_word_embeddings"]
    assert result["tokenizer_equal"]  # the sentencepiece tokenizer config in the export encodes like ours


@pytest.mark.slow
def test_tp2_checkpoint_with_tanh_gelu_and_untied_output_exports_equal_logits(shakespeare, tmp_path, corpus):
    # Saved as two TP shards (fused QKV split by heads, vocabulary padded to 1200 rows for TP=2);
    # the streaming export joins each tensor's two shards as it reads it.
    run_dir = train_gpt(shakespeare, tmp_path / "run", "--parallel.tensor=2", "--model.activation=gelu_tanh",
                        "--model.tie_embeddings=false", "--train.eval_batches=0", steps=2, torchrun_nproc=2)
    out = export(run_dir, tmp_path / "hf")
    result = compare(run_dir, out, corpus)
    assert result["logits_rel_err"] <= REL_TOL, result["logits_rel_err"]
    config = result["hf_config"]
    assert config["vocab_size"] == 1024 and config["activation_function"] == "gelu_new"
    assert not config["tie_word_embeddings"] and not result["lm_head_tied"]


def test_rope_gpt_with_gpt2_mlp_is_refused_with_one_line(shakespeare, tmp_path):
    # Rotary positions make it a Llama export, whose MLP is SwiGLU: gelu cannot be expressed. The refusal comes from
    # the checkpoint's config.yaml alone, before any weight: a committed step directory without weights will do.
    from pretrain.config import load, to_yaml

    run_dir = tmp_path / "run"
    step = run_dir / "checkpoints" / "step_1"
    step.mkdir(parents=True)
    cfg = load(TINY_CONFIG, [*data_overrides(shakespeare, run_dir), "--model.position_embedding=rope"])
    (step / "config.yaml").write_text(to_yaml(cfg))
    (step / "COMMITTED").write_text(json.dumps({"step": 1}))
    out = tmp_path / "hf"
    result = run_cli("export", "hf", "--checkpoint", str(run_dir), "--output", str(out))
    assert result.returncode == 2, result.stdout[-2000:] + result.stderr[-2000:]
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: model.activation=gelu: a GPT with rotary"), result.stderr
    assert not out.exists()  # refused before anything was written


@pytest.mark.parametrize("override, key", [("activation", "swiglu"), ("position_embedding", "rope"),
                                           ("normalization", "rmsnorm"), ("num_query_groups", 2),
                                           ("add_bias_linear", False)])
def test_gpt2_compatibility_check_names_the_key(override, key):
    from pretrain.config import Config
    from pretrain.errors import ConfigError
    from pretrain.hf import gpt2

    cfg = Config()
    setattr(cfg.model, override, key)
    with pytest.raises(ConfigError, match=f"^model.{override}={key}: "):
        gpt2.check(cfg)


@pytest.mark.slow
def test_llama_export_with_gqa_rope_untied_matches_llama_for_causal_lm(shakespeare, tmp_path, corpus):
    # configs/llama/tiny.yaml: RMSNorm, 4 heads in 2 key/value groups, SwiGLU, RoPE base 5e5, no biases, untied
    # output layer; the vocabulary padded to 1100 rows. One process: that TP=2 + SP and PP=2 Llama checkpoints
    # consolidate to the single process's weights is tests/distributed/test_parallel_layouts.py's, and the export
    # starts from the consolidated model.
    run_dir = tmp_path / "run"
    trained = run_cli("train", str(LLAMA_CONFIG), "--train.steps=4", "--checkpoint.every_steps=4", PADDED_VOCAB,
                      *data_overrides(shakespeare, run_dir))
    assert trained.returncode == 0, trained.stdout[-3000:] + trained.stderr[-3000:]
    out = tmp_path / "hf"
    result = run_cli("export", "hf", "--checkpoint", str(run_dir), "--output", str(out), "--max-shard-gb=0.004")
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    index = json.loads((out / "model.safetensors.index.json").read_text())  # 8.1 MB of fp32 weights: 3 shards
    assert sorted(set(index["weight_map"].values())) == [f"model-0000{i}-of-00003.safetensors" for i in (1, 2, 3)]
    from data_pipeline.tokenizer import Tokenizer

    tokenizer = Tokenizer(str(shakespeare["tokenizer"]))
    generation = json.loads((out / "generation_config.json").read_text())
    assert (generation["eos_token_id"], generation["bos_token_id"]) == (tokenizer.eos_id, tokenizer.bos_id)
    result = compare(run_dir, out, corpus)
    assert result["logits_rel_err"] <= REL_TOL, result["logits_rel_err"]
    config = result["hf_config"]
    assert config["architectures"] == ["LlamaForCausalLM"] and config["vocab_size"] == 1024
    assert (config["num_attention_heads"], config["num_key_value_heads"], config["rope_theta"]) == (4, 2, 5e5)
    assert not config["tie_word_embeddings"] and not result["lm_head_tied"]
    assert result["tokenizer_equal"]  # AutoTokenizer (LlamaTokenizer over tokenizer.model) encodes like ours
    assert result["greedy_ours"] == result["greedy_hf"], result  # token for token, each with its own KV cache
    assert result["cached_logits_rel_err"] <= REL_TOL, result["cached_logits_rel_err"]  # every decoding step


def test_split_qkv_follows_megatron_group_layout():
    from pretrain.hf.common import split_qkv

    # 4 heads in 2 key/value groups, head size 1: megatron-core's rows are [q0 q1 k0 v0 | q2 q3 k1 v1].
    weight = torch.arange(8.0)[:, None].expand(8, 3)  # [8, 3], row r holds r
    q, k, v = split_qkv(weight, num_heads=4, num_groups=2)
    assert q[:, 0].tolist() == [0, 1, 4, 5] and k[:, 0].tolist() == [2, 6] and v[:, 0].tolist() == [3, 7]
    # Plain multi-head (GPT-2's case), 2 heads of size 2: [q0 q0 k0 k0 v0 v0 | q1 q1 k1 k1 v1 v1] (a bias).
    q, k, v = split_qkv(torch.arange(12.0), num_heads=2, num_groups=2)
    assert q.tolist() == [0, 1, 6, 7] and k.tolist() == [2, 3, 8, 9] and v.tolist() == [4, 5, 10, 11]


@pytest.mark.slow
@pytest.mark.parametrize("overrides, architecture", [
    ((), "BertForPreTraining"),  # tied MLM output layer, NSP head
    (("--model.nsp=false", "--model.tie_embeddings=false"), "BertForMaskedLM"),  # no pooler / NSP head to export
])
def test_bert_export_matches_hf_bert(shakespeare, tmp_path, corpus, overrides, architecture):
    run_dir = tmp_path / "run"
    trained = run_cli("train", str(REPO / "configs" / "bert" / "tiny.yaml"), "--train.steps=3",
                      "--checkpoint.every_steps=3", "--model.make_vocab_size_divisible_by=100", *overrides,
                      *data_overrides(shakespeare, run_dir))
    assert trained.returncode == 0, trained.stdout[-3000:] + trained.stderr[-3000:]
    out = export(run_dir, tmp_path / "hf")
    assert json.loads((out / "config.json").read_text())["architectures"] == [architecture]
    result = compare(run_dir, out, corpus)  # one row padded: compared at real tokens
    assert result["logits_rel_err"] <= REL_TOL, result["logits_rel_err"]  # MLM prediction logits
    if architecture == "BertForPreTraining":
        assert result["nsp_rel_err"] <= REL_TOL, result["nsp_rel_err"]  # seq_relationship_logits
    assert result["tokenizer_equal"]
