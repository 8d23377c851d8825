"""``pretrain import hf``: a local Hugging Face model directory (GPT-2, Llama, BERT, RoFormer) as our step-0
checkpoint, at the layout the run config asks for, ready for ``pretrain train`` (continued pretraining) or
``pretrain finetune``.

The config's model section must describe the HF model: every field HF's config.json fixes is compared first, before
any process group or weight, and the first mismatch is a one-line ConfigError naming our key and HF's. Then the run is
built exactly as ``pretrain train`` builds it (process groups, DeepSpeed engine, ZeRO partitions), with the HF weights
in place of the random init, and saved as ``step_0`` by the checkpoint manager: the same files, marker and layout a
training run writes. Runs as one process or under torchrun / srun with the config's world, like ``pretrain train``.

Conversion is the inverse of the export's (gpt2.py, llama.py, bert.py); export -> import -> export gives the same
bytes (tests/integration/test_import_hf.py). Every rank reads only the tensors it holds from the memory-mapped
safetensors files, one at a time, and cuts its tensor-parallel shard (models/init.py ``tp_shard``).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Callable

import torch

from pretrain.config import Config
from pretrain.errors import CheckpointError, ConfigError
from pretrain.hf import bert, llama
from pretrain.hf.common import merge_qkv, pairs_to_halves
from pretrain.hf.gpt2 import GPT2_ACTIVATIONS


def read_hf_config(model_dir: Path) -> dict[str, Any]:
    """config.json of a Hugging Face model directory; a one-line CheckpointError when it is missing or unreadable."""
    path = model_dir / "config.json"
    try:
        return json.loads(path.read_text())
    except (OSError, json.JSONDecodeError) as e:
        raise CheckpointError(f"{path}: not a readable Hugging Face config ({e})") from None


def expected_fields(cfg: Config, hf: dict[str, Any]) -> list[tuple[str, Any, str, Any]]:
    """(our key, our value, HF key, HF value) that must agree for the HF model's ``model_type``; a one-line
    ConfigError for a model type we do not import."""
    m = cfg.model
    kind = hf.get("model_type")
    ffn = m.ffn_hidden_size or 4 * m.hidden_size
    if kind == "gpt2":
        return [("family", m.family, "model_type", "gpt"), ("num_layers", m.num_layers, "n_layer", hf["n_layer"]),
                ("hidden_size", m.hidden_size, "n_embd", hf["n_embd"]),
                ("num_attention_heads", m.num_attention_heads, "n_head", hf["n_head"]),
                ("ffn_hidden_size", ffn, "n_inner", hf.get("n_inner") or 4 * hf["n_embd"]),
                ("seq_length", m.seq_length, "n_positions", hf["n_positions"]),
                ("activation", GPT2_ACTIVATIONS.get(m.activation), "activation_function", hf["activation_function"]),
                ("layernorm_epsilon", m.layernorm_epsilon, "layer_norm_epsilon", hf["layer_norm_epsilon"]),
                ("tie_embeddings", m.tie_embeddings, "tie_word_embeddings", hf.get("tie_word_embeddings", True)),
                ("position_embedding", m.position_embedding, "model_type", "learned_absolute"),
                ("normalization", m.normalization, "model_type", "layernorm"),
                ("num_query_groups", m.num_query_groups, "model_type", 0),
                ("add_bias_linear", m.add_bias_linear, "model_type", True)]
    if kind == "llama":
        return [("family", m.family, "model_type", "gpt"),
                ("num_layers", m.num_layers, "num_hidden_layers", hf["num_hidden_layers"]),
                ("hidden_size", m.hidden_size, "hidden_size", hf["hidden_size"]),
                ("num_attention_heads", m.num_attention_heads, "num_attention_heads", hf["num_attention_heads"]),
                ("num_query_groups", m.num_query_groups or m.num_attention_heads, "num_key_value_heads",
                 hf.get("num_key_value_heads") or hf["num_attention_heads"]),
                ("ffn_hidden_size", ffn, "intermediate_size", hf["intermediate_size"]),
                ("layernorm_epsilon", m.layernorm_epsilon, "rms_norm_eps", hf["rms_norm_eps"]),
                ("rope_theta", m.rope_theta, "rope_theta", float(hf.get("rope_theta", 10000.0))),
                ("tie_embeddings", m.tie_embeddings, "tie_word_embeddings", hf.get("tie_word_embeddings", False)),
                ("activation", m.activation, "hidden_act", "swiglu" if hf.get("hidden_act") == "silu" else
                 hf.get("hidden_act")),
                ("add_bias_linear", m.add_bias_linear, "attention_bias", hf.get("attention_bias", False)),
                ("position_embedding", m.position_embedding, "model_type", "rope"),
                *llama.rope_scaling_fields(m, hf),
                ("normalization", m.normalization, "model_type", "rmsnorm")]
    if kind in ("bert", "roformer"):
        shared = [("family", m.family, "model_type", "bert"),
                  ("num_layers", m.num_layers, "num_hidden_layers", hf["num_hidden_layers"]),
                  ("hidden_size", m.hidden_size, "hidden_size", hf["hidden_size"]),
                  ("num_attention_heads", m.num_attention_heads, "num_attention_heads", hf["num_attention_heads"]),
                  ("ffn_hidden_size", ffn, "intermediate_size", hf["intermediate_size"]),
                  ("seq_length", m.seq_length, "max_position_embeddings", hf["max_position_embeddings"]),
                  ("activation", m.activation, "hidden_act", hf["hidden_act"]),
                  ("layernorm_epsilon", m.layernorm_epsilon, "layer_norm_eps", hf["layer_norm_eps"]),
                  ("tie_embeddings", m.tie_embeddings, "tie_word_embeddings", hf.get("tie_word_embeddings", True))]
        if kind == "roformer":  # BERT with rotary q/k (bert.py): no pooler / NSP head, base 10000, plain embeddings
            return [*shared, ("position_embedding", m.position_embedding, "model_type", "rope"),
                    ("nsp", m.nsp, "architectures", False),  # RoFormerForMaskedLM: no NSP head
                    ("rope_theta", m.rope_theta, "model_type", bert.ROFORMER_ROPE_THETA),
                    ("rope_scaling_factor", m.rope_scaling_factor, "model_type", 0.0),
                    ("hidden_size", m.hidden_size, "embedding_size", hf.get("embedding_size") or hf["hidden_size"])]
        nsp = "BertForMaskedLM" not in hf.get("architectures", ["BertForPreTraining"])
        return [*shared, ("nsp", m.nsp, "architectures", nsp),
                ("position_embedding", m.position_embedding, "position_embedding_type",
                 {"absolute": "learned_absolute"}.get(hf.get("position_embedding_type", "absolute")))]
    raise ConfigError(f"model_type={kind!r} in config.json: import supports gpt2, llama, bert and roformer")


def check_config(cfg: Config, hf: dict[str, Any], model_dir: Path) -> None:
    """The run config's model section against HF's config.json: a one-line ConfigError at the first mismatch."""
    for key, ours, hf_key, theirs in expected_fields(cfg, hf):
        if ours != theirs:
            raise ConfigError(f"model.{key}: {ours!r} in the config, but {model_dir}/config.json has {hf_key} = "
                              f"{theirs!r}")
    if cfg.model.family == "bert" and hf.get("type_vocab_size", 2) != 2:
        raise ConfigError(f"{model_dir}/config.json: type_vocab_size = {hf['type_vocab_size']}; our BERT has 2")
    if hf.get("model_type") == "roformer" and hf.get("rotary_value"):
        raise ConfigError(f"{model_dir}/config.json: rotary_value = true; our BERT rotates queries and keys only")


class HFTensors:
    """The tensors of a HF directory (model.safetensors, or the shards its index names): ``get`` reads one tensor.

    Each read opens its file anew (safetensors memory-maps it, reading only the header) and closes it: pages a
    mapping has read stay in the resident set while it is open, so one long-lived handle would grow RSS by the
    file's size over the import; an open costs well under a millisecond."""

    def __init__(self, model_dir: Path):
        from safetensors import safe_open

        index = model_dir / "model.safetensors.index.json"
        if index.is_file():
            files = sorted(set(json.loads(index.read_text())["weight_map"].values()))
        elif (model_dir / "model.safetensors").is_file():
            files = ["model.safetensors"]
        else:
            raise CheckpointError(f"{model_dir}: no model.safetensors (nor index); save the model with "
                                  "safe_serialization=True")
        self.where = {}
        for file in files:
            with safe_open(str(model_dir / file), framework="pt") as handle:
                self.where.update(dict.fromkeys(handle.keys(), file))
        self.model_dir = model_dir

    def get(self, name: str) -> torch.Tensor:
        from safetensors import safe_open

        if name not in self.where:
            raise CheckpointError(f"{self.model_dir}: tensor {name} missing")
        with safe_open(str(self.model_dir / self.where[name]), framework="pt") as handle:
            return handle.get_tensor(name)  # a copy of its own: the mapping closes here


def _layer_of(name: str) -> tuple[int, str]:
    parts = name.split(".")
    return int(parts[2]), ".".join(parts[3:])  # decoder.layers.<i>.<rest> / encoder.layers.<i>.<rest>


def gpt2_tensor(hf: HFTensors, name: str, config: dict) -> torch.Tensor:
    """Our GPT tensor ``name`` (whole model, canonical) from a GPT2LMHeadModel's tensors (inverse of gpt2.py)."""
    heads = config["n_head"]
    get = lambda key: hf.get(key if key in hf.where else key.removeprefix("transformer."))  # noqa: E731
    top = {"embedding.word_embeddings.weight": "transformer.wte.weight",
           "embedding.position_embeddings.weight": "transformer.wpe.weight",
           "decoder.final_layernorm.weight": "transformer.ln_f.weight",
           "decoder.final_layernorm.bias": "transformer.ln_f.bias", "output_layer.weight": "lm_head.weight"}
    if name in top:
        return get(top[name])
    i, rest = _layer_of(name)
    h = f"transformer.h.{i}."
    norms = {"input_layernorm": "ln_1", "pre_mlp_layernorm": "ln_2"}
    module, kind = rest.rsplit(".", 1)
    if module in norms:
        return get(f"{h}{norms[module]}.{kind}")
    if module == "self_attention.linear_qkv":
        fused = get(f"{h}attn.c_attn.{kind}")  # weight Conv1D [h, 3h]: rows of nn.Linear are its columns
        fused = fused.t() if kind == "weight" else fused
        return merge_qkv(*fused.chunk(3, dim=0), heads, heads)
    conv = {"self_attention.linear_proj": "attn.c_proj", "mlp.linear_fc1": "mlp.c_fc", "mlp.linear_fc2": "mlp.c_proj"}
    tensor = get(f"{h}{conv[module]}.{kind}")
    return tensor.t() if kind == "weight" else tensor  # Conv1D [in, out] -> nn.Linear [out, in]


def llama_tensor(hf: HFTensors, name: str, config: dict) -> torch.Tensor:
    """Our GPT tensor ``name`` from a LlamaForCausalLM's tensors (inverse of llama.py)."""
    heads = config["num_attention_heads"]
    groups = config.get("num_key_value_heads") or heads
    top = {"embedding.word_embeddings.weight": "model.embed_tokens.weight",
           "decoder.final_layernorm.weight": "model.norm.weight", "output_layer.weight": "lm_head.weight"}
    if name in top:
        return hf.get(top[name])
    i, rest = _layer_of(name)
    for ours, theirs in llama.LAYER_NAMES.items():
        if ours.format(i=i) == name:
            return hf.get(theirs.format(i=i))
    attn, mlp = f"model.layers.{i}.self_attn.", f"model.layers.{i}.mlp."
    if rest == "self_attention.linear_qkv.weight":
        return merge_qkv(hf.get(attn + "q_proj.weight"), hf.get(attn + "k_proj.weight"),
                         hf.get(attn + "v_proj.weight"), heads, groups)
    if rest == "mlp.linear_fc1.weight":
        return torch.cat([hf.get(mlp + "gate_proj.weight"), hf.get(mlp + "up_proj.weight")])  # [gate; up]
    raise CheckpointError(f"no LlamaForCausalLM tensor for our {name}")


def bert_tensor(hf: HFTensors, name: str, config: dict) -> torch.Tensor:
    """Our BERT tensor ``name`` from a BertForPreTraining / BertForMaskedLM's tensors, or a RoFormerForMaskedLM's
    (inverse of bert.py)."""
    heads, rotary = config["num_attention_heads"], config["model_type"] == "roformer"
    top = "roformer" if rotary else "bert"
    names = bert.hf_names(rotary)
    tops = {"embedding.word_embeddings.weight": f"{top}.embeddings.word_embeddings.weight",
            "embedding.position_embeddings.weight": "bert.embeddings.position_embeddings.weight",
            "embedding.tokentype_embeddings.weight": f"{top}.embeddings.token_type_embeddings.weight",
            "output_layer.bias": "cls.predictions.bias", "output_layer.weight": "cls.predictions.decoder.weight"}
    if name in tops:
        return hf.get(tops[name])
    module, kind = name.rsplit(".", 1)
    for ours, theirs in names.items():
        if "{i}" not in ours and ours == module:
            return hf.get(f"{theirs}.{kind}")
    i, rest = _layer_of(name)
    for ours, theirs in names.items():
        if ours.format(i=i) == module:
            return hf.get(f"{theirs.format(i=i)}.{kind}")
    if rest.startswith("self_attention.linear_qkv."):
        prefix = f"{top}.encoder.layer.{i}.attention.self."
        q, k, v = (hf.get(f"{prefix}{part}.{kind}") for part in ("query", "key", "value"))
        if rotary:  # RoFormer rotates adjacent pairs of a head, megatron-core its halves
            q, k = pairs_to_halves(q, heads), pairs_to_halves(k, heads)
        return merge_qkv(q, k, v, heads, heads)
    raise CheckpointError(f"no Hugging Face BERT tensor for our {name}")


CONVERTERS: dict[str, Callable[[HFTensors, str, dict], torch.Tensor]] = {
    "gpt2": gpt2_tensor, "llama": llama_tensor, "bert": bert_tensor, "roformer": bert_tensor}


def hf_initializer(model_dir: Path, hf_config: dict) -> Callable[[list[torch.nn.Module], int], None]:
    """``init(chunks, tokenizer vocab)`` for pretrain.train.build: every parameter of this rank's chunks set from
    the HF tensors (its tensor-parallel shard; vocabulary padding rows zero)."""
    from megatron.core import parallel_state

    from pretrain.models.init import _full_shape, full_model_name, tp_shard

    def init(chunks: list[torch.nn.Module], vocab_size: int) -> None:
        if hf_config["vocab_size"] != vocab_size:
            raise ConfigError(f"model.vocab_size: the run's tokenizer has {vocab_size} ids, {model_dir}/config.json "
                              f"has vocab_size = {hf_config['vocab_size']} (import with the model's own tokenizer)")
        tensors, convert = HFTensors(model_dir), CONVERTERS[hf_config["model_type"]]
        tp_rank = parallel_state.get_tensor_model_parallel_rank()
        tp_size = parallel_state.get_tensor_model_parallel_world_size()
        with torch.no_grad():
            for chunk in chunks:
                gated = getattr(chunk.config, "gated_linear_unit", False)
                for local_name, param in chunk.named_parameters():
                    name = full_model_name(chunk, local_name)
                    full = convert(tensors, name, hf_config).to(torch.float32)
                    shape = _full_shape(param, tp_size)
                    if list(full.shape) != shape:  # the vocabulary: zero rows up to the padded size
                        if full.shape[1:] != tuple(shape[1:]) or full.shape[0] > shape[0]:
                            raise CheckpointError(f"{model_dir}: {name} has shape {tuple(full.shape)}, our model "
                                                  f"needs {tuple(shape)}")
                        full = torch.cat([full, full.new_zeros(shape[0] - full.shape[0], *shape[1:])])
                    param.copy_(tp_shard(full, param, tp_rank, tp_size, gated and "linear_fc1" in name))
    return init


def _weights_bytes(model_dir: Path) -> int:
    """Bytes of the HF directory's safetensors files (the weights and their small headers)."""
    return sum(f.stat().st_size for f in model_dir.glob("model*.safetensors"))


def import_hf(model_dir: str | Path, cfg: Config) -> int:
    """Build the run ``cfg`` describes with the HF weights of ``model_dir`` and save it as step_0 under its
    checkpoint directory; returns 0. One process, or every rank of a torchrun / srun launch."""
    import torch.distributed as dist

    from pretrain.hf.stream import PeakRSS
    from pretrain.parallel import env
    from pretrain.train import build, start

    model_dir = Path(model_dir)
    hf_config = read_hf_config(model_dir)
    check_config(cfg, hf_config, model_dir)  # before any process group or weight
    memory = PeakRSS()
    dims, device = start(cfg)
    try:
        trainer = build(cfg, dims, device, init=hf_initializer(model_dir, hf_config))
        try:
            trainer.save()  # step 0: the HF weights, fresh optimizer state, data position at the start
            trainer.checkpoints.wait()
            trainer.metrics.close()
        finally:
            trainer.watchdog.close()
        if dist.get_rank() == 0:
            print(f"import hf: {hf_config.get('architectures', ['?'])[0]} from {model_dir} -> "
                  f"{trainer.checkpoints.path(0)} (layout {trainer.checkpoints.layout}; rank 0: "
                  f"{memory.summary(_weights_bytes(model_dir))})")
    finally:
        env.shutdown()
    return 0
