"""Generation: the GPT key/value cache gives the logits of full recomputation; sampling rules."""

from __future__ import annotations

import pytest
import torch

from data_pipeline.batches import causal_mask
from pretrain import models
from pretrain.config import ModelConfig, ParallelConfig
from pretrain.models.gpt import GPTDecoder
from pretrain.inference.generation import sample_next

SEQ = 16


@pytest.fixture(scope="module", params=["learned", "rope_scaled"])
def gpt(mcore_world1, request):
    """GPT-2 positions, or rotary ones with Llama 3.1 scaling (original context 8: with head size 8 one frequency
    interpolated, three stretched), whose cached decoding must use the same scaled frequencies."""
    from pretrain.models.init import init_weights

    rope = {"position_embedding": "rope", "rope_scaling_factor": 8.0, "rope_original_max_position_embeddings": 8}
    cfg = ModelConfig(num_layers=2, hidden_size=32, num_attention_heads=4, seq_length=SEQ,
                      **(rope if request.param == "rope_scaled" else {}))
    model = models.gpt.build(cfg, ParallelConfig(), torch.float32, vocab_size=128)
    init_weights([model], seed=3, std=0.2, num_layers=2)  # a large std: logits far from uniform
    return model.eval()


def full_logits(model, ids: list[int]) -> torch.Tensor:
    """Next-token logits [V] after ``ids``, recomputing the whole context."""
    s = len(ids)
    out = model(input_ids=torch.tensor([ids]), position_ids=torch.arange(s)[None],
                attention_mask=torch.from_numpy(causal_mask(s).copy()))  # explicit: independent of mask types
    return out[0, -1]


@torch.no_grad()
def test_kv_cache_matches_full_recompute_through_window_rollover(gpt):
    tokens = [int(t) for t in torch.randint(0, 128, (2 * SEQ + 5,), generator=torch.Generator().manual_seed(0))]
    decoder = GPTDecoder(gpt, SEQ, torch.device("cpu"))
    prompt = 5
    logits = decoder.prefill(tokens[:prompt])
    window_start = 0  # the decoder's context begins here: 0 until the cache fills, then the newest half
    torch.testing.assert_close(logits, full_logits(gpt, tokens[:prompt]), rtol=1e-5, atol=1e-5)
    for t in range(prompt, len(tokens)):
        if t - window_start >= SEQ:
            window_start = t + 1 - SEQ // 2
        logits = decoder.step(tokens[t])
        torch.testing.assert_close(logits, full_logits(gpt, tokens[window_start:t + 1]), rtol=1e-5, atol=1e-5)
    assert window_start > 0  # the rollover was exercised


def test_greedy_and_degenerate_sampling_pick_the_argmax():
    logits = torch.tensor([0.1, 2.0, -1.0, 1.9])
    assert sample_next(logits) == 1
    g = torch.Generator().manual_seed(0)
    assert {sample_next(logits, 5.0, top_k=1, generator=g) for _ in range(50)} == {1}
    assert {sample_next(logits, 5.0, top_p=1e-3, generator=g) for _ in range(50)} == {1}


def test_top_p_keeps_the_nucleus_and_top_k_the_k_best():
    probs = torch.tensor([0.5, 0.3, 0.15, 0.05])
    g = torch.Generator().manual_seed(0)
    nucleus = [sample_next(probs.log(), 1.0, top_p=0.7, generator=g) for _ in range(400)]
    assert set(nucleus) == {0, 1}  # 0.5 < 0.7 needs the second token; 0.8 >= 0.7 stops there
    best3 = [sample_next(probs.log(), 1.0, top_k=3, generator=g) for _ in range(400)]
    assert set(best3) == {0, 1, 2}


def test_full_sampling_follows_the_softmax():
    probs = torch.tensor([0.6, 0.3, 0.1])
    g = torch.Generator().manual_seed(1)
    draws = torch.tensor([sample_next(probs.log(), 1.0, generator=g) for _ in range(3000)])
    frequencies = torch.bincount(draws, minlength=3).float() / len(draws)
    torch.testing.assert_close(frequencies, probs, atol=0.03, rtol=0)
    same = [sample_next(probs.log(), 1.0, generator=torch.Generator().manual_seed(7)) for _ in range(2)]
    assert same[0] == same[1]  # a seed fixes the draw


def test_bert_checkpoints_are_refused_with_one_line():
    from types import SimpleNamespace

    from pretrain import models
    from pretrain.errors import CheckpointError
    from pretrain.inference.generation import generate

    loaded = SimpleNamespace(spec=models.get("bert"), path="runs/x/step_3", cfg=None, model=None, device=None)
    with pytest.raises(CheckpointError, match=r"^runs/x/step_3: bert checkpoints do not generate text") as info:
        generate(loaded, tokenizer=None, prompt="x")
    assert "\n" not in str(info.value)
