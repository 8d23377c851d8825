"""Transformer-XL (Dai et al. 2019) as a model family: segment memory + relative positions, under TP and PP.

Faithful to the reference ``kimiyoung/transformer-xl`` ``pytorch/mem_transformer.py`` (attn_type 0, tied
embeddings, no adaptive softmax): word embedding scaled by sqrt(d_model), dropout on it and on the relative
encodings, post-LN layers (transformer_xl_layers.py), each layer attending over [memory; segment], memory =
each layer's inputs of the last mem_length positions, detached (``_update_mems``), dropout before the tied output
layer (which has a bias, as the reference's ``ProjectedAdaptiveLogSoftmax`` does). Adaptive input/softmax are
left out: a plain (tensor-parallel) vocabulary is what megatron-core's embedding and cross entropy shard.

One chunk per pipeline stage: the first embeds, the last scores; every chunk keeps the memory of its own layers,
per stream lane (``forward``), so nothing but the current segment's activations [s, b, h] crosses stages.
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from megatron.core import tensor_parallel
from megatron.core.enums import ModelType
from megatron.core.transformer.module import MegatronModule
from megatron.core.transformer.transformer_block import get_num_layers_to_build
from megatron.core.transformer.transformer_layer import get_transformer_layer_offset

from data_pipeline.batches import txl_batch
from pretrain.config import Config, ModelConfig, ParallelConfig
from pretrain.errors import ConfigError
from pretrain.models.spec import BatchFn, ModelSpec, register
from pretrain.models import gpt
from pretrain.models.gpt import transformer_config
from pretrain.models.transformer_xl.data import make_readers
from pretrain.models.transformer_xl.layers import (RelPartialLearnableDecoderLayer, attention_mask, dropout, head_bias,
                                                   sinusoid_positions)

MEMORY_STATE_VERSION = 1


class OutputLayer(torch.nn.Module):
    """The output projection's own parameters: the bias [V / tp] (the reference's softmax layer has one), and
    the weight [V / tp, d] on a last stage that does not hold the embedding (a tied copy, or untied)."""

    def __init__(self, vocab_size: int, d_model: int, config, with_weight: bool):
        super().__init__()
        tp = config.tensor_model_parallel_size
        self.weight = torch.nn.Parameter(torch.empty(vocab_size // tp, d_model, dtype=config.params_dtype)) \
            if with_weight else None
        self.bias = torch.nn.Parameter(torch.zeros(vocab_size // tp, dtype=config.params_dtype))
        for param in self.parameters():
            tensor_parallel.set_tensor_model_parallel_attributes(param, is_parallel=True, dim=0, stride=1)
        if self.weight is not None:
            torch.nn.init.normal_(self.weight, 0.0, config.init_method_std)


class Decoder(torch.nn.Module):
    """Holds this chunk's layers as ``decoder.layers.N`` (megatron-core's naming, which init.py maps to global
    layer numbers through each layer's ``layer_number``)."""

    def __init__(self, layers: list[torch.nn.Module]):
        super().__init__()
        self.layers = torch.nn.ModuleList(layers)


class TransformerXL(MegatronModule):
    """One pipeline chunk of Transformer-XL (the whole model without pipelining).

    ``forward_segment`` is the functional core (explicit memory in, new memory out); ``forward`` is the
    trainer's path, which keeps memory per stream lane itself.
    """

    def __init__(self, cfg: ModelConfig, parallel: ParallelConfig, dtype: torch.dtype, vocab_size: int,
                 pre_process: bool = True, post_process: bool = True, vp_stage: int | None = None):
        if parallel.sequence_parallel:
            raise ConfigError("parallel.sequence_parallel: not supported for model.family transformer_xl")
        config = transformer_config(cfg, parallel, dtype)
        super().__init__(config)
        self.model_type = ModelType.encoder_or_decoder  # what megatron-core's schedules ask of a model
        self.cfg, self.vocab_size = cfg, vocab_size
        self.pre_process, self.post_process, self.vp_stage = pre_process, post_process, vp_stage
        self.d_model = cfg.hidden_size
        self.share_embeddings_and_output_weights = cfg.tie_embeddings
        d_head = cfg.hidden_size // cfg.num_attention_heads
        if pre_process:
            self.embedding = torch.nn.Module()
            self.embedding.word_embeddings = tensor_parallel.VocabParallelEmbedding(
                vocab_size, cfg.hidden_size, init_method=config.init_method, config=config)
        offset = get_transformer_layer_offset(config, vp_stage=vp_stage)
        self.decoder = Decoder([
            RelPartialLearnableDecoderLayer(
                config, offset + i + 1, cfg.num_attention_heads, cfg.hidden_size, d_head,
                cfg.ffn_hidden_size or 4 * cfg.hidden_size, cfg.hidden_dropout, cfg.attention_dropout,
                cfg.layernorm_epsilon, cfg.untie_r, recompute_core=parallel.activation_checkpointing == "selective")
            for i in range(get_num_layers_to_build(config, vp_stage=vp_stage))])
        if not cfg.untie_r:
            # One u/v pair for all layers. Every chunk holds a copy under the same name (init.py draws by name,
            # so the copies start equal); the engine sums their gradients over chunks and stages.
            self.r_w_bias, self.r_r_bias = head_bias(cfg.num_attention_heads, d_head, config), \
                head_bias(cfg.num_attention_heads, d_head, config)
            self.r_w_bias.pipeline_shared = self.r_r_bias.pipeline_shared = True
        if post_process:
            self.output_layer = OutputLayer(vocab_size, cfg.hidden_size, config,
                                            with_weight=not (pre_process and cfg.tie_embeddings))
        self.input_tensor: torch.Tensor | None = None
        # lane -> (offset of the segment it continues with, per-layer memory [m, b', d] tensors, column in them)
        self._memory: dict[str, dict[int, tuple[int, list[torch.Tensor], int]]] = {"train": {}, "eval": {}}

    # -- megatron-core's pipeline interface ----------------------------------------------------------------------

    def set_input_tensor(self, input_tensor) -> None:
        """The previous stage's activations [s, b, h] (megatron-core's schedules call this before forward)."""
        self.input_tensor = input_tensor[0] if isinstance(input_tensor, (list, tuple)) else input_tensor

    def shared_embedding_or_output_weight(self) -> torch.Tensor | None:
        """The word embedding on the first stage, its tied copy on the last (the engine sums their gradients)."""
        if self.pre_process:
            return self.embedding.word_embeddings.weight
        return self.output_layer.weight if self.post_process else None

    # -- the model -----------------------------------------------------------------------------------------------

    @property
    def lengths(self) -> tuple[int, int, bool]:
        """(mem_length, clamp_len, same_length) of the current mode: the eval_* values in eval mode."""
        c = self.cfg
        if self.training:
            return c.mem_length, c.clamp_len, c.same_length
        return (c.mem_length if c.eval_mem_length < 0 else c.eval_mem_length,
                c.clamp_len if c.eval_clamp_len < 0 else c.eval_clamp_len, c.eval_same_length)

    def forward_segment(self, input_ids: torch.Tensor, mems: list[torch.Tensor] | None = None,
                        labels: torch.Tensor | None = None) -> tuple[torch.Tensor, list[torch.Tensor]]:
        """One segment through this chunk's layers with explicit memory (the reference's ``_forward``).

        input_ids: int64 [b, s], batch first (a non-first stage uses only its shape and reads its input from
        ``set_input_tensor``). mems: one [m, b, d] tensor per layer of this chunk (the inputs of that layer over
        the previous m positions), or None / empty tensors for none. Returns (output, new_mems): output is the
        per-token loss [b, s] given labels [b, s], else logits [b, s, V / tp] (this TP rank's vocabulary slice);
        a chunk without the output layer returns its activations [s, b, d]. new_mems: per layer, the last
        mem_length positions of [mems; this segment's inputs], detached (``_update_mems``).
        """
        bsz, qlen = input_ids.shape
        mem_len, clamp_len, same_length = self.lengths
        if self.pre_process:
            word_emb = self.embedding.word_embeddings(input_ids.t())  # [s, b, d]
            hidden = dropout(word_emb * math.sqrt(self.d_model), self.cfg.hidden_dropout, self.training)
        else:
            hidden = self.input_tensor  # [s, b, d]
        mems = list(mems) if mems is not None else []
        if mems and len(mems) != len(self.decoder.layers):
            raise ValueError(f"forward_segment: {len(mems)} memory tensors for {len(self.decoder.layers)} layers")
        mlen = mems[0].shape[0] if mems else 0
        mask = attention_mask(qlen, mlen, mem_len, same_length, hidden.device)  # [s, klen, 1]
        pos_emb = sinusoid_positions(mlen + qlen, self.d_model, clamp_len, hidden.device, hidden.dtype)
        pos_emb = dropout(pos_emb, self.cfg.hidden_dropout, self.training)  # [klen, d]
        u, v = (None, None) if self.cfg.untie_r else (self.r_w_bias, self.r_r_bias)
        hids = []
        for i, layer in enumerate(self.decoder.layers):
            hids.append(hidden)
            hidden = layer(hidden, pos_emb, u, v, mask, mems[i] if mems else None)
        new_mems = update_mems(hids, mems, mlen, qlen, mem_len)
        if not self.post_process:
            return hidden, new_mems
        hidden = dropout(hidden, self.cfg.hidden_dropout, self.training)
        weight = self.embedding.word_embeddings.weight if self.output_layer.weight is None \
            else self.output_layer.weight
        # Identity forward, all-reduce of the input gradient backward: each TP rank scores its vocabulary slice.
        logits = F.linear(tensor_parallel.copy_to_tensor_model_parallel_region(hidden), weight,
                          self.output_layer.bias)  # [s, b, V / tp]
        if labels is None:
            return logits.transpose(0, 1).contiguous(), new_mems  # [b, s, V / tp]
        loss = tensor_parallel.vocab_parallel_cross_entropy(logits.float(), labels.t().contiguous())  # [s, b]
        return loss.t().contiguous(), new_mems  # [b, s]

    def forward(self, input_ids: torch.Tensor, positions: torch.Tensor,
                labels: torch.Tensor | None = None) -> torch.Tensor:
        """The trainer's path: ``forward_segment`` with the memory this chunk keeps per stream lane.

        positions int64 [b, 2]: (global lane id, token offset of this segment in the lane) per row. A lane's
        memory is used only if it was stored by the segment just before (its offset + length == this offset), so
        offset 0 (a lane restarting) or any gap starts it afresh; a row without usable memory makes the whole
        micro-batch run without (rows of one ordered-stream micro-batch always share their offset). Training
        and evaluation keep separate stores, so evaluating mid-training does not disturb the training memory.
        """
        lanes, offsets = positions[:, 0].tolist(), positions[:, 1].tolist()
        store = self._memory["train" if self.training else "eval"]
        output, new_mems = self.forward_segment(input_ids, self._gather(store, lanes, offsets), labels)
        qlen = input_ids.shape[1]
        for column, (lane, offset) in enumerate(zip(lanes, offsets)):
            store[lane] = (offset + qlen, new_mems, column)
        return output

    def _gather(self, store: dict, lanes: list[int], offsets: list[int]) -> list[torch.Tensor] | None:
        """Per-layer memory [m, b, d] for these rows, or None when any row has none that continues."""
        entries = [store.get(lane) for lane in lanes]
        if any(e is None or e[0] != offset for e, offset in zip(entries, offsets)):
            return None
        first = entries[0][1]
        if all(e[1] is first and e[2] == j for j, e in enumerate(entries)) and first[0].shape[1] == len(lanes):
            return first  # the same rows as last time, in the same order: no copy
        m = min(e[1][0].shape[0] for e in entries)  # rows of one stream micro-batch have equal lengths
        return [torch.stack([e[1][i][e[1][i].shape[0] - m:, e[2]] for e in entries], dim=1)
                for i in range(len(self.decoder.layers))]

    def memory_state_dict(self) -> dict[str, Any]:
        """The training memory (what a resumed run needs to continue exactly), on CPU: groups of lanes stored
        together, each with its lanes' next offsets and per-layer [m, lanes, d] tensors."""
        groups: dict[int, dict] = {}
        for lane, (offset, mems, column) in sorted(self._memory["train"].items()):
            group = groups.setdefault(id(mems), {"mems": mems, "lanes": [], "offsets": [], "columns": []})
            group["lanes"].append(lane)
            group["offsets"].append(offset)
            group["columns"].append(column)
        return {"version": MEMORY_STATE_VERSION, "mem_length": self.cfg.mem_length, "train": [
            {"lanes": g["lanes"], "offsets": g["offsets"],
             "mems": [m[:, g["columns"]].detach().cpu() for m in g["mems"]]} for g in groups.values()]}

    def load_memory_state_dict(self, state: dict[str, Any]) -> None:
        """Restore :meth:`memory_state_dict`'s training memory (moved to this chunk's device and dtype)."""
        if state.get("version") != MEMORY_STATE_VERSION:
            raise ValueError(f"Transformer-XL memory state version {state.get('version')}, expected "
                             f"{MEMORY_STATE_VERSION}")
        param = next(self.parameters())
        store = self._memory["train"] = {}
        for group in state["train"]:
            mems = [m.to(param.device, param.dtype) for m in group["mems"]]
            if len(mems) != len(self.decoder.layers):
                raise ValueError(f"Transformer-XL memory state holds {len(mems)} layers, this chunk "
                                 f"{len(self.decoder.layers)} (saved under another pipeline layout)")
            for column, (lane, offset) in enumerate(zip(group["lanes"], group["offsets"])):
                store[lane] = (offset, mems, column)
        self._memory["eval"] = {}


def update_mems(hids: list[torch.Tensor], mems: list[torch.Tensor], mlen: int, qlen: int,
                mem_len: int) -> list[torch.Tensor]:
    """The reference's ``_update_mems`` (ext_len 0): per layer, positions [end - mem_len, end) of
    [old memory; this segment's layer inputs], end = mlen + qlen, without gradient."""
    with torch.no_grad():
        end = mlen + qlen
        beg = max(0, end - mem_len)
        return [(torch.cat([mems[i], h], dim=0) if mems else h)[beg:end].detach() for i, h in enumerate(hids)]


def build(cfg: ModelConfig, parallel: ParallelConfig, dtype: torch.dtype, vocab_size: int,
          pre_process: bool = True, post_process: bool = True, vp_stage: int | None = None,
          document_masks: bool = False) -> TransformerXL:
    """One Transformer-XL chunk for this rank: embedding if ``pre_process``, output layer + loss if
    ``post_process``; the layers of this pipeline rank and ``vp_stage`` (megatron-core's even split)."""
    return TransformerXL(cfg, parallel, dtype, vocab_size, pre_process, post_process, vp_stage)


# -- the ModelSpec's data side -----------------------------------------------------------------------------------


def batch_fn(rows: np.ndarray, indices: np.ndarray, device: torch.device) -> dict[str, Any]:
    """Stream segments [b, s+1] and their (lane, offset) [b, 2] -> inputs of ``TransformerXL.forward``.

    positions stay on the CPU: the model reads them in Python to pick each lane's memory, and a device copy
    would cost a host sync per micro-batch.
    """
    arrays = txl_batch(rows)
    b, s = arrays["inputs"].shape
    indices = np.asarray(indices, dtype=np.int64)
    if indices.shape != (b, 2):
        raise ValueError(f"transformer_xl batches need (lane, offset) [b, 2] per row, got {indices.shape}")
    return {
        "inputs": {"input_ids": torch.from_numpy(arrays["inputs"]).to(device, non_blocking=True),
                   "positions": torch.from_numpy(indices.copy()),
                   "labels": torch.from_numpy(arrays["targets"]).to(device, non_blocking=True)},
        "loss_mask": torch.ones(b, s, device=device),
        "num_tokens": b * s,
    }


def make_batch_fn(cfg: Config, manifest: dict) -> BatchFn:
    """Transformer-XL batches: every target token is scored (ordered streams have no padding)."""
    return batch_fn


def flops_per_token(cfg: ModelConfig, vocab_size: int) -> float:
    """Training FLOPs per token (3x forward). Forward per layer: qkv over memory + segment 6*d*d_attn*klen/s,
    o_net 2*d*d_attn, FF 4*d*f, scores AC + BD and the weighted sum 6*klen*d_attn (klen = s + mem_length); plus
    logits 2*d*V. r_net (once per segment, not per sequence) is left out."""
    d, s, l = cfg.hidden_size, cfg.seq_length, cfg.num_layers
    f, klen = cfg.ffn_hidden_size or 4 * d, cfg.seq_length + cfg.mem_length
    per_layer = 6 * d * d * klen / s + 2 * d * d + 4 * d * f + 6 * klen * d
    return 3.0 * (l * per_layer + 2 * d * vocab_size)


# The loss is GPT's: the model returns per-token losses [b, s], and every target of an ordered stream counts.
class MemoryDecoder:
    """Incremental Transformer-XL forward: the segment memory (evaluation mem_length) is the cache.

    A model evaluated without memory (mem_length 0) has no cache to extend: each step then encodes the newest
    ``seq_length`` tokens again, as a full recomputation would.
    """

    def __init__(self, model: torch.nn.Module, seq_length: int, device: torch.device):
        self.model, self.device, self.mems = model, device, None
        self.window = seq_length if model.lengths[0] == 0 else 0  # 0: extend the memory

    def prefill(self, ids: list[int]) -> torch.Tensor:
        """Encode ``ids`` as one segment from empty memory; logits [V] of the next token."""
        self.mems, self.history = None, list(ids)
        return self._forward(ids[-self.window:] if self.window else ids)

    def step(self, token: int) -> torch.Tensor:
        """Append ``token`` (a segment of one); logits [V] of the one after it."""
        if self.window:
            return self.prefill(self.history + [token])
        return self._forward([token])

    def _forward(self, ids: list[int]) -> torch.Tensor:
        logits, self.mems = self.model.forward_segment(torch.tensor([ids], device=self.device), self.mems)
        return logits[0, -1]  # [V]


def check_config(cfg: Config) -> None:
    """Settings Transformer-XL cannot train with, as one-line ConfigErrors."""
    if cfg.parallel.activation_checkpointing == "full":
        raise ConfigError("parallel.activation_checkpointing: full recomputation would run each Transformer-XL "
                          "segment twice and update its memory twice; use none or selective")


SPEC = register(ModelSpec(
    name="transformer_xl", build=build, make_batch_fn=make_batch_fn, loss_fn=gpt.loss_fn,
    flops_per_token=flops_per_token, make_readers=make_readers, check_config=check_config,
    decoder=lambda model, cfg, device: MemoryDecoder(model, cfg.seq_length, device)))
