"""``pretrain export hf``: a checkpoint as a Hugging Face model directory.

The checkpoint's family names its conversion in its ModelSpec (``hf_export``): GPT becomes ``GPT2LMHeadModel``
(gpt2.py), BERT ``BertForPreTraining`` (bert.py). The directory holds config.json, model.safetensors, the
tokenizer (the sentencepiece ``tokenizer.model`` plus a slow ``LlamaTokenizer`` config, which encodes with the same
ids) and a README.md.
"""

from __future__ import annotations

import json
from pathlib import Path

from pretrain import models
from pretrain.errors import ConfigError
from pretrain.hf import bert, gpt2
from pretrain.hf.common import model_card, save_safetensors, write_tokenizer
from pretrain.inference.loading import load_model, read_config, resolve_checkpoint, tokenizer_for
from pretrain.models.spec import FAMILIES

#: ModelSpec.hf_export -> its conversion module: ``check(cfg)`` before any weight loads, ``convert(loaded,
#: tokenizer)`` -> (config.json, tensors).
CONVERSIONS = {"gpt2": gpt2, "bert": bert}


def export_hf(checkpoint: str | Path, output: str | Path) -> Path:
    """Export ``checkpoint`` (step, checkpoints/ or run directory) to the Hugging Face directory ``output``."""
    path = resolve_checkpoint(checkpoint)
    cfg = read_config(path)
    conversion = CONVERSIONS.get(models.get(cfg.model.family).hf_export)
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
    save_safetensors(tensors, output / "model.safetensors")
    write_tokenizer(tokenizer, output, cfg.model.seq_length)
    (output / "README.md").write_text(model_card(config, path))
    params = sum(t.numel() for t in tensors.values())
    print(f"export hf: {config['architectures'][0]} ({params / 1e6:.2f}M parameters, vocab {config['vocab_size']}) "
          f"from {path} -> {output}")
    return output
