"""ModelSpec registry: everything the rest of the code needs to know about a model family, behind one record.

Nothing outside pretrain/models branches on the family: the trainer, generation, fine-tuning, Hugging Face
export, the planner and config checks ask the family's spec. A family is a module that calls :func:`register` with
its :class:`ModelSpec`; :data:`FAMILIES` names that module, imported the first time :func:`get` asks for it (so
this module imports no family, and a family imports this module).
"""

from __future__ import annotations

import importlib
from dataclasses import dataclass, field
from typing import Any, Callable

import numpy as np
import torch

from pretrain.config import Config, ModelConfig, ParallelConfig
from pretrain.errors import ConfigError
from pretrain.models.common import shard_readers

#: model.family -> the module that registers it.
FAMILIES = {"gpt": "pretrain.models.gpt", "bert": "pretrain.models.bert.model",
            "transformer_xl": "pretrain.models.transformer_xl.model"}

#: (rows [b, s+1], where each row sits in the data order (the reader's last_indices), device) -> batch dict;
#: batch["inputs"] are the model's keyword arguments, batch["loss_mask"] weights the loss, batch["num_tokens"]
#: counts trained tokens. The position is the global sample index int64 [b] for shuffled readers, and
#: (lane, token offset) int64 [b, 2] for an ordered stream (Transformer-XL).
BatchFn = Callable[[np.ndarray, np.ndarray, torch.device], dict[str, Any]]


@dataclass(frozen=True)
class Classification:
    """How `pretrain finetune` turns a family's pretrained backbone into a sequence classifier."""

    #: (tokenizer, a text's token ids, max_length) -> the example's ids with the family's framing, at most
    #: max_length (GPT: text EOS; BERT: [CLS] text [SEP]); a DataError when the tokenizer cannot frame it.
    frame: Callable[[Any, list[int], int], list[int]]
    #: (backbone with post_process off, input_ids [b, s] right-padded, lengths [b]) -> pooled features [b, h].
    features: Callable[[torch.nn.Module, torch.Tensor, torch.Tensor], torch.Tensor]


def _no_checks(cfg: Config) -> None:
    return None


def _no_extra_params(m: ModelConfig, vocab_size: int, tensor: int, pipeline: int, stage: int) -> int:
    return 0


@dataclass(frozen=True)
class ModelSpec:
    """How to build, feed, score and use one model family."""

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
    #: (run config, reader keyword arguments) -> (train reader, validation reader or None). Default: shuffled
    #: ShardReaders over data.train / data.valid; Transformer-XL reads ordered streams instead. The keyword
    #: arguments are those every reader takes (micro_batch_size, dp_rank, ...).
    make_readers: Callable[[Config, dict], tuple[Any, Any]] = shard_readers
    #: (run config) -> None, or a one-line ConfigError for a setting this family cannot train with; called before
    #: any process group exists (and by --dry-run).
    check_config: Callable[[Config], None] = _no_checks
    #: (model, model cfg, device) -> an incremental decoder for `pretrain generate` (``prefill(ids)`` and
    #: ``step(token)``, each returning the next token's logits [V]); None: the family does not generate text.
    decoder: Callable[[torch.nn.Module, ModelConfig, torch.device], Any] | None = None
    #: Sequence classification for `pretrain finetune`; None: the family is not fine-tuned.
    classification: Classification | None = None
    #: The Hugging Face conversion `pretrain export hf` uses (a module of pretrain/hf: "gpt2", which a GPT with
    #: rotary positions turns into "llama", or "bert"); None: none.
    hf_export: str | None = None
    #: (model cfg, padded vocab, tensor, pipeline, stage) -> parameters this family has on one rank of ``stage``
    #: beyond the GPT-shaped count of the planner (pretrain/parallel/plan.py); may be negative.
    extra_stage_params: Callable[[ModelConfig, int, int, int, int], int] = field(default=_no_extra_params)

    def build_chunks(self, cfg: ModelConfig, parallel: ParallelConfig, dtype: torch.dtype, vocab_size: int,
                     document_masks: bool = False) -> list[torch.nn.Module]:
        """This rank's model chunks: one per virtual pipeline stage (a single chunk without interleaving), each
        told whether it holds the embedding (the very first stage) or the output layer (the very last)."""
        from megatron.core import parallel_state

        stages = parallel.virtual_pipeline if parallel.pipeline > 1 else 1
        chunks = []
        for i in range(stages):
            vp_stage = i if stages > 1 else None
            first = parallel_state.is_pipeline_first_stage(ignore_virtual=False, vp_stage=vp_stage)
            last = parallel_state.is_pipeline_last_stage(ignore_virtual=False, vp_stage=vp_stage)
            chunks.append(self.build(cfg, parallel, dtype, vocab_size, pre_process=first, post_process=last,
                                     vp_stage=vp_stage, document_masks=document_masks))
        return chunks


_REGISTRY: dict[str, ModelSpec] = {}


def register(spec: ModelSpec) -> ModelSpec:
    """Add a family to the registry (called at import of its module)."""
    _REGISTRY[spec.name] = spec
    return spec


def get(name: str) -> ModelSpec:
    """The spec for ``model.family`` (importing its module the first time); a one-line ConfigError for an unknown
    family."""
    if name not in _REGISTRY and name in FAMILIES:
        importlib.import_module(FAMILIES[name])
    if name not in _REGISTRY:
        raise ConfigError(f"model.family: unknown family {name!r} (known: {', '.join(sorted(FAMILIES))})")
    return _REGISTRY[name]
