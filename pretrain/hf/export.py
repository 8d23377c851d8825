"""``pretrain export hf``: a checkpoint as a Hugging Face model directory.

The checkpoint's family names its conversion in its ModelSpec (``hf_export``): GPT becomes ``GPT2LMHeadModel``
(gpt2.py), or ``LlamaForCausalLM`` when it has rotary positions (llama.py), BERT ``BertForPreTraining``, or
``RoFormerForMaskedLM`` when it has rotary positions (bert.py).
The directory holds config.json, generation_config.json (decoders), the weights (model.safetensors, or shards of at
most ``max_shard_bytes`` with model.safetensors.index.json, as transformers' save_pretrained writes them), the
tokenizer (the sentencepiece ``tokenizer.model`` plus a slow ``LlamaTokenizer`` config, which encodes with the same
ids) and a README.md.

Streaming: the model is built on the meta device only (names, shapes), our tensors are read one at a time from the
memory-mapped checkpoint files (tensor-parallel shards joined for that tensor alone, pipeline stages found by
name), converted, and written at their place in the safetensors files (pretrain/hf/stream.py), so the export
needs about one tensor's memory above the process's own, whatever the model's size; the command reports its peak
RSS against the weights' size (tests/integration/test_hf_streaming.py holds it under half of them).
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import torch

from pretrain import models
from pretrain.errors import ConfigError
from pretrain.hf import bert, gpt2, llama
from pretrain.hf.common import generation_config, model_card, write_tokenizer
from pretrain.hf.stream import PeakRSS, ShardedSafetensorsWriter, nbytes
from pretrain.inference.loading import model_skeleton, read_config, resolve_checkpoint, tensor_reader, tokenizer_for
from pretrain.models.spec import FAMILIES

#: ModelSpec.hf_export -> its conversion module: ``check(cfg)`` before any weight loads, ``convert(loaded,
#: tokenizer, read)`` -> (config.json, (name, tensor) one at a time).
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
    """Export ``checkpoint`` (step, checkpoints/ or run directory) to the Hugging Face directory ``output``,
    streaming: one tensor of ours read, converted and written at a time (module docstring)."""
    path = resolve_checkpoint(checkpoint)
    cfg = read_config(path)
    conversion = conversion_for(cfg)
    if conversion is None:
        families = [name for name in FAMILIES if models.get(name).hf_export]
        raise ConfigError(f"model.family={cfg.model.family}: no Hugging Face export (supported: "
                          f"{', '.join(families)})")
    conversion.check(cfg)  # refuse before loading weights (minutes for a large model)
    skeleton = model_skeleton(path)  # on the meta device: names, shapes, dtype, megatron-core config
    tokenizer = tokenizer_for(skeleton)
    meta = {name: t for name, t in skeleton.model.state_dict().items() if torch.is_tensor(t)}
    # The conversion run on meta tensors gives every Hugging Face tensor's name, dtype and shape without reading a
    # weight (strays refused here too): the safetensors headers and shards are fixed before the data is written.
    config, planned = conversion.convert(skeleton, tokenizer, meta.__getitem__)
    specs = {name: (t.dtype, tuple(t.shape)) for name, t in planned}
    output = Path(output)
    output.mkdir(parents=True, exist_ok=True)
    (output / "config.json").write_text(json.dumps(config, indent=2) + "\n")
    memory = PeakRSS()
    writer = ShardedSafetensorsWriter(specs, output, max_shard_bytes)
    for name, tensor in conversion.convert(skeleton, tokenizer, tensor_reader(skeleton))[1]:
        writer.write(name, tensor)
        del tensor  # the one tensor in memory goes before the next is read
    files = writer.close()
    if models.get(cfg.model.family).decoder is not None:
        (output / "generation_config.json").write_text(json.dumps(generation_config(config), indent=2) + "\n")
    write_tokenizer(tokenizer, output, cfg.model.seq_length)
    (output / "README.md").write_text(model_card(config, path))
    params = sum(math.prod(shape) for _, shape in specs.values())
    weights = sum(nbytes(spec) for spec in specs.values())
    print(f"export hf: {config['architectures'][0]} ({params / 1e6:.2f}M parameters, vocab {config['vocab_size']}) "
          f"from {path} -> {output} ({files} safetensors file{'s' if files > 1 else ''}; {memory.summary(weights)})")
    return output
