"""BERT -> Hugging Face ``BertForPreTraining`` (``BertForMaskedLM`` for a BERT trained without NSP), and a BERT with
rotary positions -> ``RoFormerForMaskedLM``, for `pretrain export hf` (pretrain/hf/export.py).

Hugging Face BERT is the paper's post-LayerNorm transformer: LayerNorm(word + position + token type), then per
layer ``LN(x + attention(x))`` and ``LN(x + MLP(x))``, no final norm. Our BERT must have that structure for the
weights to mean the same thing; the tensor names it is expected to use are :data:`POST_LN_NAMES`. A pre-LN
checkpoint (megatron-core's default layer: ``input_layernorm`` / ``pre_mlp_layernorm`` + ``final_layernorm``)
is refused with a one-line CheckpointError.

RoFormer (Su et al. 2021) is that BERT with rotary query/key positions in place of the position table, the model
of ``model.position_embedding: rope``. Its conventions (each caught by tests/integration/test_bert_finetune.py if
got wrong): tensors under ``roformer.`` instead of ``bert.``; its rotary embedding turns dimensions 2i and 2i+1
of a head together, megatron-core's (``rotary_interleaved=False``) i and i + d/2, so query and key rows are
reordered per head (common.halves_to_pairs; wrong, every logit but position 0's differs); its rotary base is
10000 and it has no pooler, NSP head or rope scaling, so those are refused in one line naming the key; the
sinusoid table it keeps as ``roformer.encoder.embed_positions.weight`` is written as transformers computes it.
"""

from __future__ import annotations

import itertools
from typing import Any, Callable, Iterator

import torch

from pretrain.config import Config, ModelConfig
from pretrain.errors import CheckpointError, ConfigError
from pretrain.hf.common import OurTensors, halves_to_pairs, split_qkv

#: Our post-LN BERT's norm tensors (prefixes of .weight / .bias) -> Hugging Face's. ``{i}`` is the layer.
POST_LN_NAMES = {
    "embedding.layernorm": "bert.embeddings.LayerNorm",
    "encoder.layers.{i}.post_attention_layernorm": "bert.encoder.layer.{i}.attention.output.LayerNorm",
    "encoder.layers.{i}.post_mlp_layernorm": "bert.encoder.layer.{i}.output.LayerNorm",
}

#: Tensors copied as they are (prefixes of .weight / .bias; linear layers are [out, in] on both sides).
COPIED_NAMES = {
    "encoder.layers.{i}.self_attention.linear_proj": "bert.encoder.layer.{i}.attention.output.dense",
    "encoder.layers.{i}.mlp.linear_fc1": "bert.encoder.layer.{i}.intermediate.dense",
    "encoder.layers.{i}.mlp.linear_fc2": "bert.encoder.layer.{i}.output.dense",
    "lm_head.dense": "cls.predictions.transform.dense",
    "lm_head.layer_norm": "cls.predictions.transform.LayerNorm",
    "pooler.dense": "bert.pooler.dense",
    "binary_head": "cls.seq_relationship",
}


#: RoFormer's rotary base: fixed in its code (RoFormerSinusoidalPositionalEmbedding), not a config field.
ROFORMER_ROPE_THETA = 10000.0


def is_roformer(model: ModelConfig) -> bool:
    """A BERT with rotary positions exports (and imports) as RoFormer; learned positions as BERT."""
    return model.position_embedding == "rope"


def hf_names(rotary: bool) -> dict[str, str]:
    """Our prefixes -> HF's for the tensors copied as they are, the norms included (:data:`POST_LN_NAMES`,
    :data:`COPIED_NAMES`): under ``roformer.`` instead of ``bert.`` for a RoFormer."""
    names = {**POST_LN_NAMES, **COPIED_NAMES}
    return {ours: f"roformer.{hf[len('bert.'):]}" if rotary and hf.startswith("bert.") else hf
            for ours, hf in names.items()}


def check(cfg: Config) -> None:
    """Refuse (ConfigError naming the key) a BERT that Hugging Face's BertModel / RoFormerModel cannot reproduce."""
    model = cfg.model
    if is_roformer(model):
        for key, wanted, why in [("nsp", False, "it has no pooler or NSP head"),
                                 ("rope_theta", ROFORMER_ROPE_THETA, "its rotary base is fixed at 10000"),
                                 ("rope_scaling_factor", 0.0, "it has no rope scaling")]:
            if getattr(model, key) != wanted:
                raise ConfigError(f"model.{key}={getattr(model, key)}: a BERT with rotary positions exports as "
                                  f"RoFormerForMaskedLM, and {why} (model.{key}={wanted})")
    # HF BERT uses one activation (hidden_act) in the MLPs and the MLM head; megatron-core's head is erf gelu.
    if model.activation != "gelu":
        raise ConfigError(f"model.activation={model.activation}: Hugging Face BERT uses the same activation in "
                          "its layers and its MLM head, which is gelu here; only activation=gelu can be exported")


def bert_config(cfg: Config, mcore_config, vocab_size: int, tokenizer, dtype: torch.dtype) -> dict[str, Any]:
    """config.json of a BertForPreTraining (BertForMaskedLM without NSP) equal to our BERT."""
    model = cfg.model
    check(cfg)
    if mcore_config.num_query_groups not in (None, mcore_config.num_attention_heads):
        raise ConfigError("model.num_attention_heads: grouped key/values; Hugging Face BERT has one per head")
    shared = {
        "vocab_size": vocab_size,
        "hidden_size": model.hidden_size,
        "num_hidden_layers": model.num_layers,
        "num_attention_heads": model.num_attention_heads,
        "intermediate_size": mcore_config.ffn_hidden_size,
        "hidden_act": "gelu",
        "hidden_dropout_prob": model.hidden_dropout,
        "attention_probs_dropout_prob": model.attention_dropout,
        "max_position_embeddings": model.seq_length,
        "type_vocab_size": 2,
        "layer_norm_eps": model.layernorm_epsilon,
        "initializer_range": model.init_method_std,
        "tie_word_embeddings": model.tie_embeddings,
        "pad_token_id": tokenizer.pad_id,
        "torch_dtype": str(dtype).removeprefix("torch."),
    }
    if is_roformer(model):  # rotary q/k on every layer (not on v), no position table, no projected embeddings
        return {"architectures": ["RoFormerForMaskedLM"], "model_type": "roformer",
                "embedding_size": model.hidden_size, "rotary_value": False, **shared}
    return {"architectures": ["BertForPreTraining" if model.nsp else "BertForMaskedLM"], "model_type": "bert",
            "position_embedding_type": "absolute", **shared}


def rotary_table(positions: int, head_dim: int, dtype: torch.dtype) -> torch.Tensor:
    """RoFormer's ``embed_positions`` weight [positions, head_dim]: sin of each position's angles in the first
    half, cos in the second, computed as transformers does (float64, then cast), so the file matches its own."""
    import numpy as np

    angles = np.array([[pos / np.power(10000, 2 * (j // 2) / head_dim) for j in range(head_dim)]
                       for pos in range(positions)])
    table = torch.empty(positions, head_dim)
    table[:, : head_dim // 2] = torch.FloatTensor(np.sin(angles[:, 0::2]))
    table[:, head_dim // 2:] = torch.FloatTensor(np.cos(angles[:, 1::2]))
    return table.to(dtype)


def bert_tensors(ours: OurTensors, model: ModelConfig, vocab_size: int) -> Iterator[tuple[str, torch.Tensor]]:
    """BertForPreTraining's tensors (BertForMaskedLM's without NSP, RoFormerForMaskedLM's with rotary positions)
    from our post-LN BertModel's (``ours``: read one at a time), yielded one at a time in file order."""
    if "encoder.layers.0.input_layernorm.weight" in ours.left or "encoder.final_layernorm.weight" in ours.left:
        raise CheckpointError("this BERT is pre-LayerNorm (megatron-core's default layer); Hugging Face BERT is "
                              "post-LayerNorm (the paper's), so the weights cannot be exported as BertForPreTraining")
    take, rotary, heads = ours.take, is_roformer(model), model.num_attention_heads
    top = "roformer" if rotary else "bert"
    yield f"{top}.embeddings.word_embeddings.weight", take("embedding.word_embeddings.weight")[:vocab_size]
    if not rotary:  # RoFormer has no position table
        yield "bert.embeddings.position_embeddings.weight", take("embedding.position_embeddings.weight")
    yield f"{top}.embeddings.token_type_embeddings.weight", take("embedding.tokentype_embeddings.weight")
    names = hf_names(rotary)
    layer_templates = {k: v for k, v in names.items() if "{i}" in k}
    model_templates = {k: v for k, v in names.items() if "{i}" not in k}
    if not model.nsp:  # no pooler / NSP head: exported as BertForMaskedLM, which has neither (same names otherwise)
        model_templates = {k: v for k, v in model_templates.items() if k not in ("pooler.dense", "binary_head")}
    pairs = [(ours_t.format(i=i), hf_t.format(i=i)) for i in range(model.num_layers)
             for ours_t, hf_t in layer_templates.items()] + list(model_templates.items())
    for ours_prefix, hf_prefix in pairs:
        for kind in ("weight", "bias"):
            yield f"{hf_prefix}.{kind}", take(f"{ours_prefix}.{kind}")
    for i in range(model.num_layers):
        hf = f"{top}.encoder.layer.{i}.attention.self."
        qkv = f"encoder.layers.{i}.self_attention.linear_qkv."
        for kind in ("weight", "bias"):
            q, k, v = split_qkv(take(qkv + kind), heads, heads)  # [h, h] / [h] each, heads in order
            if rotary:  # megatron-core rotates halves of a head, RoFormer adjacent pairs
                q, k = halves_to_pairs(q, heads), halves_to_pairs(k, heads)
            yield hf + "query." + kind, q
            yield hf + "key." + kind, k
            yield hf + "value." + kind, v
    yield "cls.predictions.bias", take("output_layer.bias")[:vocab_size]  # HF ties decoder.bias to it on load
    if not model.tie_embeddings:
        yield "cls.predictions.decoder.weight", take("output_layer.weight")[:vocab_size]
    ours.check_all_taken()


def convert(loaded, tokenizer, read: Callable[[str], torch.Tensor]) -> tuple[dict, Iterator[tuple[str, torch.Tensor]]]:
    """(config.json, tensors one at a time) for a BERT checkpoint ``loaded`` (its model on the meta device will
    do); ``read(name)`` gives our whole tensor ``name``."""
    cfg, model = loaded.cfg, loaded.model
    dtype = next(model.parameters()).dtype
    config = bert_config(cfg, model.config, tokenizer.vocab_size, tokenizer, dtype)
    ours = OurTensors(model.state_dict(), read, "Hugging Face BERT")
    tensors = bert_tensors(ours, cfg.model, tokenizer.vocab_size)
    if is_roformer(cfg.model):  # transformers saves its sinusoid table (a frozen parameter) with the model
        table = rotary_table(cfg.model.seq_length, model.config.kv_channels, dtype)
        tensors = itertools.chain(tensors, [("roformer.encoder.embed_positions.weight", table)])
    return config, tensors
