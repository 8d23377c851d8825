"""Transformer-XL (segment memory, relative positions) on megatron-core's parallel layers: the model and its spec
(model), the relative-attention layer (layers) and the ordered lane readers its memory needs (data)."""
