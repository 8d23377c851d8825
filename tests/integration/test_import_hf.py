"""`pretrain import hf`: small random-init Hugging Face models built here (no downloads) become our checkpoints at
the config's layout and give HF's logits in our code (Llama at TP=2, and export -> import -> export byte-identical:
tests/integration/test_hf_example.py); a config that does not describe the HF model is refused in one line."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from tests.conftest import REPO, TINY_CONFIG, data_overrides, one_line_error, run_cli
from tests.integration.test_export_hf import REL_TOL, compare, corpus  # noqa: F401 - corpus: a fixture

LLAMA_CONFIG = REPO / "configs" / "llama" / "tiny.yaml"
BERT_CONFIG = REPO / "configs" / "bert" / "tiny.yaml"


def save_hf(model, tokenizer_path: Path, out: Path) -> Path:
    """``model`` saved as transformers saves it (safetensors), with our sentencepiece tokenizer next to it."""
    from data_pipeline.tokenizer import Tokenizer
    from pretrain.hf.common import write_tokenizer

    model.save_pretrained(out, safe_serialization=True)
    write_tokenizer(Tokenizer(str(tokenizer_path)), out, 128)
    return out


def hf_model(kind: str, tokenizer_path: Path, out: Path) -> Path:
    """A random-init HF model shaped like our tiny config of that kind (vocabulary: the session tokenizer's 1024)."""
    import transformers

    torch.manual_seed(0)
    if kind == "gpt2":  # configs/debug/gpt_tiny.yaml: tied, erf gelu
        model = transformers.GPT2LMHeadModel(transformers.GPT2Config(
            vocab_size=1024, n_positions=128, n_embd=192, n_layer=4, n_head=4, activation_function="gelu"))
    elif kind == "llama":  # configs/llama/tiny.yaml: GQA 4 heads / 2 groups, RoPE 5e5, untied
        model = transformers.LlamaForCausalLM(transformers.LlamaConfig(
            vocab_size=1024, hidden_size=192, intermediate_size=512, num_hidden_layers=4, num_attention_heads=4,
            num_key_value_heads=2, max_position_embeddings=128, rms_norm_eps=1e-5, rope_theta=500000.0,
            tie_word_embeddings=False))
    else:  # configs/bert/tiny.yaml: post-LN BERT with the NSP head
        model = transformers.BertForPreTraining(transformers.BertConfig(
            vocab_size=1024, hidden_size=192, num_hidden_layers=4, num_attention_heads=4, intermediate_size=768,
            max_position_embeddings=128, hidden_act="gelu", layer_norm_eps=1e-5))
    return save_hf(model.eval(), tokenizer_path, out)


def import_hf(model_dir: Path, config: Path, run_dir: Path, shakespeare, *overrides: str, nproc: int = 0) -> Path:
    result = run_cli("import", "hf", "--model", str(model_dir), "--config", str(config), "--output",
                     str(run_dir / "checkpoints"), *overrides, *data_overrides(shakespeare, run_dir),
                     torchrun_nproc=nproc)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    assert "import hf:" in result.stdout
    return run_dir


@pytest.mark.slow
def test_gpt2_imported_at_pp2_gives_hf_logits(shakespeare, tmp_path, corpus):
    hf_dir = hf_model("gpt2", shakespeare["tokenizer"], tmp_path / "hf")
    run_dir = import_hf(hf_dir, TINY_CONFIG, tmp_path / "run", shakespeare, "--parallel.pipeline=2", nproc=2)
    marker = json.loads((run_dir / "checkpoints" / "step_0" / "COMMITTED").read_text())
    assert marker["layout"]["pipeline"] == 2 and marker["step"] == 0
    result = compare(run_dir, hf_dir, corpus)  # consolidated from the two stages, against GPT2LMHeadModel
    assert result["logits_rel_err"] <= REL_TOL, result["logits_rel_err"]
    assert result["greedy_ours"] == result["greedy_hf"]


@pytest.mark.slow
def test_bert_import_gives_hf_logits(shakespeare, tmp_path, corpus):
    hf_dir = hf_model("bert", shakespeare["tokenizer"], tmp_path / "hf")
    run_dir = import_hf(hf_dir, BERT_CONFIG, tmp_path / "run", shakespeare)
    result = compare(run_dir, hf_dir, corpus)
    assert result["logits_rel_err"] <= REL_TOL and result["nsp_rel_err"] <= REL_TOL, result


@pytest.mark.parametrize("override, message", [
    ("--model.num_layers=2", "model.num_layers: 2 in the config, but {dir}/config.json has num_hidden_layers = 4"),
    ("--model.num_query_groups=4", "model.num_query_groups: 4 in the config, but {dir}/config.json has "
                                   "num_key_value_heads = 2"),
    ("--model.rope_theta=10000", "model.rope_theta: 10000.0 in the config, but {dir}/config.json has rope_theta = "
                                 "500000.0"),
])
def test_config_mismatch_is_one_line(shakespeare, tmp_path, override, message):
    from pretrain.config import load
    from pretrain.errors import ConfigError
    from pretrain.hf.hf_import import check_config, read_hf_config

    hf_dir = tmp_path / "hf"
    hf_dir.mkdir()
    (hf_dir / "config.json").write_text(json.dumps({
        "model_type": "llama", "vocab_size": 1024, "hidden_size": 192, "intermediate_size": 512,
        "num_hidden_layers": 4, "num_attention_heads": 4, "num_key_value_heads": 2, "rms_norm_eps": 1e-5,
        "rope_theta": 500000.0, "tie_word_embeddings": False, "hidden_act": "silu"}))
    cfg = load(LLAMA_CONFIG, [*data_overrides(shakespeare, tmp_path / "run"), override])
    with pytest.raises(ConfigError) as info:
        check_config(cfg, read_hf_config(hf_dir), hf_dir)
    assert str(info.value) == message.format(dir=hf_dir)


def test_cli_refuses_a_mismatch_before_any_work(shakespeare, tmp_path):
    hf_dir = tmp_path / "hf"
    hf_dir.mkdir()
    (hf_dir / "config.json").write_text(json.dumps({"model_type": "gpt2", "n_layer": 4, "n_embd": 256, "n_head": 4,
                                                    "n_positions": 128, "activation_function": "gelu",
                                                    "layer_norm_epsilon": 1e-5, "vocab_size": 1024}))
    result = run_cli("import", "hf", "--model", str(hf_dir), "--config", str(TINY_CONFIG), "--output",
                     str(tmp_path / "run" / "checkpoints"), *data_overrides(shakespeare, tmp_path / "run"))
    assert one_line_error(result) == \
        f"error: model.hidden_size: 192 in the config, but {hf_dir}/config.json has n_embd = 256"
    assert not (tmp_path / "run" / "checkpoints").exists()
