"""``pretrain export hf``: a checkpoint as a Hugging Face model directory.

The checkpoint's family names its conversion in its ModelSpec (``hf_export``): GPT becomes ``GPT2LMHeadModel``
(gpt2.py), or ``LlamaForCausalLM`` when it has rotary positions (llama.py), BERT ``BertForPreTraining`` (bert.py).
The directory holds config.json, generation_config.json (decoders), the weights (model.safetensors, or shards of at
most ``max_shard_bytes`` with model.safetensors.index.json, as transformers' save_pretrained writes them), the
tokenizer (the sentencepiece ``tokenizer.model`` plus a slow ``LlamaTokenizer`` config, which encodes with the same
ids) and a README.md.
"""

from __future__ import annotations

import json
from pathlib import Path

from pretrain import models
from pretrain.errors import ConfigError
from pretrain.hf import bert, gpt2, llama
from pretrain.hf.common import generation_config, model_card, save_sharded, write_tokenizer
from pretrain.inference.loading import load_model, read_config, resolve_checkpoint, tokenizer_for
from pretrain.models.spec import FAMILIES

#: ModelSpec.hf_export -> its conversion module: ``check(cfg)`` before any weight loads, ``convert(loaded,
#: tokenizer)`` -> (config.json, tensors).
CONVERSIONS = {"gpt2": gpt2, "bert": bert, "llama": llama}
#: transformers' save_pretrained default shard size (5 GB).
MAX_SHARD_BYTES = 5 * 10**9


def conversion_for(cfg):
    """The conversion module for this config: the family's, GPT-2 turned Llama for a rotary GPT; None: none."""
    name = models.get(cfg.model.family).hf_export
    if name == "gpt2" and llama.is_llama_shaped(cfg.model):
        name = "llama"
    return CONVERSIONS.get(name)


def export_hf(checkpoint: str | Path, output: str | Path, max_shard_bytes: int = MAX_SHARD_BYTES) -> Path:
    """Export ``checkpoint`` (step, checkpoints/ or run directory) to the Hugging Face directory ``output``."""
    path = resolve_checkpoint(checkpoint)
    cfg = read_config(path)
    conversion = conversion_for(cfg)
    if conversion is None:
        families = [name for name in FAMILIES if models.get(name).hf_export]
        raise ConfigError(f"model.family={cfg.model.family}: no Hugging Face export (supported: "
                          f"{', '.join(families)})")
    conversion.check(cfg)  # refuse before loading weights (minutes for a large model)
    loaded = load_model(path)
    tokenizer = tokenizer_for(loaded)
    config, tensors = conversion.convert(loaded, tokenizer)
    output = Path(output)
    output.mkdir(parents=True, exist_ok=True)
    (output / "config.json").write_text(json.dumps(config, indent=2) + "\n")
    files = save_sharded(tensors, output, max_shard_bytes)
    if models.get(cfg.model.family).decoder is not None:
        (output / "generation_config.json").write_text(json.dumps(generation_config(config), indent=2) + "\n")
    write_tokenizer(tokenizer, output, cfg.model.seq_length)
    (output / "README.md").write_text(model_card(config, path))
    params = sum(t.numel() for t in tensors.values())
    print(f"export hf: {config['architectures'][0]} ({params / 1e6:.2f}M parameters, vocab {config['vocab_size']}) "
          f"from {path} -> {output} ({files} safetensors file{'s' if files > 1 else ''})")
    return output
