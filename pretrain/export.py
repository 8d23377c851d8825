"""`pretrain export hf`: a checkpoint as a Hugging Face model directory.

GPT becomes ``GPT2LMHeadModel`` (BERT becomes ``BertForPreTraining``, pretrain/export_bert.py). The directory
holds config.json (written here: no transformers import at export time), model.safetensors and the tokenizer
(the sentencepiece ``tokenizer.model`` plus a slow ``LlamaTokenizer`` config, which encodes with the same ids).

The model comes from :func:`pretrain.inference.load_model`: the whole model in one process, whatever TP/PP layout
the checkpoint was saved with, so the conversion below only ever sees full (unsharded) megatron-core tensors.
Where GPT-2 cannot express our model (rotary positions, SwiGLU, grouped-query attention, ...) the export is
refused with a one-line ConfigError naming the config key, before any weight is loaded.
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path
from typing import Any, Callable

import torch

from pretrain.checkpoint import CheckpointError
from pretrain.config import Config, ConfigError

#: Our model.activation -> GPT-2's activation_function. gelu_new is GPT-2's tanh approximation (same formula as
#: torch's approximate="tanh"; the two differ by float rounding only).
GPT2_ACTIVATIONS = {"gelu": "gelu", "gelu_tanh": "gelu_new"}

# Transformer Engine's layer spec (used on CUDA when TE imports) fuses each pre-norm into the next linear layer;
# these are the names its norms get, mapped to the local spec's names so one conversion serves both.
_TE_NORM_NAMES = {
    "self_attention.linear_qkv.layer_norm_weight": "input_layernorm.weight",
    "self_attention.linear_qkv.layer_norm_bias": "input_layernorm.bias",
    "mlp.linear_fc1.layer_norm_weight": "pre_mlp_layernorm.weight",
    "mlp.linear_fc1.layer_norm_bias": "pre_mlp_layernorm.bias",
}


def check_gpt2_compatible(cfg: Config) -> None:
    """Refuse (ConfigError naming the key) a GPT whose architecture GPT2LMHeadModel cannot reproduce."""
    model = cfg.model
    if model.position_embedding != "learned_absolute":
        raise ConfigError(f"model.position_embedding={model.position_embedding}: GPT-2 has learned absolute "
                          "positions only; this checkpoint cannot be exported as GPT2LMHeadModel")
    if model.activation not in GPT2_ACTIVATIONS:
        raise ConfigError(f"model.activation={model.activation}: GPT-2's MLP is not gated (supports "
                          f"{', '.join(GPT2_ACTIVATIONS)}); this checkpoint cannot be exported as GPT2LMHeadModel")


def gpt2_config(cfg: Config, mcore_config, vocab_size: int, tokenizer, dtype: torch.dtype) -> dict[str, Any]:
    """config.json of a GPT2LMHeadModel equal to our GPT (``mcore_config``: the built model's TransformerConfig).

    ``vocab_size`` is the tokenizer's, not the TP-padded embedding size: padding rows are never real tokens.
    """
    model = cfg.model
    check_gpt2_compatible(cfg)
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


def _normalized_names(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Model tensors under the local spec's names; megatron's ``_extra_state`` (fp8 metadata) dropped."""
    out = {}
    for name, value in state.items():
        if name.endswith("_extra_state"):
            continue
        for te_name, local_name in _TE_NORM_NAMES.items():
            if name.endswith(te_name):
                name = name[: -len(te_name)] + local_name
        out[name] = value
    return out


def split_qkv(weight: torch.Tensor, num_heads: int, num_groups: int) -> tuple[torch.Tensor, ...]:
    """megatron-core's fused QKV rows -> (q, k, v) rows, each in head order.

    megatron-core lays the fused output out per key/value group: [q of the group's heads, k, v] (each head_dim
    rows), groups one after another; a TP shard is a run of whole groups. Works for weights [3h, h] and biases
    [3h]. Returns q [nh * d, ...], k and v [ng * d, ...].
    """
    q_per_group = num_heads // num_groups
    rest = weight.shape[1:]
    head_dim = weight.shape[0] // (num_groups * (q_per_group + 2))
    grouped = weight.reshape(num_groups, q_per_group + 2, head_dim, *rest)  # [ng, q/g + 2, d, ...]
    q = grouped[:, :q_per_group].reshape(num_heads * head_dim, *rest)
    k = grouped[:, q_per_group].reshape(num_groups * head_dim, *rest)
    v = grouped[:, q_per_group + 1].reshape(num_groups * head_dim, *rest)
    return q, k, v


def gpt2_state_dict(state: dict[str, torch.Tensor], num_layers: int, num_heads: int, vocab_size: int,
                    tie_embeddings: bool) -> dict[str, torch.Tensor]:
    """Our GPTModel's full state dict -> GPT2LMHeadModel's, as fresh contiguous tensors (safetensors refuses
    shared storage). Every tensor of ours must find a place, else CheckpointError names the first stray one."""
    ours = _normalized_names(state)

    def take(name: str) -> torch.Tensor:
        if name not in ours:
            raise CheckpointError(f"model tensor {name} missing; cannot build GPT2LMHeadModel weights")
        return ours.pop(name).detach()

    def conv1d(linear_weight: torch.Tensor) -> torch.Tensor:
        return linear_weight.t()  # nn.Linear [out, in] -> GPT-2's Conv1D [in, out]

    out = {
        "transformer.wte.weight": take("embedding.word_embeddings.weight")[:vocab_size],  # drop TP padding rows
        "transformer.wpe.weight": take("embedding.position_embeddings.weight"),
    }
    for i in range(num_layers):
        ours_layer, hf = f"decoder.layers.{i}.", f"transformer.h.{i}."
        for norm, hf_norm in (("input_layernorm", "ln_1"), ("pre_mlp_layernorm", "ln_2")):
            for kind in ("weight", "bias"):
                out[f"{hf}{hf_norm}.{kind}"] = take(f"{ours_layer}{norm}.{kind}")
        qkv_weight = take(f"{ours_layer}self_attention.linear_qkv.weight")  # [3h, h]
        qkv_bias = take(f"{ours_layer}self_attention.linear_qkv.bias")  # [3h]
        # GPT-2's c_attn output is [q (all heads) | k | v], each [h] in head order.
        out[f"{hf}attn.c_attn.weight"] = conv1d(torch.cat(split_qkv(qkv_weight, num_heads, num_heads)))  # [h, 3h]
        out[f"{hf}attn.c_attn.bias"] = torch.cat(split_qkv(qkv_bias, num_heads, num_heads))
        out[f"{hf}attn.c_proj.weight"] = conv1d(take(f"{ours_layer}self_attention.linear_proj.weight"))
        out[f"{hf}attn.c_proj.bias"] = take(f"{ours_layer}self_attention.linear_proj.bias")
        out[f"{hf}mlp.c_fc.weight"] = conv1d(take(f"{ours_layer}mlp.linear_fc1.weight"))  # [h, f]
        out[f"{hf}mlp.c_fc.bias"] = take(f"{ours_layer}mlp.linear_fc1.bias")
        out[f"{hf}mlp.c_proj.weight"] = conv1d(take(f"{ours_layer}mlp.linear_fc2.weight"))  # [f, h]
        out[f"{hf}mlp.c_proj.bias"] = take(f"{ours_layer}mlp.linear_fc2.bias")
    out["transformer.ln_f.weight"] = take("decoder.final_layernorm.weight")
    out["transformer.ln_f.bias"] = take("decoder.final_layernorm.bias")
    if not tie_embeddings:  # tied: GPT2LMHeadModel re-ties lm_head to wte on load; the file holds wte only
        out["lm_head.weight"] = take("output_layer.weight")[:vocab_size]
    if ours:
        raise CheckpointError(f"model tensor {next(iter(ours))} has no GPT-2 counterpart ({len(ours)} such); "
                              "cannot export as GPT2LMHeadModel")
    return {name: t.contiguous().clone() for name, t in out.items()}


def _export_gpt(loaded, tokenizer) -> tuple[dict, dict[str, torch.Tensor]]:
    cfg, model = loaded.cfg, loaded.model
    dtype = next(model.parameters()).dtype
    config = gpt2_config(cfg, model.config, tokenizer.vocab_size, tokenizer, dtype)
    tensors = gpt2_state_dict(model.state_dict(), cfg.model.num_layers, cfg.model.num_attention_heads,
                              tokenizer.vocab_size, cfg.model.tie_embeddings)
    return config, tensors


def _exporters() -> dict[str, tuple[Callable[[Config], None], Callable]]:
    """family -> (check before loading weights, convert the loaded model)."""
    from pretrain import export_bert

    return {"gpt": (check_gpt2_compatible, _export_gpt),
            "bert": (export_bert.check_bert_compatible, export_bert.export_bert)}


def write_tokenizer(tokenizer, output: Path, model_max_length: int) -> None:
    """tokenizer.model (the run's sentencepiece model, unchanged) and a slow LlamaTokenizer config for it.

    LlamaTokenizer is transformers' plain sentencepiece wrapper: with no BOS/EOS added and ``legacy`` on it calls
    sentencepiece's encode directly, so ids equal ours (text containing a literal "</s>" or "<s>" aside, which
    transformers matches as special tokens). Its fast variant needs protobuf to convert the model; load with
    ``LlamaTokenizer.from_pretrained`` or ``AutoTokenizer.from_pretrained(dir, use_fast=False)``.
    """
    shutil.copyfile(tokenizer.model_path, output / "tokenizer.model")
    pieces = {"bos_token": "<s>", "eos_token": "</s>", "unk_token": "<unk>", "pad_token": "<pad>"}
    extra = {name: tokenizer.id_to_piece(i) for name, i in
             (("cls_token", tokenizer.cls_id), ("sep_token", tokenizer.sep_id), ("mask_token", tokenizer.mask_id))
             if i is not None}
    tokenizer_config = {"tokenizer_class": "LlamaTokenizer", "add_bos_token": False, "add_eos_token": False,
                        "legacy": True, "clean_up_tokenization_spaces": False, "model_max_length": model_max_length,
                        **pieces, **extra}
    (output / "tokenizer_config.json").write_text(json.dumps(tokenizer_config, indent=2) + "\n")
    (output / "special_tokens_map.json").write_text(json.dumps({**pieces, **extra}, indent=2) + "\n")


def _readme(config: dict, source: Path) -> str:
    architecture = config["architectures"][0]
    return (f"# {architecture} exported by `pretrain export hf`\n\nFrom checkpoint `{source}`.\n\n"
            "```python\nfrom transformers import AutoTokenizer, " + architecture + "\n"
            f"model = {architecture}.from_pretrained(DIR)\n"
            "tokenizer = AutoTokenizer.from_pretrained(DIR, use_fast=False)  # sentencepiece (tokenizer.model)\n"
            "```\n\nThe tokenizer adds no BOS/EOS; its ids equal the training tokenizer's. The fast tokenizer needs "
            "`protobuf` to convert tokenizer.model.\n")


def export_hf(checkpoint: str | Path, output: str | Path) -> Path:
    """Export ``checkpoint`` (step, checkpoints/ or run directory) to the Hugging Face directory ``output``."""
    from safetensors.torch import save_file

    from pretrain.inference import load_model, read_config, resolve_checkpoint, tokenizer_for

    path = resolve_checkpoint(checkpoint)
    cfg = read_config(path)
    exporters = _exporters()
    if cfg.model.family not in exporters:
        raise ConfigError(f"model.family={cfg.model.family}: no Hugging Face export (supported: "
                          f"{', '.join(exporters)})")
    check, convert = exporters[cfg.model.family]
    check(cfg)  # refuse before loading weights (minutes for a large model)
    loaded = load_model(path)
    tokenizer = tokenizer_for(loaded)
    config, tensors = convert(loaded, tokenizer)
    output = Path(output)
    output.mkdir(parents=True, exist_ok=True)
    (output / "config.json").write_text(json.dumps(config, indent=2) + "\n")
    weights = output / "model.safetensors"
    save_file({k: v.cpu() for k, v in tensors.items()}, str(weights), metadata={"format": "pt"})
    umask = os.umask(0)
    os.umask(umask)
    weights.chmod(0o666 & ~umask)  # safetensors creates the file owner-only; give it the usual permissions
    write_tokenizer(tokenizer, output, cfg.model.seq_length)
    (output / "README.md").write_text(_readme(config, path))
    params = sum(t.numel() for t in tensors.values())
    print(f"export hf: {config['architectures'][0]} ({params / 1e6:.2f}M parameters, vocab {config['vocab_size']}) "
          f"from {path} -> {output}")
    return output
