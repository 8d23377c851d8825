"""BERT (Devlin et al. 2019): megatron-core's BertModel, pretrained with masked-LM + next-sentence prediction.

The paper's post-LayerNorm layout (pretrain/models/bert/layers.py; megatron-core's own BERT is pre-LN):
LayerNorm(word + learned position + token type embeddings) -> encoder layers LN(x + Attn(x)), LN(x + MLP(x))
with bidirectional attention over real tokens. The last stage adds the MLM head (dense + gelu + LayerNorm, then
the output layer tied to the word embedding, with its own bias) and, with ``model.nsp``, the pooler ([CLS] ->
dense + tanh) and the binary NSP head.

Data: ``data_pipeline.batches.bert_batch`` turns packed reader rows into ``[CLS] A [SEP] B [SEP]`` pairs with
80/10/10 masking, deterministic per (run.seed, global sample index), so every layout sees the same samples.
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
from typing import Any, Iterator

import numpy as np
import torch
import torch.nn.functional as F
from megatron.core.models.bert import bert_lm_head
from megatron.core.models.bert.bert_layer_specs import bert_layer_local_spec
from megatron.core.models.bert.bert_model import BertModel
from megatron.core.transformer import transformer_block
from megatron.core.transformer.identity_op import IdentityOp
from megatron.core.transformer.spec_utils import ModuleSpec
from megatron.core.transformer.torch_norm import WrappedTorchNorm

from data_pipeline.batches import bert_batch, bert_token_ids
from data_pipeline.errors import DataError
from pretrain.config import Config, ModelConfig, ParallelConfig
from pretrain.models.spec import BatchFn, Classification, ModelSpec, register
from pretrain.models import gpt
from pretrain.models.bert.layers import PostNormLayer, to_post_norm
from pretrain.models.gpt import LayerNorm, transformer_config

#: Segment embeddings: 0 for [CLS] A [SEP] (and padding), 1 for B [SEP]. Kept without NSP too: bert_batch always
#: builds pairs, and sentence-pair fine-tuning needs them.
NUM_TOKENTYPES = 2


def layer_spec() -> ModuleSpec:
    """One post-LN encoder layer: megatron-core's local (pure torch) BERT layer spec with its pre-norms replaced by
    identity and the layer class by :class:`PostNormLayer`, which normalises after each residual sum.

    Transformer Engine's BERT spec fuses a pre-norm into its QKV GEMM, so it cannot express post-LN; BERT uses these
    layers on CUDA too. BertModel wants the layer's ModuleSpec (it inspects the attention backend to pick the mask
    layout), not block submodules, so the block's final norm is chosen in :func:`_norms_for_sequence_parallel`.
    """
    # A modified copy: the module-level spec is shared with every other user of megatron-core.
    submodules = dataclasses.replace(bert_layer_local_spec.submodules, input_layernorm=IdentityOp,
                                     pre_mlp_layernorm=IdentityOp)
    return dataclasses.replace(bert_layer_local_spec, module=PostNormLayer, submodules=submodules)


@contextlib.contextmanager
def _norms_for_sequence_parallel() -> Iterator[None]:
    """While BertModel is built, make its two norms that come from module globals our LayerNorm.

    The encoder's final norm (``transformer_block.LayerNormImpl``, used when the spec is a layer ModuleSpec) and
    the MLM head's norm (``bert_lm_head.LNImpl``) are megatron-core's WrappedTorchNorm when neither Apex nor
    Transformer Engine is installed, and it refuses sequence parallelism at construction. Ours computes the same
    thing (a torch LayerNorm: same parameter names) and marks its parameters so the engine sums their gradients
    over TP. Fused norms (Apex / TE) are left alone: they handle sequence parallelism themselves.
    """
    patched = [(module, name) for module, name in ((transformer_block, "LayerNormImpl"), (bert_lm_head, "LNImpl"))
               if getattr(module, name) is WrappedTorchNorm]
    for module, name in patched:
        setattr(module, name, LayerNorm)
    try:
        yield
    finally:
        for module, name in patched:
            setattr(module, name, WrappedTorchNorm)


def build(cfg: ModelConfig, parallel: ParallelConfig, dtype: torch.dtype, vocab_size: int,
          pre_process: bool = True, post_process: bool = True, vp_stage: int | None = None,
          document_masks: bool = False) -> BertModel:
    """BertModel (one pipeline chunk): embeddings if ``pre_process``; MLM head, output layer (tied to the word
    embedding when ``model.tie_embeddings``, as megatron-core does) and, with ``model.nsp``, pooler + binary head
    if ``post_process``. With the defaults: the whole model for one process (megatron-core's parallel state must
    be initialised, TP = PP = 1)."""
    config = transformer_config(cfg, parallel, dtype)
    with _norms_for_sequence_parallel():
        model = BertModel(
            config=config,
            num_tokentypes=NUM_TOKENTYPES,
            transformer_layer_spec=layer_spec(),
            vocab_size=vocab_size,
            max_sequence_length=cfg.seq_length,
            pre_process=pre_process,
            post_process=post_process,
            share_embeddings_and_output_weights=cfg.tie_embeddings,
            position_embedding_type=cfg.position_embedding,
            add_binary_head=cfg.nsp,
            vp_stage=vp_stage,
        )
    to_post_norm(model)  # embedding LayerNorm in, final LayerNorm out
    return model


def batch_fn(rows: np.ndarray, indices: np.ndarray, device: torch.device, *, seed: int, seq_length: int,
             mask_prob: float, short_seq_prob: float, token_ids: dict) -> dict[str, Any]:
    """BERT pretraining batch from reader rows [b, >=1] and their global sample indices [b].

    ``batch["inputs"]`` are BertModel.forward's keyword arguments: ``input_ids`` (masked tokens), ``attention_mask``
    (1 = real token, 0 = padding; the model widens it to [b, 1, s, s]), ``tokentype_ids`` (0 = A, 1 = B) and
    ``lm_labels`` (original tokens; pad id where not selected), all int64 [b, s]. Passing the labels makes the
    model return per-token MLM losses from megatron-core's vocab-parallel cross entropy (logits never gathered
    over TP). ``loss_mask`` float32 [b, s] is 1 at the selected tokens; ``nsp_labels`` int64 [b] is 1 when B is
    a random segment (Google's is_random_next). ``num_tokens`` counts every position the model runs over.
    """
    arrays = bert_batch(rows, indices, seed=seed, seq_length=seq_length, mask_prob=mask_prob,
                        short_seq_prob=short_seq_prob, **token_ids)
    b, s = arrays["tokens"].shape

    def to(name: str) -> torch.Tensor:
        return torch.from_numpy(arrays[name]).to(device, non_blocking=True)

    return {
        "inputs": {"input_ids": to("tokens"), "attention_mask": to("padding_mask"),
                   "tokentype_ids": to("token_types"), "lm_labels": to("lm_labels")},
        "loss_mask": to("loss_mask"),  # [b, s]
        "nsp_labels": to("is_random_next"),  # [b]
        "num_tokens": b * s,  # padding included: the model computes over all s positions (throughput, MFU)
    }


def make_batch_fn(cfg: Config, manifest: dict) -> BatchFn:
    """BERT batches for this run: special ids from the shards' manifest (DataError when they lack [CLS], [SEP]
    or [MASK]), masking seeded by ``run.seed``, ``model.mask_prob`` / ``model.short_seq_prob``."""
    return functools.partial(batch_fn, seed=cfg.run.seed, seq_length=cfg.model.seq_length,
                             mask_prob=cfg.model.mask_prob, short_seq_prob=cfg.model.short_seq_prob,
                             token_ids=bert_token_ids(manifest))


def loss_fn(output: tuple[torch.Tensor, torch.Tensor | None], batch: dict[str, Any]) -> torch.Tensor:
    """Masked-LM cross entropy averaged over the selected tokens, plus the NSP cross entropy averaged over the
    sequences when the model has the binary head.

    ``output`` is the last stage's BertModel output given ``lm_labels``: (per-token MLM loss [b, s], NSP logits
    [b, 2] or None). The NSP logits are replicated over TP ranks, so every rank adds the same NSP loss.
    """
    lm_loss, nsp_logits = output
    mask = batch["loss_mask"]
    loss = (lm_loss.float() * mask).sum() / mask.sum().clamp(min=1.0)  # a batch of only special tokens: 0, not NaN
    if nsp_logits is not None:
        loss = loss + F.cross_entropy(nsp_logits.float(), batch["nsp_labels"])
    return loss


def flops_per_token(cfg: ModelConfig, vocab_size: int) -> float:
    """Training FLOPs per token (forward + backward = 3x forward), bidirectional attention over all s positions.

    GPT's count (layers + logits over every position, pretrain.models.gpt.flops_per_token) plus the MLM head's
    dense layer 2h^2 per token, and the pooler (2h^2) and NSP head (4h) once per sequence, i.e. / s per token.
    """
    h, s = cfg.hidden_size, cfg.seq_length
    head = 2 * h * h + (2 * h * h + 4 * h) / s
    return gpt.flops_per_token(cfg, vocab_size) + 3.0 * head


def classification_frame(tokenizer, ids: list[int], max_length: int) -> list[int]:
    """A BERT classification example: ``[CLS] text [SEP]``, as in the paper."""
    if tokenizer.cls_id is None or tokenizer.sep_id is None:
        raise DataError(f"{tokenizer.model_path}: tokenizer has no [CLS]/[SEP]; BERT fine-tuning needs them")
    return [tokenizer.cls_id] + ids[: max_length - 2] + [tokenizer.sep_id]


def classification_features(backbone: BertModel, input_ids: torch.Tensor, lengths: torch.Tensor) -> torch.Tensor:
    """The mean of the final hidden states over the real tokens ([CLS] and [SEP] included). input_ids [b, s]
    right-padded, lengths [b] -> [b, h].

    Not the pooler on [CLS] (BERT's paper, HF's BertForSequenceClassification): only next-sentence prediction
    trains that vector, a BERT pretrained without NSP has none, and a short pretraining leaves it nearly the same
    for every input. Measured on the play classification of tests/integration/test_finetune.py with
    configs/bert/tiny.yaml pretrained 500 steps: the pooled [CLS] varies 100x less across examples than its size
    (std 0.001 vs 0.12) and its classifier stays at chance (0.42), while the mean of the token states, which MLM
    has made informative, reaches 0.70 (docs/downstream.md, "Fine-tuning", has the whole story).
    """
    s = input_ids.shape[1]
    real = (torch.arange(s, device=input_ids.device)[None] < lengths[:, None]).long()  # [b, s], 1 = real token
    hidden = backbone(input_ids=input_ids, attention_mask=real, tokentype_ids=torch.zeros_like(input_ids))  # [s, b, h]
    weights = real.t().unsqueeze(-1).to(hidden.dtype)  # [s, b, 1]
    return (hidden * weights).sum(0) / weights.sum(0)  # [b, h]


def extra_stage_params(m: ModelConfig, vocab_size: int, tensor: int, pipeline: int, stage: int) -> int:
    """BertModel's parameters beyond a GPT's on one rank of ``stage`` (replicated but for the output bias): two
    token-type embeddings and the embedding LayerNorm first; no final LayerNorm, but the MLM head's dense +
    LayerNorm and output bias, and the pooler + NSP head, last."""
    h, count = m.hidden_size, 0
    if stage == 0:
        count += 4 * h
    if stage == pipeline - 1:
        count += -2 * h + (h * h + h) + 2 * h + vocab_size // tensor
        count += (h * h + h) + (2 * h + 2) if m.nsp else 0
    return count


SPEC = register(ModelSpec(
    name="bert", build=build, make_batch_fn=make_batch_fn, loss_fn=loss_fn, flops_per_token=flops_per_token,
    classification=Classification(frame=classification_frame, features=classification_features),
    hf_export="bert", extra_stage_params=extra_stage_params))
