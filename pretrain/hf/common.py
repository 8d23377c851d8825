"""Pieces every Hugging Face conversion shares: megatron-core's fused QKV split per key/value group, the tokenizer
files, the model card, and the safetensors file."""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import torch


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


def model_card(config: dict, source: Path) -> str:
    """README.md of an exported directory: where it came from and how to load it."""
    architecture = config["architectures"][0]
    return (f"# {architecture} exported by `pretrain export hf`\n\nFrom checkpoint `{source}`.\n\n"
            "```python\nfrom transformers import AutoTokenizer, " + architecture + "\n"
            f"model = {architecture}.from_pretrained(DIR)\n"
            "tokenizer = AutoTokenizer.from_pretrained(DIR, use_fast=False)  # sentencepiece (tokenizer.model)\n"
            "```\n\nThe tokenizer adds no BOS/EOS; its ids equal the training tokenizer's. The fast tokenizer needs "
            "`protobuf` to convert tokenizer.model.\n")


def save_safetensors(tensors: dict[str, torch.Tensor], path: Path) -> None:
    """``tensors`` as a safetensors file at ``path`` (metadata format pt, as transformers writes), readable by all
    like any other file the export writes."""
    from safetensors.torch import save_file

    save_file({k: v.cpu() for k, v in tensors.items()}, str(path), metadata={"format": "pt"})
    umask = os.umask(0)
    os.umask(umask)
    path.chmod(0o666 & ~umask)  # safetensors creates the file owner-only; give it the usual permissions
