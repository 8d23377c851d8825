"""SDPAttention (pretrain/models/attention.py) against megatron-core's unfused DotProductAttention: same outputs
and gradients for causal, per-document, grouped-query and decode-step attention; dropout under the RNG tracker."""

from __future__ import annotations

import pytest
import torch
from megatron.core import tensor_parallel
from megatron.core.transformer import TransformerConfig
from megatron.core.transformer.dot_product_attention import DotProductAttention
from megatron.core.transformer.enums import AttnMaskType

from data_pipeline.batches import causal_mask
from pretrain.models.attention import SDPAttention


def _pair(mcore_world1, heads=4, groups=None, dropout=0.0):
    config = TransformerConfig(num_layers=1, hidden_size=8 * heads, num_attention_heads=heads,
                               num_query_groups=groups, attention_dropout=dropout, use_cpu_initialization=True,
                               cuda_graph_scope=[])
    make = dict(config=config, layer_number=1, attn_mask_type=AttnMaskType.causal, attention_type="self")
    return DotProductAttention(**make), SDPAttention(**make)


def _qkv(sq, sk, b, heads, groups, d=8, seed=0):
    g = torch.Generator().manual_seed(seed)
    q = torch.randn(sq, b, heads, d, generator=g, requires_grad=True)
    k, v = (torch.randn(sk, b, groups, d, generator=g, requires_grad=True) for _ in range(2))
    return q, k, v


def _run(module, q, k, v, mask, **kwargs):
    for t in (q, k, v):
        t.grad = None
    out = module(q, k, v, mask, **kwargs)
    (out * torch.linspace(-1, 1, out.numel()).view_as(out)).sum().backward()  # a non-uniform upstream gradient
    return out.detach(), [t.grad.clone() for t in (q, k, v)]


def _assert_same(a, b):
    (out_a, grads_a), (out_b, grads_b) = a, b
    torch.testing.assert_close(out_a, out_b, atol=1e-5, rtol=1e-4)
    for ga, gb in zip(grads_a, grads_b):
        torch.testing.assert_close(ga, gb, atol=1e-5, rtol=1e-4)


def test_causal_without_a_mask_tensor_matches_the_explicit_causal_mask(mcore_world1):
    unfused, sdpa = _pair(mcore_world1)
    q, k, v = _qkv(12, 12, 3, 4, 4)
    mask = torch.from_numpy(causal_mask(12).copy())
    reference = _run(unfused, q, k, v, mask)
    _assert_same(_run(sdpa, q, k, v, None), reference)  # what gpt.batch_fn passes for plain packing
    _assert_same(_run(sdpa, q, k, v, mask), reference)  # explicit masks still work (generation, fine-tuning)
    assert reference[0].shape == (12, 3, 32)  # [sq, b, n*d]


def test_per_document_mask_matches(mcore_world1):
    unfused, sdpa = _pair(mcore_world1)
    q, k, v = _qkv(10, 10, 2, 4, 4, seed=1)
    future = torch.from_numpy(causal_mask(10).copy())[0, 0]
    doc = torch.tensor([[0] * 4 + [1] * 6, [0] * 7 + [1] * 3])  # [b, s]: document id per position
    mask = (future[None] | (doc[:, :, None] != doc[:, None, :]))[:, None]  # [b, 1, s, s], True = masked
    _assert_same(_run(sdpa, q, k, v, mask), _run(unfused, q, k, v, mask))


def test_grouped_query_attention_matches(mcore_world1):
    unfused, sdpa = _pair(mcore_world1, heads=4, groups=2)
    q, k, v = _qkv(8, 8, 2, 4, 2, seed=2)
    mask = torch.from_numpy(causal_mask(8).copy())
    _assert_same(_run(sdpa, q, k, v, None), _run(unfused, q, k, v, mask))


def test_decode_step_attends_to_every_cached_key(mcore_world1):
    unfused, sdpa = _pair(mcore_world1)
    q, k, v = _qkv(1, 6, 2, 4, 4, seed=3)  # one new query against six cached keys, as in generation
    _assert_same(_run(sdpa, q, k, v, None, attn_mask_type=AttnMaskType.no_mask),
                 _run(unfused, q, k, v, None, attn_mask_type=AttnMaskType.no_mask))


def test_dropout_uses_the_model_parallel_rng_and_is_off_in_eval(mcore_world1):
    _, sdpa = _pair(mcore_world1, dropout=0.5)
    q, k, v = _qkv(8, 8, 2, 4, 4, seed=4)
    tracker = tensor_parallel.get_cuda_rng_tracker()

    def forward():
        tracker.reset()
        tracker.add("model-parallel-rng", 1234)
        with torch.no_grad():
            return sdpa(q, k, v, None)

    sdpa.train()
    first, again = forward(), forward()
    torch.testing.assert_close(first, again)  # the tracker's seed decides the dropout mask
    sdpa.eval()
    plain = forward()
    assert not torch.allclose(first, plain)
    sdpa.train()


def test_unsupported_settings_are_refused(mcore_world1):
    config = TransformerConfig(num_layers=1, hidden_size=16, num_attention_heads=2, use_cpu_initialization=True,
                               apply_query_key_layer_scaling=True, fp16=True, cuda_graph_scope=[])
    with pytest.raises(ValueError, match="layer scaling"):
        SDPAttention(config=config, layer_number=1, attn_mask_type=AttnMaskType.causal, attention_type="self")
