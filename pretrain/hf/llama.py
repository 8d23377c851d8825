"""Llama-shaped GPT <-> Hugging Face ``LlamaForCausalLM`` (config.json and tensors; no transformers import).

A GPT is Llama-shaped when it has rotary positions (``is_llama_shaped``); it must then also have RMSNorm, a SwiGLU
MLP and no linear biases, else ``check`` refuses it in one line naming the key. The conventions (each caught by
tests/integration/test_llama_hf.py if got wrong):

- Rotary embedding: megatron-core's default (``rotary_interleaved=False``) rotates the two halves of each head,
  the ``rotate_half`` form HF's Llama code uses, so q_proj and k_proj are the query and key rows unpermuted. (The
  permutation in HF's own conversion script turns Meta's interleaved pairs into halves; megatron-core's
  interleaved mode would need it.) A wrong choice changes every logit beyond position 0.
- Fused QKV: megatron-core stores [q of the group's heads, k, v] per key/value group (common.split_qkv); HF has
  separate q_proj [nh*d, h], k_proj and v_proj [ng*d, h], heads in order.
- SwiGLU: our linear_fc1 is [gate; up] (silu applies to the first half), HF's gate_proj and up_proj.
- Norms: input_layernorm / pre_mlp_layernorm -> input_layernorm / post_attention_layernorm, the final one ->
  model.norm; embeddings keep the tokenizer's rows only (TP padding dropped, added back on import).
"""

from __future__ import annotations

from typing import Any, Callable, Iterator

import torch

from pretrain.config import Config, ModelConfig
from pretrain.errors import ConfigError
from pretrain.hf.common import OurTensors, split_qkv

#: Our per-layer tensors copied as they are -> Hugging Face's (``{i}`` is the layer).
LAYER_NAMES = {
    "decoder.layers.{i}.input_layernorm.weight": "model.layers.{i}.input_layernorm.weight",
    "decoder.layers.{i}.pre_mlp_layernorm.weight": "model.layers.{i}.post_attention_layernorm.weight",
    "decoder.layers.{i}.self_attention.linear_proj.weight": "model.layers.{i}.self_attn.o_proj.weight",
    "decoder.layers.{i}.mlp.linear_fc2.weight": "model.layers.{i}.mlp.down_proj.weight",
}


#: Our rope scaling keys -> the keys of HF's ``rope_scaling`` (``rope_type: llama3``, transformers >= 4.43).
ROPE_SCALING_KEYS = {"rope_scaling_factor": "factor", "rope_low_freq_factor": "low_freq_factor",
                     "rope_high_freq_factor": "high_freq_factor",
                     "rope_original_max_position_embeddings": "original_max_position_embeddings"}


def rope_scaling(model: ModelConfig) -> dict[str, Any] | None:
    """config.json's ``rope_scaling`` for our model: Llama 3.1's ``llama3`` scaling when model.rope_scaling_factor
    is set, else None (plain RoPE)."""
    if not model.rope_scaling_factor:
        return None
    return {"rope_type": "llama3", **{theirs: getattr(model, ours) for ours, theirs in ROPE_SCALING_KEYS.items()}}


def rope_scaling_fields(model: ModelConfig, hf: dict[str, Any]) -> list[tuple[str, Any, str, Any]]:
    """(our key, our value, HF key, HF value) that must agree for HF's ``rope_scaling`` (none, or ``llama3``; its
    older spelling ``type`` accepted); a one-line ConfigError for another scaling type (linear, dynamic, yarn...),
    which our rotary embedding does not compute."""
    scaling = hf.get("rope_scaling")
    if not scaling:
        return [("rope_scaling_factor", model.rope_scaling_factor or None, "rope_scaling", None)]
    kind = scaling.get("rope_type", scaling.get("type"))
    if kind != "llama3":
        raise ConfigError(f"rope_scaling.rope_type={kind!r} in config.json: import supports rope_type 'llama3' "
                          "(Llama 3.1 / 3.2) or no rope_scaling")
    return [(ours, getattr(model, ours), f"rope_scaling.{theirs}", scaling.get(theirs))
            for ours, theirs in ROPE_SCALING_KEYS.items()]


def is_llama_shaped(model: ModelConfig) -> bool:
    """A GPT with rotary positions exports (and imports) as Llama; learned positions as GPT-2."""
    return model.position_embedding == "rope"


def check(cfg: Config) -> None:
    """Refuse (ConfigError naming the key) a rotary GPT that LlamaForCausalLM cannot reproduce."""
    model = cfg.model
    for key, value, wanted, why in [
            ("activation", model.activation, "swiglu", "Llama's MLP is SwiGLU"),
            ("normalization", model.normalization, "rmsnorm", "Llama normalizes with RMSNorm"),
            ("add_bias_linear", model.add_bias_linear, False, "Llama's linear layers have no biases")]:
        if value != wanted:
            raise ConfigError(f"model.{key}={value}: a GPT with rotary positions exports as LlamaForCausalLM, and "
                              f"{why} (model.{key}={wanted}); GPT-2 export needs learned_absolute positions")


def llama_config(cfg: Config, mcore_config, vocab_size: int, tokenizer, dtype: torch.dtype) -> dict[str, Any]:
    """config.json of the LlamaForCausalLM equal to our model (``mcore_config``: its TransformerConfig)."""
    model = cfg.model
    check(cfg)
    if mcore_config.kv_channels * model.num_attention_heads != model.hidden_size:
        raise ConfigError("model.num_attention_heads: heads x head size != hidden_size; Llama needs them equal")
    return {
        "architectures": ["LlamaForCausalLM"],
        "model_type": "llama",
        "vocab_size": vocab_size,
        "hidden_size": model.hidden_size,
        "intermediate_size": mcore_config.ffn_hidden_size,
        "num_hidden_layers": model.num_layers,
        "num_attention_heads": model.num_attention_heads,
        "num_key_value_heads": model.num_query_groups or model.num_attention_heads,
        "hidden_act": "silu",
        "max_position_embeddings": model.seq_length,
        "initializer_range": model.init_method_std,
        "rms_norm_eps": model.layernorm_epsilon,
        "rope_theta": model.rope_theta,
        "rope_scaling": rope_scaling(model),
        "attention_bias": False,
        "attention_dropout": model.attention_dropout,
        "tie_word_embeddings": model.tie_embeddings,
        "bos_token_id": tokenizer.bos_id,
        "eos_token_id": tokenizer.eos_id,
        "pad_token_id": tokenizer.pad_id,
        "torch_dtype": str(dtype).removeprefix("torch."),
        "use_cache": True,
    }


def llama_tensors(ours: OurTensors, num_layers: int, num_heads: int, num_groups: int, vocab_size: int,
                  tie_embeddings: bool) -> Iterator[tuple[str, torch.Tensor]]:
    """LlamaForCausalLM's tensors from our Llama-shaped GPTModel's (``ours``: read one at a time), yielded one at
    a time in file order. Every tensor of ours must find a place, else CheckpointError names the first stray one."""
    take = ours.take
    yield "model.embed_tokens.weight", take("embedding.word_embeddings.weight")[:vocab_size]  # drop TP padding
    for i in range(num_layers):
        for template, hf_template in LAYER_NAMES.items():
            yield hf_template.format(i=i), take(template.format(i=i))
        hf = f"model.layers.{i}."
        q, k, v = split_qkv(take(f"decoder.layers.{i}.self_attention.linear_qkv.weight"), num_heads, num_groups)
        yield hf + "self_attn.q_proj.weight", q  # [nh*d, h]
        yield hf + "self_attn.k_proj.weight", k  # [ng*d, h]
        yield hf + "self_attn.v_proj.weight", v
        del q, k, v  # the fused weight is let go before the MLP's is read
        gate, up = take(f"decoder.layers.{i}.mlp.linear_fc1.weight").chunk(2, dim=0)  # [2f, h] -> [f, h] each
        yield hf + "mlp.gate_proj.weight", gate
        yield hf + "mlp.up_proj.weight", up
        del gate, up
    yield "model.norm.weight", take("decoder.final_layernorm.weight")
    if not tie_embeddings:  # tied: LlamaForCausalLM re-ties lm_head to embed_tokens on load
        yield "lm_head.weight", take("output_layer.weight")[:vocab_size]
    ours.check_all_taken()


def convert(loaded, tokenizer, read: Callable[[str], torch.Tensor]) -> tuple[dict, Iterator[tuple[str, torch.Tensor]]]:
    """(config.json, tensors one at a time) of the LlamaForCausalLM equal to the Llama-shaped GPT checkpoint
    ``loaded`` (its model on the meta device will do); ``read(name)`` gives our whole tensor ``name``."""
    cfg, model = loaded.cfg, loaded.model
    dtype = next(model.parameters()).dtype
    config = llama_config(cfg, model.config, tokenizer.vocab_size, tokenizer, dtype)
    ours = OurTensors(model.state_dict(), read, "LlamaForCausalLM")
    return config, llama_tensors(ours, cfg.model.num_layers, cfg.model.num_attention_heads,
                                 cfg.model.num_query_groups or cfg.model.num_attention_heads, tokenizer.vocab_size,
                                 cfg.model.tie_embeddings)
