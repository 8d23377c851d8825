"""The paper's post-LayerNorm BERT on megatron-core parts.

megatron-core's BERT is pre-LN: ``x + Attn(LN(x))``, ``x + MLP(LN(x))``, a final LN, and no norm on the
embeddings. Devlin et al. (and every BERT checkpoint people fine-tune, Hugging Face's ``BertModel`` included)
normalise after each residual sum and once on the embeddings: ``LN(x + Attn(x))``, ``LN(x + MLP(x))``,
``LN(word + position + token type)``. Same parameters, different function: only the post-LN model can be exported
as ``BertForPreTraining`` with equal logits. Built here from megatron-core's own layer (its attention, MLP and
bias-dropout-add, tensor/sequence parallel as usual) with its pre-norms set to identity in the spec.
"""

from __future__ import annotations

import torch
from megatron.core.transformer.transformer_layer import TransformerLayer

from pretrain.models.gpt import LayerNorm


class PostNormLayer(TransformerLayer):
    """One encoder layer: ``x = LN(x + Attn(x)); x = LN(x + MLP(x))`` ([s, b, h] in and out)."""

    def __init__(self, config, submodules, layer_number: int = 1, **kwargs):
        super().__init__(config, submodules, layer_number=layer_number, **kwargs)
        self.post_attention_layernorm = LayerNorm(config, config.hidden_size, eps=config.layernorm_epsilon)
        self.post_mlp_layernorm = LayerNorm(config, config.hidden_size, eps=config.layernorm_epsilon)

    def forward(self, *args, **kwargs):
        kwargs.pop("dynamic_inference_decode_only", None)  # as TransformerLayer.forward: a CUDA-graph key only
        hidden_states, context = self._forward_attention(*args, **kwargs)  # x + dropout(Attn(x)): no pre-norm
        hidden_states = self.post_attention_layernorm(hidden_states)
        output = self._forward_mlp(hidden_states, kwargs.get("inference_context"),
                                   padding_mask=kwargs.get("padding_mask"))  # x + dropout(MLP(x))
        return self.post_mlp_layernorm(output), context


class _NormThenDropout(torch.nn.Module):
    """Stands in for the embedding's dropout so the embedding norm runs where the paper has it: after the sum of
    word, position and token-type embeddings (and after the sequence-parallel scatter), before the dropout."""

    def __init__(self, norm: torch.nn.Module, dropout: torch.nn.Dropout):
        super().__init__()
        self._norm = (norm,)  # a tuple: the norm is registered once, as the embedding's `layernorm`
        self.dropout = dropout

    def forward(self, embeddings: torch.Tensor) -> torch.Tensor:
        return self.dropout(self._norm[0](embeddings))


def to_post_norm(model) -> None:
    """Make a BertModel built with :class:`PostNormLayer` layers the paper's post-LN model: a LayerNorm on the
    embeddings (first stage) and no final norm after the encoder (last stage; each layer ends normalised)."""
    config = model.config
    if model.pre_process:
        embedding = model.embedding
        embedding.layernorm = LayerNorm(config, config.hidden_size, eps=config.layernorm_epsilon)
        embedding.embedding_dropout = _NormThenDropout(embedding.layernorm, embedding.embedding_dropout)
    model.encoder.final_layernorm = None
