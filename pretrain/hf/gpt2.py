"""GPT -> Hugging Face ``GPT2LMHeadModel`` (config.json written here: no transformers import at export time).

The conversion reads our tensors one at a time, whole (unsharded, under their canonical names) whatever TP/PP layout
saved them (pretrain.inference.loading.tensor_reader), and yields GPT-2's one at a time. Where GPT-2 cannot express our
model (SwiGLU, RMSNorm, grouped-query attention, no biases; rotary GPTs go to llama.py) the export is refused
with a one-line ConfigError naming the config key, before any weight is loaded (``check``).
"""

from __future__ import annotations

from typing import Any, Callable, Iterator

import torch

from pretrain.config import Config
from pretrain.errors import ConfigError
from pretrain.hf.common import OurTensors, split_qkv

#: Our model.activation -> GPT-2's activation_function. gelu_new is GPT-2's tanh approximation (same formula as
#: torch's approximate="tanh"; the two differ by float rounding only).
GPT2_ACTIVATIONS = {"gelu": "gelu", "gelu_tanh": "gelu_new"}


def check(cfg: Config) -> None:
    """Refuse (ConfigError naming the key) a GPT whose architecture GPT2LMHeadModel cannot reproduce."""
    model = cfg.model
    if model.position_embedding != "learned_absolute":
        raise ConfigError(f"model.position_embedding={model.position_embedding}: GPT-2 has learned absolute "
                          "positions only; this checkpoint cannot be exported as GPT2LMHeadModel")
    if model.activation not in GPT2_ACTIVATIONS:
        raise ConfigError(f"model.activation={model.activation}: GPT-2's MLP is not gated (supports "
                          f"{', '.join(GPT2_ACTIVATIONS)}); this checkpoint cannot be exported as GPT2LMHeadModel")
    for key, value, wanted, why in [
            ("normalization", model.normalization, "layernorm", "GPT-2 has LayerNorms"),
            ("num_query_groups", model.num_query_groups, 0, "GPT-2 has a key/value per head"),
            ("add_bias_linear", model.add_bias_linear, True, "GPT-2's linear layers have biases")]:
        if value != wanted:
            raise ConfigError(f"model.{key}={value}: {why}; this checkpoint cannot be exported as GPT2LMHeadModel "
                              "(rotary positions would export it as LlamaForCausalLM)")


def gpt2_config(cfg: Config, mcore_config, vocab_size: int, tokenizer, dtype: torch.dtype) -> dict[str, Any]:
    """config.json of a GPT2LMHeadModel equal to our GPT (``mcore_config``: the built model's TransformerConfig).

    ``vocab_size`` is the tokenizer's, not the TP-padded embedding size: padding rows are never real tokens.
    """
    model = cfg.model
    check(cfg)
    if mcore_config.num_query_groups not in (None, mcore_config.num_attention_heads):
        raise ConfigError(f"model.num_attention_heads: {mcore_config.num_query_groups} key/value groups for "
                          f"{mcore_config.num_attention_heads} heads; GPT-2 has one key/value head per head")
    if mcore_config.kv_channels * mcore_config.num_attention_heads != model.hidden_size:
        raise ConfigError("model.num_attention_heads: heads x head size != hidden_size; GPT-2 needs them equal")
    return {
        "architectures": ["GPT2LMHeadModel"],
        "model_type": "gpt2",
        "vocab_size": vocab_size,
        "n_positions": model.seq_length,
        "n_embd": model.hidden_size,
        "n_layer": model.num_layers,
        "n_head": model.num_attention_heads,
        "n_inner": mcore_config.ffn_hidden_size,
        "activation_function": GPT2_ACTIVATIONS[model.activation],
        # megatron-core applies hidden_dropout after the embedding too (GPT-2's embd_pdrop).
        "resid_pdrop": model.hidden_dropout,
        "embd_pdrop": model.hidden_dropout,
        "attn_pdrop": model.attention_dropout,
        "layer_norm_epsilon": model.layernorm_epsilon,
        "initializer_range": model.init_method_std,
        "scale_attn_weights": True,  # 1/sqrt(head size), as megatron-core's DotProductAttention
        "scale_attn_by_inverse_layer_idx": False,
        "reorder_and_upcast_attn": False,
        "tie_word_embeddings": model.tie_embeddings,
        "bos_token_id": tokenizer.bos_id,
        "eos_token_id": tokenizer.eos_id,
        "pad_token_id": tokenizer.pad_id,
        "torch_dtype": str(dtype).removeprefix("torch."),
        "use_cache": True,
    }


def gpt2_tensors(ours: OurTensors, num_layers: int, num_heads: int,
                 vocab_size: int, tie_embeddings: bool) -> Iterator[tuple[str, torch.Tensor]]:
    """GPT2LMHeadModel's tensors from our GPTModel's (``ours``: read one at a time), yielded one at a time in file
    order, each computed only when asked for. Every tensor of ours must find a place, else CheckpointError names
    the first stray one (after the last yield)."""
    take = ours.take

    def conv1d(linear_weight: torch.Tensor) -> torch.Tensor:
        return linear_weight.t()  # nn.Linear [out, in] -> GPT-2's Conv1D [in, out]

    yield "transformer.wte.weight", take("embedding.word_embeddings.weight")[:vocab_size]  # drop TP padding rows
    yield "transformer.wpe.weight", take("embedding.position_embeddings.weight")
    for i in range(num_layers):
        ours_layer, hf = f"decoder.layers.{i}.", f"transformer.h.{i}."
        for norm, hf_norm in (("input_layernorm", "ln_1"), ("pre_mlp_layernorm", "ln_2")):
            for kind in ("weight", "bias"):
                yield f"{hf}{hf_norm}.{kind}", take(f"{ours_layer}{norm}.{kind}")
        # GPT-2's c_attn output is [q (all heads) | k | v], each [h] in head order.
        qkv_weight = take(f"{ours_layer}self_attention.linear_qkv.weight")  # [3h, h]
        yield f"{hf}attn.c_attn.weight", conv1d(torch.cat(split_qkv(qkv_weight, num_heads, num_heads)))  # [h, 3h]
        qkv_bias = take(f"{ours_layer}self_attention.linear_qkv.bias")  # [3h]
        yield f"{hf}attn.c_attn.bias", torch.cat(split_qkv(qkv_bias, num_heads, num_heads))
        yield f"{hf}attn.c_proj.weight", conv1d(take(f"{ours_layer}self_attention.linear_proj.weight"))
        yield f"{hf}attn.c_proj.bias", take(f"{ours_layer}self_attention.linear_proj.bias")
        yield f"{hf}mlp.c_fc.weight", conv1d(take(f"{ours_layer}mlp.linear_fc1.weight"))  # [h, f]
        yield f"{hf}mlp.c_fc.bias", take(f"{ours_layer}mlp.linear_fc1.bias")
        yield f"{hf}mlp.c_proj.weight", conv1d(take(f"{ours_layer}mlp.linear_fc2.weight"))  # [f, h]
        yield f"{hf}mlp.c_proj.bias", take(f"{ours_layer}mlp.linear_fc2.bias")
    yield "transformer.ln_f.weight", take("decoder.final_layernorm.weight")
    yield "transformer.ln_f.bias", take("decoder.final_layernorm.bias")
    if not tie_embeddings:  # tied: GPT2LMHeadModel re-ties lm_head to wte on load; the file holds wte only
        yield "lm_head.weight", take("output_layer.weight")[:vocab_size]
    ours.check_all_taken()


def convert(loaded, tokenizer, read: Callable[[str], torch.Tensor]) -> tuple[dict, Iterator[tuple[str, torch.Tensor]]]:
    """(config.json, tensors one at a time) of the GPT2LMHeadModel equal to the GPT checkpoint ``loaded``
    (pretrain.inference.loading.LoadedModel, its model on the meta device will do); ``read(name)`` gives our
    whole tensor ``name``."""
    cfg, model = loaded.cfg, loaded.model
    dtype = next(model.parameters()).dtype
    config = gpt2_config(cfg, model.config, tokenizer.vocab_size, tokenizer, dtype)
    ours = OurTensors(model.state_dict(), read, "GPT2LMHeadModel")
    return config, gpt2_tensors(ours, cfg.model.num_layers, cfg.model.num_attention_heads, tokenizer.vocab_size,
                                cfg.model.tie_embeddings)
