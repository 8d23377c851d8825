"""BERT fine-tuning learns what pretraining taught. A classifier on a pretrained BERT (configs/bert/roformer_tiny.yaml,
600 steps) tells held-out passages as written from the same words shuffled far above chance and far above the same
classifier on the untrained BERT; so does that BERT after a round trip through Hugging Face (exported as
RoFormerForMaskedLM, whose logits equal ours; loaded and saved by transformers; imported from that directory at
TP=2). Why the rotary BERT: docs/downstream.md."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from tests.conftest import REPO, data_overrides, run_cli
from tests.integration.downstream_support import examples_file, word_order_examples
from tests.integration.test_export_hf import REL_TOL, compare, corpus  # noqa: F401 - corpus: a fixture
from tests.integration.test_import_hf import save_hf

ROFORMER = REPO / "configs" / "bert" / "roformer_tiny.yaml"
FINETUNE = ("--lr", "1e-3", "--epochs", "6", "--max-length", "64", "--valid-fraction", "0.25")
VALID = 150  # a quarter of the 600 passages
# A classifier that guesses right half the time gets 105 of 150 with probability < 1e-6.
CLEARLY_ABOVE_CHANCE = 0.70
# Measured with --seed 1234 / 1 / 2 / 3: pretrained 0.81 / 0.84 / 0.93 / 0.89, untrained 0.48 / 0.49 / 0.48 / 0.55.
ABOVE_UNTRAINED = 0.20


@pytest.fixture(scope="module")
def word_order(tmp_path_factory) -> Path:
    """600 passages of the held-out plays, half as written, half with their words shuffled."""
    return examples_file(tmp_path_factory, "word_order", word_order_examples)


def train_bert(shakespeare, run_dir: Path, *overrides: str) -> Path:
    result = run_cli("train", str(ROFORMER), *overrides, *data_overrides(shakespeare, run_dir))
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    return run_dir


@pytest.fixture(scope="module")
def pretrained(shakespeare, tmp_path_factory) -> Path:
    """roformer_tiny as configured: 600 steps of masked-LM pretraining (about a minute on 2 cores)."""
    return train_bert(shakespeare, tmp_path_factory.mktemp("roformer") / "pretrained")


def finetune(checkpoint: Path, data: Path, output: Path) -> dict:
    result = run_cli("finetune", "--checkpoint", str(checkpoint), "--data", str(data), "--output", str(output),
                     *FINETUNE)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    record = json.loads((output / "finetune.json").read_text())
    assert record["valid_examples"] == VALID and record["labels"] == ["original", "shuffled"]
    return record


@pytest.fixture(scope="module")
def accuracies(shakespeare, pretrained, word_order, tmp_path_factory) -> dict[str, float]:
    """Held-out accuracy of the classifier on the pretrained BERT and on the same BERT untrained (one step at lr
    1e-12: the initial weights, saved as a checkpoint)."""
    out = tmp_path_factory.mktemp("finetuned")
    untrained = train_bert(shakespeare, out / "untrained", "--train.steps=1", "--optim.lr=1e-12",
                           "--checkpoint.every_steps=1")
    return {name: finetune(run, word_order, out / f"{name}_classifier")["valid_accuracy"]
            for name, run in (("pretrained", pretrained), ("untrained", untrained))}


@pytest.mark.slow
def test_pretrained_bert_classifier_beats_chance_and_the_untrained_bert(accuracies):
    assert accuracies["pretrained"] >= CLEARLY_ABOVE_CHANCE, accuracies
    assert accuracies["pretrained"] >= accuracies["untrained"] + ABOVE_UNTRAINED, accuracies


@pytest.mark.slow
def test_bert_through_hugging_face_keeps_its_logits_and_fine_tunes_alike(shakespeare, pretrained, word_order,
                                                                         accuracies, corpus, tmp_path):
    import transformers

    exported = tmp_path / "hf"
    result = run_cli("export", "hf", "--checkpoint", str(pretrained), "--output", str(exported))
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    assert json.loads((exported / "config.json").read_text())["architectures"] == ["RoFormerForMaskedLM"]
    theirs = compare(pretrained, exported, corpus)  # transformers' RoFormerForMaskedLM on the export
    assert theirs["logits_rel_err"] <= REL_TOL and theirs["tokenizer_equal"], theirs
    # The directory imported is the one transformers itself writes for that model: the same bytes as the export.
    saved = save_hf(transformers.RoFormerForMaskedLM.from_pretrained(exported), shakespeare["tokenizer"],
                    tmp_path / "saved_by_transformers")
    assert (saved / "model.safetensors").read_bytes() == (exported / "model.safetensors").read_bytes()

    run_dir = tmp_path / "imported"
    result = run_cli("import", "hf", "--model", str(saved), "--config", str(ROFORMER), "--output",
                     str(run_dir / "checkpoints"), "--parallel.tensor=2", *data_overrides(shakespeare, run_dir),
                     torchrun_nproc=2)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    imported = compare(run_dir, saved, corpus)  # the two TP shards joined, against transformers
    assert imported["logits_rel_err"] <= REL_TOL, imported
    again = tmp_path / "hf_again"
    assert run_cli("export", "hf", "--checkpoint", str(run_dir), "--output", str(again)).returncode == 0
    assert (again / "model.safetensors").read_bytes() == (exported / "model.safetensors").read_bytes()

    accuracy = finetune(run_dir, word_order, tmp_path / "finetuned")["valid_accuracy"]
    assert accuracy >= CLEARLY_ABOVE_CHANCE and accuracy >= accuracies["untrained"] + ABOVE_UNTRAINED, accuracy
    # The same weights and seed: the fine-tune follows the direct one to within an example or two (float rounding).
    assert abs(accuracy - accuracies["pretrained"]) <= 2 / VALID, (accuracy, accuracies)


def test_rotary_layouts_agree_with_roformer():
    """megatron-core's rotary embedding on our query rows equals RoFormer's on the rows export reorders, at every
    position (the identity map would agree only at position 0)."""
    # The unfused arithmetic megatron-core's apply_rotary_pos_emb runs on CPU (no context-parallel group here).
    from megatron.core.models.common.embeddings.rope_utils import _apply_rotary_pos_emb_bshd
    from megatron.core.models.common.embeddings.rotary_pos_embedding import RotaryEmbedding
    from transformers.models.roformer.modeling_roformer import RoFormerSelfAttention, \
        RoFormerSinusoidalPositionalEmbedding

    from pretrain.hf.common import halves_to_pairs, pairs_to_halves

    heads, d, s = 2, 8, 6
    torch.manual_seed(0)
    q = torch.randn(s, heads * d)  # [s, nh*d]: one token's query rows per position
    assert torch.equal(pairs_to_halves(halves_to_pairs(q.t(), heads), heads), q.t())
    rope = RotaryEmbedding(kv_channels=d, rotary_percent=1.0, use_cpu_initialization=True)
    angles = rope.get_freqs_non_repeated(s)  # [s, d/2]; forward() would move them to CUDA, then cat the halves
    freqs = torch.cat((angles, angles), dim=-1)[:, None, None, :]  # [s, 1, 1, d], as its forward() returns
    ours = _apply_rotary_pos_emb_bshd(q.view(s, 1, heads, d), freqs)  # [s, 1, nh, d], rotary_interleaved=False
    table = RoFormerSinusoidalPositionalEmbedding(s, d)(torch.Size([1, s]))[None, None]  # [1, 1, s, d]
    theirs_in = halves_to_pairs(q.t(), heads).t().reshape(s, heads, d).transpose(0, 1)[None]  # [1, nh, s, d]
    theirs, _ = RoFormerSelfAttention.apply_rotary_position_embeddings(table, theirs_in, theirs_in)
    theirs = pairs_to_halves(theirs[0].transpose(0, 1).reshape(s, heads * d).t(), heads).t()  # back to our rows
    assert torch.allclose(ours.reshape(s, heads * d), theirs, atol=1e-5)
    assert not torch.allclose(ours.reshape(s, heads * d)[1:], theirs_in[0].transpose(0, 1).reshape(s, -1)[1:])


@pytest.mark.parametrize("override, message", [
    ("--model.nsp=true", "model.nsp=True: a BERT with rotary positions exports as RoFormerForMaskedLM, and it has "
                         "no pooler or NSP head (model.nsp=False)"),
    ("--model.rope_theta=500000", "model.rope_theta=500000.0: a BERT with rotary positions exports as "
                                  "RoFormerForMaskedLM, and its rotary base is fixed at 10000 "
                                  "(model.rope_theta=10000.0)"),
])
def test_a_rotary_bert_roformer_cannot_express_is_refused_before_loading(shakespeare, tmp_path, override, message):
    """`pretrain export hf` runs this check before it reads a weight (export.py), as for every family."""
    from pretrain.config import load
    from pretrain.errors import ConfigError
    from pretrain.hf import bert

    cfg = load(ROFORMER, [*data_overrides(shakespeare, tmp_path / "run"), override])
    with pytest.raises(ConfigError) as info:
        bert.check(cfg)
    assert str(info.value) == message


@pytest.mark.parametrize("override, hf_change, message", [
    ("--model.position_embedding=learned_absolute", {}, "model.position_embedding: 'learned_absolute' in the config, "
                                                        "but {dir}/config.json has model_type = 'rope'"),
    ("--model.nsp=true", {}, "model.nsp: True in the config, but {dir}/config.json has architectures = False"),
    ("--model.seq_length=128", {"rotary_value": True},
     "{dir}/config.json: rotary_value = true; our BERT rotates queries and keys only"),
])
def test_import_checks_a_roformer_config_in_one_line(shakespeare, tmp_path, override, hf_change, message):
    from pretrain.config import load
    from pretrain.errors import ConfigError
    from pretrain.hf.hf_import import check_config

    hf = {"model_type": "roformer", "num_hidden_layers": 2, "hidden_size": 128, "num_attention_heads": 4,
          "intermediate_size": 512, "max_position_embeddings": 128, "hidden_act": "gelu", "layer_norm_eps": 1e-5,
          "embedding_size": 128, "rotary_value": False, **hf_change}
    cfg = load(ROFORMER, [*data_overrides(shakespeare, tmp_path / "run"), override])
    with pytest.raises(ConfigError) as info:
        check_config(cfg, hf, tmp_path)
    assert str(info.value) == message.format(dir=tmp_path)
