"""ModelSpec registry: everything the trainer needs to know about a model family, behind one record.

The trainer never branches on the family. A family is a module that calls :func:`register` with a
:class:`ModelSpec`; BERT and Transformer-XL slot in the same way as GPT.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable

import numpy as np
import torch

from pretrain.config import Config, ConfigError, ModelConfig, ParallelConfig

#: (rows [b, s+1], where each row sits in the data order (the reader's last_indices), device) -> batch dict;
#: batch["inputs"] are the model's keyword arguments, batch["loss_mask"] weights the loss, batch["num_tokens"]
#: counts trained tokens. The position is the global sample index int64 [b] for shuffled readers, and
#: (lane, token offset) int64 [b, 2] for an ordered stream (Transformer-XL).
BatchFn = Callable[[np.ndarray, np.ndarray, torch.device], dict[str, Any]]


@dataclass(frozen=True)
class ModelSpec:
    """How to build, feed and score one model family."""

    name: str
    #: (model cfg, parallel cfg, params dtype, padded vocab size, *, pre_process, post_process, vp_stage,
    #: document_masks) -> one pipeline chunk of the model for this rank (the whole model when pipeline
    #: parallelism is 1). ``document_masks``: batches carry per-document attention masks (data.reset_at_eos), so
    #: the layers must honour a mask (GPT then keeps to the local spec); BERT's and Transformer-XL's local layers
    #: always do.
    build: Callable[..., torch.nn.Module]
    #: (run config, data manifest) -> the BatchFn for this run (binds options such as special token ids).
    make_batch_fn: Callable[[Config, dict], BatchFn]
    #: (model output, batch) -> scalar loss averaged over this rank's loss tokens.
    loss_fn: Callable[[torch.Tensor, dict[str, Any]], torch.Tensor]
    #: (model cfg, padded vocab size) -> training FLOPs per token (forward + backward), for MFU.
    flops_per_token: Callable[[ModelConfig, int], float]
    #: (run config, reader keyword arguments) -> (train reader, validation reader or None). None: shuffled
    #: ShardReaders over data.train / data.valid (pretrain.train.shard_readers); Transformer-XL reads ordered
    #: streams instead. The keyword arguments are those every reader takes (micro_batch_size, dp_rank, ...).
    make_readers: Callable[[Config, dict], tuple[Any, Any]] | None = None


_REGISTRY: dict[str, ModelSpec] = {}


def register(spec: ModelSpec) -> ModelSpec:
    """Add a family to the registry (called at import of its module)."""
    _REGISTRY[spec.name] = spec
    return spec


def get(name: str) -> ModelSpec:
    """The spec for ``model.family``; a one-line ConfigError for an unknown family."""
    if name not in _REGISTRY:
        raise ConfigError(f"model.family: unknown family {name!r} (registered: {', '.join(sorted(_REGISTRY))})")
    return _REGISTRY[name]


def build_chunks(spec: ModelSpec, cfg: ModelConfig, parallel: ParallelConfig, dtype: torch.dtype,
                 vocab_size: int, document_masks: bool = False) -> list[torch.nn.Module]:
    """This rank's model chunks: one per virtual pipeline stage (a single chunk without interleaving), each told
    whether it holds the embedding (the very first stage) or the output layer (the very last)."""
    from megatron.core import parallel_state

    stages = parallel.virtual_pipeline if parallel.pipeline > 1 else 1
    chunks = []
    for i in range(stages):
        vp_stage = i if stages > 1 else None
        first = parallel_state.is_pipeline_first_stage(ignore_virtual=False, vp_stage=vp_stage)
        last = parallel_state.is_pipeline_last_stage(ignore_virtual=False, vp_stage=vp_stage)
        chunks.append(spec.build(cfg, parallel, dtype, vocab_size, pre_process=first, post_process=last,
                                 vp_stage=vp_stage, document_masks=document_masks))
    return chunks


def check_vocab_fits(cfg: Config, manifest: dict) -> None:
    """A set model.vocab_size must hold every id of the shards' tokenizer; a one-line ConfigError else."""
    if cfg.model.vocab_size and cfg.model.vocab_size < manifest["vocab_size"]:
        raise ConfigError(f"model.vocab_size ({cfg.model.vocab_size}) is smaller than the tokenizer's "
                          f"({manifest['vocab_size']})")


def padded_vocab_size(vocab_size: int, divisible_by: int, tensor_parallel: int) -> int:
    """Megatron's rule: pad the vocabulary so each TP shard of the embedding has an aligned row count."""
    multiple = divisible_by * tensor_parallel
    return -(-vocab_size // multiple) * multiple


from pretrain.models import gpt  # noqa: E402,F401  (registers "gpt")
from pretrain.models import bert  # noqa: E402,F401  (registers "bert")
from pretrain.models import transformer_xl  # noqa: E402,F401  (registers "transformer_xl")
