"""Transformer-XL: equal to Hugging Face's TransfoXLLMHeadModel (transformers 4.37.2) for the same weights over
two segments with memory; memory semantics (no gradient, = full context, reset per lane); rel_shift and masks;
the stream reader adapter; TP=2 equal to TP=1 with memory.
"""

from __future__ import annotations

import pytest
import torch

from pretrain.errors import ConfigError
from pretrain.config import ModelConfig, ParallelConfig
from pretrain.models.transformer_xl import model as txl
from pretrain.models.transformer_xl.layers import attention_mask, rel_shift
from pretrain.testing import run_distributed

VOCAB, D, HEADS, LAYERS, FFN, TGT, MEM = 256, 64, 4, 3, 96, 12, 16


def model_config(**overrides) -> ModelConfig:
    values = dict(family="transformer_xl", num_layers=LAYERS, hidden_size=D, num_attention_heads=HEADS,
                  ffn_hidden_size=FFN, seq_length=TGT, mem_length=MEM, hidden_dropout=0.0, attention_dropout=0.0)
    return ModelConfig(**{**values, **overrides})


def build_initialised(cfg: ModelConfig, parallel: ParallelConfig = ParallelConfig(), seed: int = 7):
    """Our model with layout-independent weights, with non-zero norms and output bias (init leaves those at 1/0,
    which would not test that they are copied and used)."""
    from megatron.core import parallel_state

    from pretrain.models.init import init_weights

    model = txl.build(cfg, parallel, torch.float32, VOCAB)
    init_weights([model], seed, 0.05, cfg.num_layers)
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if param.ndim == 1:  # the same values on every TP rank of replicated ones, a slice of the whole else
                sharded = getattr(param, "tensor_model_parallel", False)
                full = torch.randn(param.numel() * (parallel.tensor if sharded else 1), generator=generator) * 0.1
                rank = parallel_state.get_tensor_model_parallel_rank() if sharded else 0
                param.copy_(full.view(-1, param.numel())[rank] + (1.0 if "norm.weight" in name else 0.0))
    return model


def hf_model(ours, cfg: ModelConfig):
    """TransfoXLLMHeadModel with plain (non-adaptive) tied softmax, holding our weights."""
    from transformers import TransfoXLConfig, TransfoXLLMHeadModel

    hf_cfg = TransfoXLConfig(vocab_size=VOCAB, cutoffs=[], d_model=D, d_embed=D, n_head=HEADS, d_head=D // HEADS,
                             d_inner=FFN, div_val=1, n_layer=LAYERS, mem_len=cfg.mem_length, clamp_len=cfg.clamp_len,
                             same_length=cfg.same_length, adaptive=False, dropout=0.0, dropatt=0.0, untie_r=False,
                             pre_lnorm=False, layer_norm_epsilon=cfg.layernorm_epsilon)
    model = TransfoXLLMHeadModel(hf_cfg).eval()
    mine = dict(ours.named_parameters())
    state = {"transformer.word_emb.emb_layers.0.weight": mine["embedding.word_embeddings.weight"],
             "crit.out_layers.0.weight": mine["embedding.word_embeddings.weight"],
             "crit.out_layers.0.bias": mine["output_layer.bias"],
             "transformer.r_w_bias": mine["r_w_bias"], "transformer.r_r_bias": mine["r_r_bias"]}
    for i in range(LAYERS):
        ours_l, hf_l = f"decoder.layers.{i}.", f"transformer.layers.{i}."
        # ours: rows [head, (q, k, v), d_head]; the reference: [(q, k, v), head, d_head]
        qkv = mine[ours_l + "dec_attn.qkv_net.weight"].view(HEADS, 3, D // HEADS, D).transpose(0, 1)
        state[hf_l + "dec_attn.qkv_net.weight"] = qkv.reshape(3 * D, D)
        for ours_name, hf_name in [("dec_attn.r_net", "dec_attn.r_net"), ("dec_attn.o_net", "dec_attn.o_net"),
                                   ("pos_ff.layer_1", "pos_ff.CoreNet.0"), ("pos_ff.layer_2", "pos_ff.CoreNet.3")]:
            state[hf_l + hf_name + ".weight"] = mine[ours_l + ours_name + ".weight"]
        for ours_name, hf_name in [("pos_ff.layer_1", "pos_ff.CoreNet.0"), ("pos_ff.layer_2", "pos_ff.CoreNet.3"),
                                   ("dec_attn.layer_norm", "dec_attn.layer_norm"),
                                   ("pos_ff.layer_norm", "pos_ff.layer_norm")]:
            state[hf_l + hf_name + ".bias"] = mine[ours_l + ours_name + ".bias"]
        for norm in ("dec_attn.layer_norm", "pos_ff.layer_norm"):
            state[hf_l + norm + ".weight"] = mine[ours_l + norm + ".weight"]
    missing, unexpected = model.load_state_dict({k: v.detach().clone() for k, v in state.items()}, strict=False)
    # Not loaded by name: the position frequencies (a buffer) and the layers' views of the shared u and v.
    assert not unexpected and all(k.endswith("inv_freq") or ".dec_attn.r_" in k for k in missing), missing
    assert model.transformer.layers[0].dec_attn.r_w_bias is model.transformer.r_w_bias
    return model


def tokens(b: int, s: int, seed: int) -> torch.Tensor:
    return torch.randint(0, VOCAB, (b, s), generator=torch.Generator().manual_seed(seed))


# -- equivalence with the reference (Hugging Face port) ---------------------------------------------------------


@pytest.mark.parametrize("variant", [
    {}, {"clamp_len": 5}, {"same_length": True, "eval_same_length": True}, {"mem_length": 7}])
def test_two_segments_with_memory_equal_hf(mcore_world1, variant):
    pytest.importorskip("transformers")
    cfg = model_config(**variant)
    ours = build_initialised(cfg).eval()
    reference = hf_model(ours, cfg)
    b = 3
    ids = tokens(b, 2 * TGT + 1, seed=1)
    hf_mems = [torch.empty(0, b, D)] * LAYERS  # HF's default memory is zeros, which attention would see
    our_mems = None
    with torch.no_grad():
        for k in range(2):
            segment = ids[:, k * TGT:(k + 1) * TGT]
            labels = ids[:, k * TGT + 1:(k + 1) * TGT + 1]
            out = reference(input_ids=segment, mems=hf_mems)
            logits, new_mems = ours.forward_segment(segment, our_mems)
            losses, _ = ours.forward_segment(segment, our_mems, labels)
            torch.testing.assert_close(torch.log_softmax(logits, dim=-1), out.prediction_scores, rtol=0, atol=2e-5)
            expected = -out.prediction_scores.gather(-1, labels[..., None])[..., 0]
            torch.testing.assert_close(losses, expected, rtol=0, atol=2e-5)
            assert len(new_mems) == LAYERS and new_mems[0].shape == (min(cfg.mem_length, (k + 1) * TGT), b, D)
            for mine, theirs in zip(new_mems, out.mems):
                torch.testing.assert_close(mine, theirs, rtol=0, atol=1e-5)
            hf_mems, our_mems = out.mems, new_mems


def test_memory_equals_full_context_and_gets_no_gradient(mcore_world1):
    """With memory covering everything before, segment 2 sees exactly what one long segment would (relative
    positions, no clamp); its stored memory carries no autograd graph, so the loss reaches only this segment."""
    cfg = model_config(seq_length=2 * TGT, mem_length=2 * TGT)
    model = build_initialised(cfg).train()  # dropout is 0: train mode only keeps autograd on
    ids = tokens(2, 2 * TGT, seed=2)
    full, _ = model.forward_segment(ids)
    first, mems = model.forward_segment(ids[:, :TGT])
    second, _ = model.forward_segment(ids[:, TGT:], mems)
    torch.testing.assert_close(torch.cat([first, second], dim=1), full, rtol=0, atol=1e-5)
    assert all(m.grad_fn is None and not m.requires_grad for m in mems)
    # The gradient of segment 2's loss with the stored memory equals that with a constant copy of it.
    grads = []
    for memory in (mems, [m.clone() for m in mems]):
        model.zero_grad(set_to_none=True)
        model.forward_segment(ids[:, TGT:], memory, ids[:, TGT:])[0].mean().backward()
        grads.append(torch.cat([p.grad.flatten() for p in model.parameters() if p.grad is not None]))
    torch.testing.assert_close(grads[0], grads[1], rtol=0, atol=0)


def test_forward_keeps_memory_per_lane_and_resets_at_offset_zero(mcore_world1):
    model = build_initialised(model_config()).eval()
    ids = tokens(2, 3 * TGT, seed=3)
    segs = [ids[:, k * TGT:(k + 1) * TGT] for k in range(3)]
    lanes = torch.tensor([5, 9])

    def positions(offset, order=(0, 1)):
        return torch.stack([lanes[list(order)], torch.full((2,), offset)], dim=1)

    with torch.no_grad():
        expected, mems = [], None
        for seg in segs:
            logits, mems = model.forward_segment(seg, mems)
            expected.append(logits)
        got = [model(segs[k], positions(k * TGT)) for k in range(2)]
        # Lanes may come back in another row order: memory follows the lane, not the row.
        swapped = model(segs[2][[1, 0]], positions(2 * TGT, order=(1, 0)))
        for k in range(2):
            torch.testing.assert_close(got[k], expected[k], rtol=0, atol=1e-6)
        torch.testing.assert_close(swapped[[1, 0]], expected[2], rtol=0, atol=1e-6)
        # Offset 0 (the lane restarts) or a gap in offsets: no memory, like the first segment.
        fresh = model.forward_segment(segs[1])[0]
        torch.testing.assert_close(model(segs[1], positions(0)), fresh, rtol=0, atol=1e-6)
        torch.testing.assert_close(model(segs[1], positions(7 * TGT)), fresh, rtol=0, atol=1e-6)
        # Training mode keeps its own store: the eval passes above left it empty.
        assert model._memory["train"] == {}


def test_generation_cache_equals_full_recomputation(mcore_world1):
    """pretrain generate's MemoryDecoder (the prompt as one segment, then segments of one token attending to the
    memory, in eval mode: eval_mem_length, same_length) gives, while the context fits the evaluation memory,
    the logits one forward over the whole context gives."""
    from pretrain.models.transformer_xl.model import MemoryDecoder

    model = build_initialised(model_config(eval_mem_length=24, eval_same_length=True)).eval()
    ids = tokens(1, 20, seed=6)[0].tolist()
    decoder = MemoryDecoder(model, TGT, torch.device("cpu"))
    with torch.no_grad():
        cached = [decoder.prefill(ids[:8])] + [decoder.step(token) for token in ids[8:]]  # 13 x [V]
        full, _ = model.forward_segment(torch.tensor([ids]))  # [1, 20, V]
    torch.testing.assert_close(torch.stack(cached), full[0, 7:], rtol=0, atol=1e-5)
    assert decoder.mems[0].shape == (20, 1, D)


def test_generation_without_memory_reencodes_the_newest_window(mcore_world1):
    """With evaluation memory 0 there is no cache: each step sees the newest seq_length tokens, not one token."""
    from pretrain.models.transformer_xl.model import MemoryDecoder

    model = build_initialised(model_config(mem_length=0, eval_mem_length=0)).eval()
    ids = tokens(1, TGT + 5, seed=7)[0].tolist()
    decoder = MemoryDecoder(model, TGT, torch.device("cpu"))
    with torch.no_grad():
        decoder.prefill(ids[:4])
        for token in ids[4:-1]:
            decoder.step(token)
        last = decoder.step(ids[-1])
        window, _ = model.forward_segment(torch.tensor([ids[-TGT:]]))  # [1, TGT, V]
    torch.testing.assert_close(last, window[0, -1], rtol=0, atol=1e-5)


def test_sequence_parallel_is_refused_with_one_line(mcore_world1):
    with pytest.raises(ConfigError, match=r"^parallel.sequence_parallel: not supported for model.family "
                                          r"transformer_xl$"):
        txl.build(model_config(), ParallelConfig(sequence_parallel=True), torch.float32, VOCAB)


def test_memory_state_dict_round_trip(mcore_world1):
    model = build_initialised(model_config()).train()
    ids = tokens(2, 2 * TGT, seed=4)
    pos = torch.tensor([[0, 0], [1, 0]])
    with torch.no_grad():
        model(ids[:, :TGT], pos)
        state = model.memory_state_dict()
        expected = model(ids[:, TGT:], pos + torch.tensor([0, TGT]))
        other = build_initialised(model_config()).train()
        other.load_memory_state_dict(state)
        torch.testing.assert_close(other(ids[:, TGT:], pos + torch.tensor([0, TGT])), expected, rtol=0, atol=0)
    assert state["train"][0]["lanes"] == [0, 1] and state["train"][0]["mems"][0].shape == (TGT, 2, D)


# -- pieces --------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("qlen, mlen", [(4, 0), (4, 3), (1, 5)])
def test_rel_shift_aligns_each_query_with_its_distances(qlen, mlen):
    klen = qlen + mlen
    x = torch.randn(qlen, klen, 2)  # column c: distance klen - 1 - c, the same for every query
    shifted = rel_shift(x)
    for i in range(qlen):
        for j in range(mlen + i + 1):  # keys the query may see
            distance = mlen + i - j
            torch.testing.assert_close(shifted[i, j], x[i, klen - 1 - distance])


def test_attention_masks():
    causal = attention_mask(3, 2, 2, False, torch.device("cpu"))[:, :, 0]
    assert causal.tolist() == [[False, False, False, True, True], [False, False, False, False, True],
                               [False] * 5]
    # same_length with a full memory (mem_len 2): every query sees mem_len keys, itself and the one before
    same = attention_mask(3, 2, 2, True, torch.device("cpu"))[:, :, 0]
    assert same.tolist() == [[True, False, False, True, True], [True, True, False, False, True],
                             [True, True, True, False, False]]
    # ... while the memory is not full yet, and without memory, it is the causal mask
    assert attention_mask(3, 0, 0, True, torch.device("cpu")).equal(attention_mask(3, 0, 0, False,
                                                                                  torch.device("cpu")))
    assert attention_mask(3, 1, 8, True, torch.device("cpu")).equal(attention_mask(3, 1, 8, False,
                                                                                  torch.device("cpu")))


def test_flops_per_token_counts_memory():
    base = txl.flops_per_token(model_config(mem_length=0), VOCAB)
    assert txl.flops_per_token(model_config(), VOCAB) > base > 0


# -- tensor parallelism ------------------------------------------------------------------------------------------


def _tp_outputs(tp: int) -> dict:
    """In a spawned group: two segments with memory at TP=tp (forward and backward); full logits, losses,
    memory and the gradient of u gathered on every rank."""
    import torch.distributed as dist
    from megatron.core import parallel_state
    from megatron.core.tensor_parallel.random import model_parallel_cuda_manual_seed

    parallel_state.initialize_model_parallel(tp, 1)
    model_parallel_cuda_manual_seed(0)
    model = build_initialised(model_config(), ParallelConfig(tensor=tp)).train()
    ids = tokens(2, 2 * TGT + 1, seed=5)
    mems, out = None, {}
    for k in range(2):
        seg, labels = ids[:, k * TGT:(k + 1) * TGT], ids[:, k * TGT + 1:(k + 1) * TGT + 1]
        with torch.no_grad():
            logits, _ = model.forward_segment(seg, mems)
        losses, mems = model.forward_segment(seg, mems, labels)
        losses.mean().backward()
        parts = [torch.empty_like(logits) for _ in range(tp)]
        dist.all_gather(parts, logits.contiguous())
        out[f"logits{k}"], out[f"loss{k}"] = torch.cat(parts, dim=-1), losses.detach()
    grads = [torch.empty_like(model.r_w_bias.grad) for _ in range(tp)]
    dist.all_gather(grads, model.r_w_bias.grad)
    out["mems"], out["u_grad"] = [m.clone() for m in mems], torch.cat(grads)
    parallel_state.destroy_model_parallel()
    return out


def test_tensor_parallel_2_equals_1():
    single = run_distributed(_tp_outputs, 1, args=(1,))[0]
    pair = run_distributed(_tp_outputs, 2, args=(2,))
    for rank in range(2):
        for key in ("logits0", "logits1", "loss0", "loss1", "u_grad"):
            torch.testing.assert_close(pair[rank][key], single[key], rtol=1e-5, atol=1e-5, msg=key)
        for mine, ref in zip(pair[rank]["mems"], single["mems"]):
            torch.testing.assert_close(mine, ref, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("recompute, refused", [("full", True), ("selective", False), ("none", False)])
def test_full_recompute_is_refused_by_the_family_check(recompute, refused):
    """Full recomputation would run each segment twice and advance its memory twice: the family's check_config
    (what `train` and `--dry-run` call) refuses it in one line naming the key."""
    from pretrain import models
    from pretrain.config import load
    from tests.conftest import REPO

    cfg = load(REPO / "configs" / "txl" / "tiny.yaml", [f"--parallel.activation_checkpointing={recompute}"])
    if refused:
        with pytest.raises(ConfigError, match=r"^parallel\.activation_checkpointing: full recomputation"):
            models.get("transformer_xl").check_config(cfg)
    else:
        models.get("transformer_xl").check_config(cfg)
