"""BERT -> Hugging Face ``BertForPreTraining`` (``BertForMaskedLM`` for a BERT trained without NSP), for
`pretrain export hf` (pretrain/hf/export.py).

Hugging Face BERT is the paper's post-LayerNorm transformer: LayerNorm(word + position + token type), then per
layer ``LN(x + attention(x))`` and ``LN(x + MLP(x))``, no final norm. Our BERT must have that structure for the
weights to mean the same thing; the tensor names it is expected to use are :data:`POST_LN_NAMES`. A pre-LN
checkpoint (megatron-core's default layer: ``input_layernorm`` / ``pre_mlp_layernorm`` + ``final_layernorm``)
is refused with a one-line CheckpointError.
"""

from __future__ import annotations

from typing import Any, Callable, Iterator

import torch

from pretrain.config import Config
from pretrain.errors import CheckpointError, ConfigError
from pretrain.hf.common import OurTensors, split_qkv

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


def check(cfg: Config) -> None:
    """Refuse (ConfigError naming the key) a BERT that Hugging Face's BertModel cannot reproduce."""
    model = cfg.model
    if model.position_embedding != "learned_absolute":
        raise ConfigError(f"model.position_embedding={model.position_embedding}: Hugging Face BERT has learned "
                          "absolute positions only; this checkpoint cannot be exported")
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
    return {
        "architectures": ["BertForPreTraining" if model.nsp else "BertForMaskedLM"],
        "model_type": "bert",
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
        "position_embedding_type": "absolute",
        "tie_word_embeddings": model.tie_embeddings,
        "pad_token_id": tokenizer.pad_id,
        "torch_dtype": str(dtype).removeprefix("torch."),
    }


def bert_tensors(ours: OurTensors, num_layers: int, num_heads: int, vocab_size: int, tie_embeddings: bool,
                 nsp: bool) -> Iterator[tuple[str, torch.Tensor]]:
    """BertForPreTraining's tensors (BertForMaskedLM's without NSP) from our post-LN BertModel's (``ours``: read
    one at a time), yielded one at a time in file order."""
    if "encoder.layers.0.input_layernorm.weight" in ours.left or "encoder.final_layernorm.weight" in ours.left:
        raise CheckpointError("this BERT is pre-LayerNorm (megatron-core's default layer); Hugging Face BERT is "
                              "post-LayerNorm (the paper's), so the weights cannot be exported as BertForPreTraining")
    take = ours.take
    yield "bert.embeddings.word_embeddings.weight", take("embedding.word_embeddings.weight")[:vocab_size]
    yield "bert.embeddings.position_embeddings.weight", take("embedding.position_embeddings.weight")
    yield "bert.embeddings.token_type_embeddings.weight", take("embedding.tokentype_embeddings.weight")
    prefixes = {**POST_LN_NAMES, **COPIED_NAMES}
    layer_templates = {k: v for k, v in prefixes.items() if "{i}" in k}
    model_templates = {k: v for k, v in prefixes.items() if "{i}" not in k}
    if not nsp:  # no pooler / NSP head: exported as BertForMaskedLM, which has neither (same names otherwise)
        model_templates = {k: v for k, v in model_templates.items() if k not in ("pooler.dense", "binary_head")}
    pairs = [(ours_t.format(i=i), hf_t.format(i=i)) for i in range(num_layers)
             for ours_t, hf_t in layer_templates.items()] + list(model_templates.items())
    for ours_prefix, hf_prefix in pairs:
        for kind in ("weight", "bias"):
            yield f"{hf_prefix}.{kind}", take(f"{ours_prefix}.{kind}")
    for i in range(num_layers):
        hf = f"bert.encoder.layer.{i}.attention.self."
        qkv = f"encoder.layers.{i}.self_attention.linear_qkv."
        for kind in ("weight", "bias"):
            q, k, v = split_qkv(take(qkv + kind), num_heads, num_heads)  # [h, h] / [h] each, heads in order
            yield hf + "query." + kind, q
            yield hf + "key." + kind, k
            yield hf + "value." + kind, v
    yield "cls.predictions.bias", take("output_layer.bias")[:vocab_size]  # HF ties decoder.bias to it on load
    if not tie_embeddings:
        yield "cls.predictions.decoder.weight", take("output_layer.weight")[:vocab_size]
    ours.check_all_taken()


def convert(loaded, tokenizer, read: Callable[[str], torch.Tensor]) -> tuple[dict, Iterator[tuple[str, torch.Tensor]]]:
    """(config.json, tensors one at a time) for a BERT checkpoint ``loaded`` (its model on the meta device will
    do); ``read(name)`` gives our whole tensor ``name``."""
    cfg, model = loaded.cfg, loaded.model
    dtype = next(model.parameters()).dtype
    config = bert_config(cfg, model.config, tokenizer.vocab_size, tokenizer, dtype)
    ours = OurTensors(model.state_dict(), read, "Hugging Face BERT")
    return config, bert_tensors(ours, cfg.model.num_layers, cfg.model.num_attention_heads, tokenizer.vocab_size,
                                cfg.model.tie_embeddings, cfg.model.nsp)
