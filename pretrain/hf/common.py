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


def merge_qkv(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, num_heads: int, num_groups: int) -> torch.Tensor:
    """(q, k, v) rows in head order -> megatron-core's fused QKV rows, the inverse of :func:`split_qkv`.
    q [nh * d, ...], k and v [ng * d, ...] -> [ng * (nh/ng + 2) * d, ...]."""
    rest, head_dim = q.shape[1:], q.shape[0] // num_heads
    grouped = [q.reshape(num_groups, num_heads // num_groups, head_dim, *rest),  # [ng, q/g, d, ...]
               k.reshape(num_groups, 1, head_dim, *rest), v.reshape(num_groups, 1, head_dim, *rest)]
    return torch.cat(grouped, dim=1).reshape(-1, *rest)


def write_tokenizer(tokenizer, output: Path, model_max_length: int) -> None:
    """tokenizer.model (the run's sentencepiece model, unchanged) and a slow LlamaTokenizer config for it.

    LlamaTokenizer is transformers' plain sentencepiece wrapper: with no BOS/EOS added and ``legacy`` on it calls
    sentencepiece's encode directly, so ids equal ours (text containing a literal "</s>" or "<s>" aside, which
    transformers matches as special tokens). ``AutoTokenizer.from_pretrained(dir)`` gives its fast variant, converted
    from the model with protobuf installed (same ids, tested); ``use_fast=False`` the slow one without.
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
            "tokenizer = AutoTokenizer.from_pretrained(DIR)  # from tokenizer.model (sentencepiece)\n"
            "```\n\nThe tokenizer adds no BOS/EOS; its ids equal the training tokenizer's. The fast tokenizer (the "
            "default) needs `protobuf` to convert tokenizer.model; `use_fast=False` does not.\n")


def save_safetensors(tensors: dict[str, torch.Tensor], path: Path) -> None:
    """``tensors`` as a safetensors file at ``path`` (metadata format pt, as transformers writes), readable by all
    like any other file the export writes."""
    from safetensors.torch import save_file

    save_file({k: v.cpu() for k, v in tensors.items()}, str(path), metadata={"format": "pt"})
    umask = os.umask(0)
    os.umask(umask)
    path.chmod(0o666 & ~umask)  # safetensors creates the file owner-only; give it the usual permissions


def save_sharded(tensors: dict[str, torch.Tensor], output: Path, max_shard_bytes: int) -> int:
    """``tensors`` as model.safetensors, or, above ``max_shard_bytes``, as model-0000i-of-0000n.safetensors shards
    (in the tensors' order, each at most ``max_shard_bytes`` unless one tensor alone is larger) with
    model.safetensors.index.json mapping each tensor to its file, the layout transformers' save_pretrained writes
    and from_pretrained reads. Returns the number of files."""
    shards: list[dict[str, torch.Tensor]] = [{}]
    size = 0
    for name, tensor in tensors.items():
        nbytes = tensor.numel() * tensor.element_size()
        if shards[-1] and size + nbytes > max_shard_bytes:
            shards.append({})
            size = 0
        shards[-1][name] = tensor
        size += nbytes
    for stale in [*output.glob("model*.safetensors"), output / "model.safetensors.index.json"]:
        stale.unlink(missing_ok=True)  # a re-export must not leave another shard count's files behind
    if len(shards) == 1:
        save_safetensors(tensors, output / "model.safetensors")
        return 1
    weight_map = {}
    for i, shard in enumerate(shards, 1):
        name = f"model-{i:05d}-of-{len(shards):05d}.safetensors"
        save_safetensors(shard, output / name)
        weight_map.update({tensor: name for tensor in shard})
    total = sum(t.numel() * t.element_size() for t in tensors.values())
    index = {"metadata": {"total_size": total}, "weight_map": weight_map}
    (output / "model.safetensors.index.json").write_text(json.dumps(index, indent=2) + "\n")
    return len(shards)


def generation_config(config: dict) -> dict:
    """generation_config.json for a decoder's config.json: its special token ids, greedy by default."""
    return {"bos_token_id": config["bos_token_id"], "eos_token_id": config["eos_token_id"],
            "pad_token_id": config["pad_token_id"], "do_sample": False,
            "max_length": config.get("max_position_embeddings", config.get("n_positions"))}
