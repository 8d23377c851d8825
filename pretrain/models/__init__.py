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

#: (rows int64 [b, s+1], global sample index of each row int64 [b], device) -> batch dict; batch["inputs"] are
#: the model's keyword arguments, batch["loss_mask"] weights the loss, batch["num_tokens"] counts trained tokens.
BatchFn = Callable[[np.ndarray, np.ndarray, torch.device], dict[str, Any]]


@dataclass(frozen=True)
class ModelSpec:
    """How to build, feed and score one model family."""

    name: str
    #: (model cfg, parallel cfg, params dtype, padded vocab size) -> torch.nn.Module for this rank.
    build: Callable[[ModelConfig, ParallelConfig, torch.dtype, int], torch.nn.Module]
    #: (run config, data manifest) -> the BatchFn for this run (binds options such as special token ids).
    make_batch_fn: Callable[[Config, dict], BatchFn]
    #: (model output, batch) -> scalar loss averaged over this rank's loss tokens.
    loss_fn: Callable[[torch.Tensor, dict[str, Any]], torch.Tensor]
    #: (model cfg, padded vocab size) -> training FLOPs per token (forward + backward), for MFU.
    flops_per_token: Callable[[ModelConfig, int], float]


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


def padded_vocab_size(vocab_size: int, divisible_by: int, tensor_parallel: int) -> int:
    """Megatron's rule: pad the vocabulary so each TP shard of the embedding has an aligned row count."""
    multiple = divisible_by * tensor_parallel
    return -(-vocab_size // multiple) * multiple


from pretrain.models import gpt  # noqa: E402,F401  (registers "gpt")
