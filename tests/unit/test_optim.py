"""LR schedule (a pure function of the step) and AdamW parameter groups on a real megatron-core GPT."""

from __future__ import annotations

import math

import pytest
import torch

from pretrain.config import ModelConfig, OptimConfig, ParallelConfig
from pretrain.optim import build_optimizer, lr_at, param_groups

LR, MIN_LR, WARMUP, TOTAL = 1.0e-3, 1.0e-4, 10, 110  # 100 decay steps after warmup


def cfg(schedule="cosine", **kw) -> OptimConfig:
    return OptimConfig(**{"lr": LR, "min_lr": MIN_LR, "warmup_steps": WARMUP, "schedule": schedule, **kw})


# ---------------------------------------------------------------------------------------------------------------
# lr_at
# ---------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("schedule", ["cosine", "linear", "constant"])
def test_warmup_is_linear_from_lr_over_warmup_to_lr(schedule):
    c = cfg(schedule)
    lrs = [lr_at(s, c, TOTAL) for s in range(WARMUP)]
    assert lrs[0] == pytest.approx(LR / WARMUP)
    assert lrs[-1] == pytest.approx(LR)
    for step, value in enumerate(lrs):
        assert value == pytest.approx(LR * (step + 1) / WARMUP)
    diffs = [b - a for a, b in zip(lrs, lrs[1:])]
    assert all(d == pytest.approx(LR / WARMUP) for d in diffs)


def test_no_warmup_starts_at_peak():
    assert lr_at(0, cfg(warmup_steps=0), TOTAL) == pytest.approx(LR)
    assert lr_at(0, cfg("linear", warmup_steps=0), TOTAL) == pytest.approx(LR)


def test_cosine_values():
    c = cfg("cosine")
    assert lr_at(WARMUP, c, TOTAL) == pytest.approx(LR)  # decay starts at the peak
    assert lr_at(WARMUP + 50, c, TOTAL) == pytest.approx((LR + MIN_LR) / 2)  # half way
    quarter = MIN_LR + 0.5 * (1 + math.cos(math.pi / 4)) * (LR - MIN_LR)
    assert lr_at(WARMUP + 25, c, TOTAL) == pytest.approx(quarter)
    assert lr_at(TOTAL, c, TOTAL) == pytest.approx(MIN_LR)  # the end of the decay is exactly min_lr
    assert lr_at(TOTAL - 1, c, TOTAL) > MIN_LR


@pytest.mark.parametrize("schedule", ["cosine", "linear"])
def test_decay_ends_at_min_lr_and_stays(schedule):
    c = cfg(schedule)
    for step in (TOTAL, TOTAL + 1, 2 * TOTAL, 10 ** 6):
        assert lr_at(step, c, TOTAL) == pytest.approx(MIN_LR, rel=1e-12)


def test_linear_values():
    c = cfg("linear")
    assert lr_at(WARMUP, c, TOTAL) == pytest.approx(LR)
    assert lr_at(WARMUP + 25, c, TOTAL) == pytest.approx(MIN_LR + 0.75 * (LR - MIN_LR))
    assert lr_at(WARMUP + 50, c, TOTAL) == pytest.approx((LR + MIN_LR) / 2)
    # Equal steps down.
    lrs = [lr_at(s, c, TOTAL) for s in range(WARMUP, TOTAL + 1)]
    assert all(b - a == pytest.approx(-(LR - MIN_LR) / 100) for a, b in zip(lrs, lrs[1:]))


def test_constant_holds_peak_after_warmup():
    c = cfg("constant")
    assert all(lr_at(s, c, TOTAL) == LR for s in range(WARMUP, 3 * TOTAL, 7))
    assert lr_at(WARMUP - 1, c, TOTAL) == pytest.approx(LR)
    assert lr_at(0, c, TOTAL) < LR


def test_explicit_decay_steps_override_total_steps():
    c = cfg("cosine", decay_steps=60)  # decay over steps 10..60, whatever train.steps says
    assert lr_at(35, c, TOTAL) == pytest.approx((LR + MIN_LR) / 2)
    assert lr_at(60, c, TOTAL) == pytest.approx(MIN_LR)
    assert lr_at(100, c, TOTAL) == pytest.approx(MIN_LR)
    assert lr_at(60, c, 10_000) == pytest.approx(MIN_LR)  # total_steps is ignored when decay_steps is set


@pytest.mark.parametrize("schedule", ["cosine", "linear", "constant"])
def test_monotonic_non_increasing_after_warmup_and_bounded(schedule):
    c = cfg(schedule)
    lrs = [lr_at(s, c, TOTAL) for s in range(WARMUP, TOTAL + 20)]
    assert all(b <= a + 1e-15 for a, b in zip(lrs, lrs[1:]))
    assert all(MIN_LR - 1e-15 <= v <= LR + 1e-15 for v in lrs)
    if schedule != "constant":
        assert lrs[0] > lrs[len(lrs) // 2] > lrs[-1] - 1e-15  # it really decays


def test_lr_is_a_pure_function_of_the_step():
    c = cfg("cosine")
    forward = [lr_at(s, c, TOTAL) for s in range(TOTAL)]
    backward = [lr_at(s, c, TOTAL) for s in reversed(range(TOTAL))][::-1]
    assert forward == backward


# ---------------------------------------------------------------------------------------------------------------
# param_groups on a real GPTModel
# ---------------------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def gpt(mcore_world1):
    from pretrain.models import gpt as gpt_mod

    torch.manual_seed(0)
    return gpt_mod.build(ModelConfig(num_layers=2, hidden_size=32, num_attention_heads=2, seq_length=16),
                         ParallelConfig(), torch.float32, 128)


def test_param_groups_split_by_dimension(gpt):
    decay, no_decay = param_groups(gpt, weight_decay=0.1)
    assert decay["weight_decay"] == 0.1 and no_decay["weight_decay"] == 0.0
    assert decay["params"] and no_decay["params"]
    assert all(p.ndim == 2 for p in decay["params"])
    assert all(p.ndim == 1 for p in no_decay["params"])

    names = {id(p): n for n, p in gpt.named_parameters()}
    no_decay_names = {names[id(p)] for p in no_decay["params"]}
    decay_names = {names[id(p)] for p in decay["params"]}
    # Biases and norm weights do not decay; matrices (incl. the embeddings) do.
    assert all(n.endswith(".bias") or "layernorm" in n or "norm" in n for n in no_decay_names), no_decay_names
    assert any("final_layernorm.weight" in n for n in no_decay_names)
    assert any("input_layernorm.weight" in n for n in no_decay_names)
    assert any("linear_qkv.bias" in n for n in no_decay_names)
    assert "embedding.word_embeddings.weight" in decay_names
    assert "embedding.position_embeddings.weight" in decay_names
    assert any("linear_fc1.weight" in n for n in decay_names)
    assert not any(n.endswith(".bias") for n in decay_names)


def test_param_groups_cover_every_trainable_param_once(gpt):
    groups = param_groups(gpt, weight_decay=0.1)
    grouped = [id(p) for g in groups for p in g["params"]]
    trainable = [id(p) for p in gpt.parameters() if p.requires_grad]
    assert len(grouped) == len(set(grouped)), "a parameter is in two groups (or twice in one)"
    assert sorted(grouped) == sorted(trainable)
    assert sum(p.numel() for g in groups for p in g["params"]) == sum(p.numel() for p in gpt.parameters())
    # Tied embeddings: the output layer reuses the word embedding, which is therefore counted once.
    assert gpt.share_embeddings_and_output_weights


def test_param_groups_skip_frozen(gpt):
    frozen = gpt.embedding.position_embeddings.weight
    frozen.requires_grad_(False)
    try:
        groups = param_groups(gpt, weight_decay=0.1)
        assert all(p is not frozen for g in groups for p in g["params"])
        trainable = sum(1 for p in gpt.parameters() if p.requires_grad)
        assert sum(len(g["params"]) for g in groups) == trainable
    finally:
        frozen.requires_grad_(True)


def test_build_optimizer_is_adamw_with_config(gpt):
    c = OptimConfig(lr=2.0e-4, beta1=0.8, beta2=0.9, eps=1.0e-6, weight_decay=0.05)
    opt = build_optimizer(gpt, c)
    assert isinstance(opt, torch.optim.AdamW)
    assert [g["weight_decay"] for g in opt.param_groups] == [0.05, 0.0]
    for g in opt.param_groups:
        assert g["lr"] == 2.0e-4 and g["betas"] == (0.8, 0.9) and g["eps"] == 1.0e-6
