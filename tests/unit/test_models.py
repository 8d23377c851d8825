"""ModelSpec registry, vocabulary padding, and the GPT family: batches, mask, FLOPs, loss at init."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from data_pipeline.batches import causal_mask
from pretrain import models
from pretrain.errors import ConfigError
from pretrain.config import ModelConfig, ParallelConfig
from pretrain.models import gpt

DEVICE = torch.device("cuda" if torch.cuda.is_available() else "cpu")


# ---------------------------------------------------------------------------------------------------------------
# Registry
# ---------------------------------------------------------------------------------------------------------------


def test_registry_has_gpt():
    spec = models.get("gpt")
    assert spec is gpt.SPEC and spec.name == "gpt"
    assert spec.build is gpt.build and spec.make_batch_fn is gpt.make_batch_fn
    assert spec.loss_fn is gpt.loss_fn and spec.flops_per_token is gpt.flops_per_token


def test_every_config_family_is_registered():
    import typing

    families = typing.get_args(typing.get_type_hints(ModelConfig)["family"])
    for family in families:
        assert models.get(family).name == family


@pytest.mark.parametrize("name", ["bert_large", "GPT", ""])
def test_unknown_family_is_a_one_line_config_error(name):
    with pytest.raises(ConfigError) as info:
        models.get(name)
    message = str(info.value)
    assert "\n" not in message
    assert message.startswith("model.family") and repr(name) in message and "gpt" in message


# ---------------------------------------------------------------------------------------------------------------
# Vocabulary padding (Megatron's rule)
# ---------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("vocab, divisible_by, tp, padded", [
    (2048, 128, 2, 2048),  # already a multiple of 256
    (2048, 128, 1, 2048),
    (2000, 128, 1, 2048),
    (2049, 128, 1, 2176),
    (50257, 128, 1, 50304),  # GPT-2
    (50257, 128, 2, 50432),  # multiple of 256
    (50257, 128, 8, 51200),  # multiple of 1024
    (1, 128, 1, 128),
    (1000, 1, 1, 1000),
    (1000, 1, 3, 1002),
])
def test_padded_vocab_size(vocab, divisible_by, tp, padded):
    result = models.padded_vocab_size(vocab, divisible_by, tp)
    assert result == padded
    assert result >= vocab and result % (divisible_by * tp) == 0 and result - vocab < divisible_by * tp


# ---------------------------------------------------------------------------------------------------------------
# batch_fn, causal mask, loss_fn
# ---------------------------------------------------------------------------------------------------------------


def test_batch_fn_shapes_and_shift():
    b, s = 3, 16
    rows = np.random.default_rng(0).integers(0, 1000, size=(b, s + 1), dtype=np.int64)
    batch = gpt.batch_fn(rows, torch.device("cpu"))
    inputs = batch["inputs"]
    assert set(inputs) == {"input_ids", "position_ids", "attention_mask", "labels"}
    tokens, labels = inputs["input_ids"], inputs["labels"]
    assert tokens.shape == labels.shape == (b, s)
    assert tokens.dtype == labels.dtype == torch.int64
    assert torch.equal(tokens, torch.from_numpy(rows[:, :-1]))
    assert torch.equal(labels, torch.from_numpy(rows[:, 1:]))
    assert torch.equal(labels[:, :-1], tokens[:, 1:])  # predict token t+1 from tokens <= t
    assert inputs["position_ids"].shape == (b, s)
    assert torch.equal(inputs["position_ids"], torch.arange(s).expand(b, s))
    assert batch["loss_mask"].shape == (b, s) and batch["loss_mask"].dtype == torch.float32
    assert bool((batch["loss_mask"] == 1).all())
    assert batch["num_tokens"] == b * s
    # The batch owns its memory: changing the reader's rows afterwards does not change it.
    rows[:] = -1
    assert bool((tokens >= 0).all())


def test_causal_mask_shape_and_values():
    s = 7
    rows = np.zeros((2, s + 1), dtype=np.int64)
    # Plain packing passes no mask: the layers are causal by mask type (SDPA's is_causal, TE's causal mask).
    assert gpt.batch_fn(rows, torch.device("cpu"))["inputs"]["attention_mask"] is None
    mask = torch.from_numpy(causal_mask(s).copy())  # the explicit mask of per-document batches and references
    assert mask.shape == (1, 1, s, s) and mask.dtype == torch.bool
    for i in range(s):
        for j in range(s):
            assert bool(mask[0, 0, i, j]) == (j > i), (i, j)  # True = masked out (a future position)
    assert int(mask.sum()) == s * (s - 1) // 2


def test_loss_fn_is_the_masked_mean():
    per_token = torch.tensor([[1.0, 2.0], [3.0, 4.0]])
    batch = {"loss_mask": torch.tensor([[1.0, 0.0], [1.0, 1.0]])}
    assert gpt.loss_fn(per_token, batch).item() == pytest.approx((1 + 3 + 4) / 3)
    batch = {"loss_mask": torch.ones(2, 2)}
    assert gpt.loss_fn(per_token, batch).item() == pytest.approx(2.5)


# ---------------------------------------------------------------------------------------------------------------
# FLOPs
# ---------------------------------------------------------------------------------------------------------------


def megatron_flops(l, h, s, v) -> float:
    return 72 * l * h * h * (1 + s / (6 * h) + v / (12 * l * h))


@pytest.mark.parametrize("l, h, s, v", [(12, 768, 2048, 50304), (24, 2048, 2048, 50304), (4, 192, 128, 1024),
                                        (1, 32, 16, 128)])
def test_flops_per_token_matches_megatron(l, h, s, v):
    cfg = ModelConfig(num_layers=l, hidden_size=h, num_attention_heads=4, seq_length=s)
    assert gpt.flops_per_token(cfg, v) == pytest.approx(megatron_flops(l, h, s, v), rel=1e-12)
    explicit = ModelConfig(num_layers=l, hidden_size=h, num_attention_heads=4, seq_length=s, ffn_hidden_size=4 * h)
    assert gpt.flops_per_token(explicit, v) == gpt.flops_per_token(cfg, v)


def test_flops_125m_magnitude():
    # GPT-3 Small: ~6 N + attention; N ~ 124M params -> ~0.75 GFLOP/token without attention, ~0.98 with.
    cfg = ModelConfig(num_layers=12, hidden_size=768, num_attention_heads=12, seq_length=2048)
    assert 0.9e9 < gpt.flops_per_token(cfg, 50304) < 1.1e9


def test_flops_swiglu_counts_the_gate():
    l, h, s, v, f = 2, 64, 32, 256, 172
    base = ModelConfig(num_layers=l, hidden_size=h, num_attention_heads=4, seq_length=s, ffn_hidden_size=f)
    gated = ModelConfig(num_layers=l, hidden_size=h, num_attention_heads=4, seq_length=s, ffn_hidden_size=f,
                        activation="swiglu")
    # A gated MLP has three h x f matmuls instead of two: 2*h*f more forward FLOPs per layer, x3 for training.
    assert gpt.flops_per_token(gated, v) - gpt.flops_per_token(base, v) == pytest.approx(3 * l * 2 * h * f)


# ---------------------------------------------------------------------------------------------------------------
# transformer_config and the model
# ---------------------------------------------------------------------------------------------------------------


def test_transformer_config_maps_the_model_section():
    cfg = ModelConfig(num_layers=3, hidden_size=48, num_attention_heads=4, seq_length=16, activation="swiglu",
                      hidden_dropout=0.1, attention_dropout=0.2, layernorm_epsilon=1.0e-6)
    tc = gpt.transformer_config(cfg, ParallelConfig(activation_checkpointing="full"), torch.float32)
    assert (tc.num_layers, tc.hidden_size, tc.num_attention_heads, tc.ffn_hidden_size) == (3, 48, 4, 192)
    assert tc.gated_linear_unit is True
    assert (tc.hidden_dropout, tc.attention_dropout, tc.layernorm_epsilon) == (0.1, 0.2, 1.0e-6)
    assert (tc.recompute_granularity, tc.recompute_method, tc.recompute_num_layers) == ("full", "uniform", 1)
    plain = gpt.transformer_config(ModelConfig(ffn_hidden_size=100), ParallelConfig(), torch.bfloat16)
    assert plain.ffn_hidden_size == 100 and plain.gated_linear_unit is False and plain.recompute_granularity is None
    assert plain.bf16 is True and plain.params_dtype == torch.bfloat16


@pytest.fixture(scope="module")
def tiny(mcore_world1):
    torch.manual_seed(0)
    cfg = ModelConfig(num_layers=2, hidden_size=32, num_attention_heads=2, seq_length=16)
    return cfg, gpt.build(cfg, ParallelConfig(), torch.float32, 128)


def test_gpt_build_shapes(tiny):
    cfg, model = tiny
    assert model.embedding.word_embeddings.weight.shape == (128, 32)
    assert model.embedding.position_embeddings.weight.shape == (16, 32)
    assert len(model.decoder.layers) == 2
    assert model.share_embeddings_and_output_weights  # tied, as GPT-2
    assert all(p.dtype == torch.float32 for p in model.parameters())


def test_gpt_loss_at_init_is_about_ln_vocab(tiny):
    _, model = tiny
    rows = np.random.default_rng(1).integers(0, 128, size=(4, 17), dtype=np.int64)
    batch = gpt.batch_fn(rows, DEVICE)
    model.eval()
    try:
        with torch.no_grad():
            per_token = model(**batch["inputs"])
    finally:
        model.train()
    assert per_token.shape == (4, 16)  # per-token loss [b, s]
    loss = gpt.loss_fn(per_token, batch).item()
    assert abs(loss - math.log(128)) < 0.3, loss


def test_gpt_logits_are_causal(tiny):
    """Changing a later token must not change earlier positions' losses (the mask is applied)."""
    _, model = tiny
    rows = np.random.default_rng(2).integers(0, 128, size=(1, 17), dtype=np.int64)
    changed = rows.copy()
    changed[0, 10] = (changed[0, 10] + 1) % 128  # input position 10 (and label of position 9)
    model.eval()
    try:
        with torch.no_grad():
            a = model(**gpt.batch_fn(rows, DEVICE)["inputs"])
            b = model(**gpt.batch_fn(changed, DEVICE)["inputs"])
    finally:
        model.train()
    torch.testing.assert_close(a[:, :9], b[:, :9])
    assert not torch.allclose(a[:, 10:], b[:, 10:])


def test_gpt_trains_a_step(tiny):
    """One AdamW step on a repeated batch lowers its loss (the whole forward/backward path is wired)."""
    cfg, _ = tiny
    torch.manual_seed(0)
    model = gpt.build(cfg, ParallelConfig(), torch.float32, 128)  # its own copy: the shared one stays at init
    rows = np.random.default_rng(3).integers(0, 128, size=(4, 17), dtype=np.int64)
    batch = gpt.batch_fn(rows, DEVICE)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    losses = []
    for _ in range(3):
        opt.zero_grad(set_to_none=True)
        loss = gpt.loss_fn(model(**batch["inputs"]), batch)
        loss.backward()
        assert all(p.grad is not None and torch.isfinite(p.grad).all() for p in model.parameters())
        opt.step()
        losses.append(loss.item())
    assert losses[2] < losses[0] - 0.05, losses


def test_reset_at_eos_isolates_documents_in_the_model(tiny):
    """With data.reset_at_eos the second document's losses do not depend on the first document's tokens."""
    from pretrain.config import Config, DataConfig

    _, model = tiny
    eos = 3
    batch_fn = gpt.make_batch_fn(Config(data=DataConfig(reset_at_eos=True)), {"eos_id": eos})
    rows = np.random.default_rng(3).integers(10, 128, size=(1, 17), dtype=np.int64)
    rows[0, 6] = eos  # document 1 = tokens 0..6, document 2 starts at 7
    changed = rows.copy()
    changed[0, :6] = np.random.default_rng(4).integers(10, 128, size=6)
    model.eval()
    try:
        with torch.no_grad():
            a = model(**batch_fn(rows, np.arange(1), DEVICE)["inputs"])
            b = model(**batch_fn(changed, np.arange(1), DEVICE)["inputs"])
            plain = gpt.make_batch_fn(Config(), {"eos_id": eos})
            c = model(**plain(rows, np.arange(1), DEVICE)["inputs"])
            d = model(**plain(changed, np.arange(1), DEVICE)["inputs"])
    finally:
        model.train()
    assert torch.equal(a[0, 7:], b[0, 7:])  # positions restart and attention stops at the EOS
    assert not torch.allclose(c[0, 7:], d[0, 7:])  # without resets the documents see each other
    assert batch_fn(rows, np.arange(1), DEVICE)["loss_mask"][0, 6] == 0  # no loss on the EOS input position
