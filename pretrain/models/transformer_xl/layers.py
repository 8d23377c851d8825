"""Transformer-XL layers on megatron-core tensor-parallel linears (Dai et al. 2019).

A faithful port of the reference ``kimiyoung/transformer-xl`` ``pytorch/mem_transformer.py`` (attn_type 0):
``RelPartialLearnableMultiHeadAttn`` + ``PositionwiseFF`` with post-LayerNorm, relative sinusoid positions
projected by ``r_net``, the global biases u (``r_w_bias``) and v (``r_r_bias``), and the ``_rel_shift`` trick.
Tensors are sequence first like the reference (``[s, b, h]``); heads are split over tensor-parallel ranks: each
rank holds its heads' rows of qkv_net / r_net / u / v and its columns of o_net, so attention runs per rank with
one all-reduce after o_net, as megatron-core's own attention does.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from megatron.core import tensor_parallel
from megatron.core.tensor_parallel.random import get_cuda_rng_tracker
from megatron.core.transformer import TransformerConfig


def dropout(x: torch.Tensor, p: float, training: bool, sharded: bool = False) -> torch.Tensor:
    """Dropout; on a tensor-parallel shard (per-head or per-FF-column values) each TP rank draws its own mask
    from megatron-core's model-parallel RNG stream, while replicated tensors draw from the default stream, which
    every TP rank advances alike, so their masks agree across the TP group."""
    if not training or p == 0.0:
        return x
    if sharded:
        with get_cuda_rng_tracker().fork():
            return F.dropout(x, p, True)
    return F.dropout(x, p, True)


def sinusoid_positions(klen: int, d_model: int, clamp_len: int, device: torch.device,
                       dtype: torch.dtype) -> torch.Tensor:
    """[klen, d_model] relative encodings for distances klen-1 ... 0 (the reference's ``PositionalEmbedding``:
    ``cat([sin, cos])`` of distance x inverse frequency), distances above ``clamp_len`` > 0 clamped to it.

    Computed in fp32 and cast: the frequencies are not a parameter or buffer, so a bf16 cast of the module does
    not round them.
    """
    pos_seq = torch.arange(klen - 1, -1, -1.0, device=device)  # [klen]
    if clamp_len > 0:
        pos_seq = pos_seq.clamp(max=clamp_len)
    inv_freq = 1.0 / (10000 ** (torch.arange(0.0, d_model, 2.0, device=device) / d_model))  # [d/2]
    sinusoid = torch.outer(pos_seq, inv_freq)  # [klen, d/2]
    return torch.cat([sinusoid.sin(), sinusoid.cos()], dim=-1).to(dtype)  # [klen, d]


def attention_mask(qlen: int, mlen: int, mem_len: int, same_length: bool, device: torch.device) -> torch.Tensor:
    """[qlen, klen, 1] bool, True where a query may NOT attend (the reference's ``dec_attn_mask``).

    Query i (at stream position mlen + i) sees the mlen memory positions and current positions <= i:
    ``triu(ones(qlen, klen), 1 + mlen)``. ``same_length``: once klen exceeds mem_len, every query sees the same
    number of keys (mem_len, itself included), so later queries of a segment do not get more context than
    earlier ones (the reference turns it on for evaluation). Without memory (mem_len 0) it is ignored: the
    reference's formula would then mask every key, itself included, and the softmax would be NaN.
    """
    klen = mlen + qlen
    ones = torch.ones(qlen, klen, dtype=torch.bool, device=device)
    mask = torch.triu(ones, diagonal=1 + mlen)
    if same_length and mem_len > 0:
        mask_len = klen - mem_len
        mask_shift_len = qlen - mask_len if mask_len > 0 else qlen
        mask = mask | torch.tril(ones, diagonal=-mask_shift_len)
    return mask[:, :, None]


def rel_shift(x: torch.Tensor) -> torch.Tensor:
    """The reference's ``_rel_shift``: [qlen, klen, ...] scores against positions klen-1 ... 0 (the same for every
    query) -> scores in which query i's key j holds the entry for distance (mlen + i) - j.

    Padding a zero column, viewing the [qlen, klen + 1] block as [klen + 1, qlen] and dropping the first row
    shifts row i left by qlen - 1 - i without gathering. Entries that wrap around are garbage, but they sit
    exactly where the causal mask hides keys after the query.
    """
    zero_pad = x.new_zeros((x.size(0), 1) + x.shape[2:])  # [q, 1, ...]
    padded = torch.cat([zero_pad, x], dim=1).view((x.size(1) + 1, x.size(0)) + x.shape[2:])  # [k+1, q, ...]
    return padded[1:].view_as(x)


class RelPartialLearnableMultiHeadAttn(torch.nn.Module):
    """Relative multi-head attention with memory, post-LayerNorm; this TP rank's heads only.

    ``qkv_net`` rows are laid out per head as ``[head, (q, k, v), d_head]`` (megatron-core's convention), so a
    contiguous split over TP ranks hands each rank whole heads with their q, k and v. The reference's layout is
    ``[(q, k, v), head, d_head]``; tests convert between the two when copying weights.
    """

    def __init__(self, config: TransformerConfig, n_head: int, d_model: int, d_head: int, dropout_p: float,
                 dropatt: float, layernorm_epsilon: float, own_biases: bool, recompute_core: bool):
        super().__init__()
        tp = config.tensor_model_parallel_size
        self.n_head_local, self.d_head = n_head // tp, d_head
        self.dropout_p, self.dropatt = dropout_p, dropatt
        self.scale = 1.0 / math.sqrt(d_head)
        self.recompute_core = recompute_core
        init = config.init_method
        self.qkv_net = tensor_parallel.ColumnParallelLinear(d_model, 3 * n_head * d_head, config=config,
                                                            init_method=init, bias=False, gather_output=False)
        self.r_net = tensor_parallel.ColumnParallelLinear(d_model, n_head * d_head, config=config,
                                                          init_method=init, bias=False, gather_output=False)
        self.o_net = tensor_parallel.RowParallelLinear(n_head * d_head, d_model, config=config, init_method=init,
                                                       bias=False, input_is_parallel=True, skip_bias_add=False)
        self.layer_norm = torch.nn.LayerNorm(d_model, eps=layernorm_epsilon, dtype=config.params_dtype)
        # untie_r: each layer learns its own u and v; else the model passes the shared pair to forward().
        self.r_w_bias = head_bias(n_head, d_head, config) if own_biases else None
        self.r_r_bias = head_bias(n_head, d_head, config) if own_biases else None

    def forward(self, w: torch.Tensor, r: torch.Tensor, r_w_bias: torch.Tensor | None,
                r_r_bias: torch.Tensor | None, mask: torch.Tensor, mem: torch.Tensor | None) -> torch.Tensor:
        """w [q, b, d] (this segment), r [klen, d] (relative encodings), mask [q, klen, 1], mem [m, b, d] or None
        (earlier segments' inputs to this layer, no gradient) -> [q, b, d]."""
        qlen, bsz = w.shape[0], w.shape[1]
        u = self.r_w_bias if self.r_w_bias is not None else r_w_bias  # [n_local, d_head]
        v = self.r_r_bias if self.r_r_bias is not None else r_r_bias
        cat = w if mem is None or mem.shape[0] == 0 else torch.cat([mem, w], dim=0)  # [klen, b, d]
        klen = cat.shape[0]
        w_heads, _ = self.qkv_net(cat)  # [klen, b, 3 * n_local * d_head]
        w_heads = w_heads.view(klen, bsz, self.n_head_local, 3, self.d_head)
        q, k, val = w_heads.unbind(dim=3)  # each [klen, b, n_local, d_head]
        q = q[-qlen:]  # [q, b, n, d_head]: only this segment's positions ask queries
        r_head_k, _ = self.r_net(r[:, None])  # [klen, 1, n_local * d_head]
        r_head_k = r_head_k.view(klen, self.n_head_local, self.d_head)
        args = (q, k, val, r_head_k, u, v, mask)
        if self.recompute_core and self.training:  # selective recompute: scores are large, cheap to redo
            attn_vec = tensor_parallel.checkpoint(self._core, False, *args)
        else:
            attn_vec = self._core(*args)
        attn_out, _ = self.o_net(attn_vec.reshape(qlen, bsz, self.n_head_local * self.d_head))  # [q, b, d]
        attn_out = dropout(attn_out, self.dropout_p, self.training)
        return self.layer_norm(w + attn_out)  # post-LN residual

    def _core(self, q, k, val, r_head_k, u, v, mask) -> torch.Tensor:
        """Scores (content AC + position BD), masked softmax, weighted values: [q, b, n_local, d_head]."""
        ac = torch.einsum("ibnd,jbnd->ijbn", q + u, k)  # [q, klen, b, n]
        bd = rel_shift(torch.einsum("ibnd,jnd->ijbn", q + v, r_head_k))  # [q, klen, b, n]
        score = (ac + bd) * self.scale
        # Softmax in fp32 (bf16 training); a masked score is -inf, never a whole row (a query sees itself).
        score = score.float().masked_fill(mask[:, :, :, None], float("-inf"))
        prob = F.softmax(score, dim=1).type_as(val)
        prob = dropout(prob, self.dropatt, self.training, sharded=True)
        return torch.einsum("ijbn,jbnd->ibnd", prob, val)  # [q, b, n, d_head]


class PositionwiseFF(torch.nn.Module):
    """The reference's ``PositionwiseFF``: Linear-ReLU-Dropout-Linear-Dropout, residual, post-LayerNorm."""

    def __init__(self, config: TransformerConfig, d_model: int, d_inner: int, dropout_p: float,
                 layernorm_epsilon: float):
        super().__init__()
        self.dropout_p = dropout_p
        self.layer_1 = tensor_parallel.ColumnParallelLinear(d_model, d_inner, config=config,
                                                            init_method=config.init_method, bias=True,
                                                            gather_output=False)
        self.layer_2 = tensor_parallel.RowParallelLinear(d_inner, d_model, config=config,
                                                         init_method=config.init_method, bias=True,
                                                         input_is_parallel=True, skip_bias_add=False)
        self.layer_norm = torch.nn.LayerNorm(d_model, eps=layernorm_epsilon, dtype=config.params_dtype)

    def forward(self, inp: torch.Tensor) -> torch.Tensor:
        """[q, b, d] -> [q, b, d]."""
        hidden, _ = self.layer_1(inp)  # [q, b, d_inner / tp]
        hidden = dropout(F.relu(hidden), self.dropout_p, self.training, sharded=True)
        core_out, _ = self.layer_2(hidden)  # [q, b, d], all-reduced over TP
        core_out = dropout(core_out, self.dropout_p, self.training)
        return self.layer_norm(inp + core_out)


class RelPartialLearnableDecoderLayer(torch.nn.Module):
    """One Transformer-XL layer. ``layer_number`` is 1-based and global (over pipeline stages), as megatron-core's
    layers number themselves; pretrain/models/init.py reads it to name the parameters layout-independently."""

    def __init__(self, config: TransformerConfig, layer_number: int, n_head: int, d_model: int, d_head: int,
                 d_inner: int, dropout_p: float, dropatt: float, layernorm_epsilon: float, untie_r: bool,
                 recompute_core: bool):
        super().__init__()
        self.layer_number = layer_number
        self.dec_attn = RelPartialLearnableMultiHeadAttn(config, n_head, d_model, d_head, dropout_p, dropatt,
                                                         layernorm_epsilon, own_biases=untie_r,
                                                         recompute_core=recompute_core)
        self.pos_ff = PositionwiseFF(config, d_model, d_inner, dropout_p, layernorm_epsilon)

    def forward(self, dec_inp, r, r_w_bias, r_r_bias, mask, mem):
        """[q, b, d] -> [q, b, d]; see RelPartialLearnableMultiHeadAttn.forward for the other arguments."""
        return self.pos_ff(self.dec_attn(dec_inp, r, r_w_bias, r_r_bias, mask, mem))


def head_bias(n_head: int, d_head: int, config: TransformerConfig) -> torch.nn.Parameter:
    """u or v: [n_head / tp, d_head], this rank's heads (marked so init.py draws the full [n_head, d_head] and
    keeps this rank's rows). Initialised normal(0, init_method_std) like the reference."""
    tp = config.tensor_model_parallel_size
    param = torch.nn.Parameter(torch.empty(n_head // tp, d_head, dtype=config.params_dtype))
    torch.nn.init.normal_(param, 0.0, config.init_method_std)
    tensor_parallel.set_tensor_model_parallel_attributes(param, is_parallel=True, dim=0, stride=1)
    return param
