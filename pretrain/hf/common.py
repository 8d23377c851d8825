"""Pieces every Hugging Face conversion shares: megatron-core's fused QKV split per key/value group, the two rotary
layouts, the tokenizer files, the model card, and the reading of our tensors one at a time (:class:`OurTensors`)."""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Callable, Iterable

import torch

from pretrain.errors import CheckpointError
from pretrain.models.layer_names import EXTRA_STATE


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


def halves_to_pairs(rows: torch.Tensor, num_heads: int) -> torch.Tensor:
    """Query or key rows (weight [nh * d, ...] or bias [nh * d]) from megatron-core's rotary layout, which rotates
    dimension i of a head with i + d/2 (``rotate_half``), to the interleaved one, which rotates 2i with 2i + 1
    (RoFormer's): row 2i <- row i, row 2i + 1 <- row i + d/2, per head."""
    rest = rows.shape[1:]
    return rows.reshape(num_heads, 2, -1, *rest).transpose(1, 2).reshape(-1, *rest)


def pairs_to_halves(rows: torch.Tensor, num_heads: int) -> torch.Tensor:
    """The inverse of :func:`halves_to_pairs`."""
    rest = rows.shape[1:]
    return rows.reshape(num_heads, -1, 2, *rest).transpose(1, 2).reshape(-1, *rest)


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


class OurTensors:
    """Our model's tensors as a conversion takes them: ``take(name)`` reads each one when it is needed (``read``),
    once; a missing name, or one never taken (no place in the Hugging Face model, ``check_all_taken``), is a
    one-line CheckpointError naming it. ``names``: every tensor of ours (megatron's ``_extra_state`` ignored)."""

    def __init__(self, names: Iterable[str], read: Callable[[str], torch.Tensor], target: str):
        self.left = dict.fromkeys(n for n in names if not n.endswith(EXTRA_STATE))
        self.read, self.target = read, target

    def take(self, name: str) -> torch.Tensor:
        if name not in self.left:
            raise CheckpointError(f"model tensor {name} missing; cannot build {self.target} weights")
        del self.left[name]
        return self.read(name).detach()

    def check_all_taken(self) -> None:
        if self.left:
            raise CheckpointError(f"model tensor {next(iter(self.left))} has no {self.target} counterpart "
                                  f"({len(self.left)} such); cannot export")


def generation_config(config: dict) -> dict:
    """generation_config.json for a decoder's config.json: its special token ids, greedy by default."""
    return {"bos_token_id": config["bos_token_id"], "eos_token_id": config["eos_token_id"],
            "pad_token_id": config["pad_token_id"], "do_sample": False,
            "max_length": config.get("max_position_embeddings", config.get("n_positions"))}
