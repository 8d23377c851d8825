"""Core attention for megatron-core's local layer spec through `F.scaled_dot_product_attention`.

megatron-core's local `DotProductAttention` (what the local spec uses when Transformer Engine is absent: always on
CPU) computes attention as separate ops: a [b, n, s, s] score tensor from baddbmm, a masked fill, softmax, dropout
and a second bmm, each a full pass over s^2 memory, forward and backward. PyTorch's SDPA fuses them (flash /
memory-efficient kernels on CUDA, a flash kernel on CPU) and never stores the probabilities. Same math; measured
in bench/train_step.py (BENCHMARKS.md).
"""

from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F
from megatron.core import tensor_parallel
from megatron.core.transformer.dot_product_attention import DotProductAttention
from megatron.core.transformer.enums import AttnMaskType


class SDPAttention(DotProductAttention):
    """megatron-core's `DotProductAttention` (its constructor: heads per TP partition, scale, dropout rate),
    with the forward computed by SDPA.

    Masks follow megatron-core: ``attention_mask`` is bool, True where attention is NOT allowed, broadcastable to
    [b, n, sq, sk]. With no mask, a causal layer is causal when query and key lengths match (training, prefill)
    and unmasked otherwise (a decode step: one query against the cached keys), as megatron-core's own softmax does.
    A masked position gets -inf here and -10000 in megatron-core's fill; they differ only for a query with every
    key masked, which causal and per-document masks never produce.
    """

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        if self.softmax_offset is not None or self.scale_mask_softmax.window_size is not None \
                or self.config.apply_query_key_layer_scaling:
            raise ValueError("SDPAttention supports vanilla softmax without sliding windows or layer scaling only")

    def forward(self, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                attention_mask: Optional[torch.Tensor], attn_mask_type: Optional[AttnMaskType] = None,
                attention_bias: Optional[torch.Tensor] = None, packed_seq_params=None) -> torch.Tensor:
        """query [sq, b, n, d], key/value [sk, b, g, d] (g query groups: g = n without GQA) -> context [sq, b, n*d]."""
        if attention_bias is not None or packed_seq_params is not None:
            raise ValueError("SDPAttention takes no attention_bias or packed_seq_params")
        sq, sk = query.size(0), key.size(0)
        mask_type = self.attn_mask_type if attn_mask_type is None else attn_mask_type
        is_causal = attention_mask is None and mask_type == AttnMaskType.causal and sq == sk and sq > 1
        allowed = None if attention_mask is None else ~attention_mask  # SDPA's bool mask: True = attend
        q, k, v = (t.permute(1, 2, 0, 3) for t in (query, key, value))  # [b, n|g, s, d]
        dropout = self.attention_dropout.p if self.training else 0.0

        def attend() -> torch.Tensor:
            return F.scaled_dot_product_attention(q, k, v, attn_mask=allowed, dropout_p=dropout, is_causal=is_causal,
                                                  scale=self.softmax_scale, enable_gqa=k.size(1) != q.size(1))

        if not self.config.sequence_parallel:  # as the parent: TP ranks drop independently
            with tensor_parallel.get_cuda_rng_tracker().fork():
                context = attend()
        else:
            context = attend()
        # [b, n, sq, d] -> [sq, b, n*d]
        return context.permute(2, 0, 1, 3).reshape(sq, q.size(0), self.hidden_size_per_partition)
