"""GPT: megatron-core's GPTModel (local layer spec on CPU, Transformer Engine spec when importable on CUDA)."""

from __future__ import annotations

import functools
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from megatron.core.models.gpt import GPTModel
from megatron.core.models.gpt.gpt_layer_specs import get_gpt_layer_local_spec
from megatron.core.transformer import TransformerConfig
from megatron.core.transformer.transformer_block import TransformerBlockSubmodules, get_num_layers_to_build

from data_pipeline.batches import gpt_batch
from pretrain.config import Config, ModelConfig, ParallelConfig
from pretrain.models import BatchFn, ModelSpec, register
from pretrain.models.attention import SDPAttention

_ACTIVATIONS = {
    "gelu": F.gelu,
    "gelu_tanh": functools.partial(F.gelu, approximate="tanh"),
    "swiglu": F.silu,  # gated: megatron-core applies silu(x1) * x2 when gated_linear_unit=True
}


def transformer_config(cfg: ModelConfig, parallel: ParallelConfig, dtype: torch.dtype) -> TransformerConfig:
    """The megatron-core TransformerConfig for our model section.

    Fusions that need Transformer Engine or Apex stay off; megatron-core enables the ones available on CUDA
    through the layer spec instead.
    """
    on_cuda, recompute = torch.cuda.is_available(), parallel.activation_checkpointing
    return TransformerConfig(
        num_layers=cfg.num_layers,
        hidden_size=cfg.hidden_size,
        num_attention_heads=cfg.num_attention_heads,
        ffn_hidden_size=cfg.ffn_hidden_size or 4 * cfg.hidden_size,
        hidden_dropout=cfg.hidden_dropout,
        attention_dropout=cfg.attention_dropout,
        init_method_std=cfg.init_method_std,
        layernorm_epsilon=cfg.layernorm_epsilon,
        activation_func=_ACTIVATIONS[cfg.activation],
        gated_linear_unit=cfg.activation == "swiglu",
        add_bias_linear=True,
        tensor_model_parallel_size=parallel.tensor,
        pipeline_model_parallel_size=parallel.pipeline,
        virtual_pipeline_model_parallel_size=parallel.virtual_pipeline if parallel.virtual_pipeline > 1 else None,
        # Batched isend/irecv gives wrong gradients over gloo when the previous and next stage are the same rank
        # (interleaved PP=2, measured); one op at a time is correct everywhere, batched is faster with NCCL.
        batch_p2p_comm=on_cuda,
        sequence_parallel=parallel.sequence_parallel,
        params_dtype=dtype,
        pipeline_dtype=dtype,
        bf16=dtype == torch.bfloat16,
        use_cpu_initialization=not on_cuda,
        # Fused kernels below exist only on CUDA (Apex / TE / triton); the unfused paths compute the same math.
        bias_activation_fusion=on_cuda and cfg.activation == "gelu",
        masked_softmax_fusion=False,
        bias_dropout_fusion=on_cuda,
        persist_layer_norm=False,
        gradient_accumulation_fusion=False,
        apply_rope_fusion=False,
        cuda_graph_scope=[],  # the default "full" is deprecated in this megatron-core and warns on every build
        # selective: megatron-core recomputes the attention core (its default recompute_modules); full: every layer.
        recompute_granularity=None if recompute == "none" else recompute,
        recompute_method="uniform" if recompute == "full" else None,
        recompute_num_layers=1 if recompute == "full" else None,
    )


class LayerNorm(torch.nn.LayerNorm):
    """torch LayerNorm for megatron-core's local layer spec, usable under sequence parallelism.

    megatron-core's local fallback (WrappedTorchNorm, used without Apex) refuses sequence parallelism only
    because it does not mark its parameters: each TP rank normalises its own slice of the sequence, so the
    gradients of these replicated parameters must be summed over the TP group, which the engine does for every
    parameter marked ``sequence_parallel`` (pretrain/parallel/engine.py).
    """

    def __init__(self, config: TransformerConfig, hidden_size: int, eps: float = 1e-5, **_):
        super().__init__(hidden_size, eps=eps)
        for param in self.parameters():
            param.sequence_parallel = config.sequence_parallel


def layer_spec(config: TransformerConfig, vp_stage: int | None):
    """Transformer Engine's fused layer spec on CUDA when installed, else megatron-core's local (pure torch) one
    with our LayerNorm (for the block's final norm too) and SDPA core attention (pretrain/models/attention.py)."""
    if torch.cuda.is_available():
        try:
            from megatron.core.models.gpt.gpt_layer_specs import get_gpt_layer_with_transformer_engine_spec

            return get_gpt_layer_with_transformer_engine_spec()
        except (ImportError, AssertionError):
            pass
    spec = get_gpt_layer_local_spec()
    spec.submodules.input_layernorm = spec.submodules.pre_mlp_layernorm = LayerNorm
    spec.submodules.self_attention.submodules.core_attention = SDPAttention  # fused, not separate ops
    layers = get_num_layers_to_build(config, vp_stage=vp_stage)
    return TransformerBlockSubmodules(layer_specs=[spec] * layers, layer_norm=LayerNorm)


def build(cfg: ModelConfig, parallel: ParallelConfig, dtype: torch.dtype, vocab_size: int,
          pre_process: bool = True, post_process: bool = True, vp_stage: int | None = None) -> GPTModel:
    """GPTModel (one pipeline chunk): embedding if ``pre_process``, output layer + loss if ``post_process``;
    megatron-core picks the chunk's layers from the pipeline rank and ``vp_stage``."""
    config = transformer_config(cfg, parallel, dtype)
    return GPTModel(
        config=config,
        transformer_layer_spec=layer_spec(config, vp_stage),
        vocab_size=vocab_size,
        max_sequence_length=cfg.seq_length,
        pre_process=pre_process,
        post_process=post_process,
        share_embeddings_and_output_weights=cfg.tie_embeddings,
        position_embedding_type=cfg.position_embedding,
        vp_stage=vp_stage,
    )


def batch_fn(rows: np.ndarray, device: torch.device, eos_id: int | None = None,
             reset_at_eos: bool = False) -> dict[str, Any]:
    """Packed causal-LM batch from reader rows [b, s+1]: predict token t+1 from tokens <= t.

    ``reset_at_eos`` restarts positions and blocks attention at document ends (data_pipeline.batches.gpt_batch).
    """
    arrays = gpt_batch(rows, eos_id=eos_id, reset_at_eos=reset_at_eos)
    b, s = arrays["tokens"].shape

    def to(name: str) -> torch.Tensor:
        return torch.from_numpy(arrays[name]).to(device, non_blocking=True)

    # Plain packing needs no mask tensor: the layers' causal mask type makes SDPA (and TE) causal, which lets
    # them pick their flash kernels; per-document masks are [b, 1, s, s].
    mask = to("attention_mask") if reset_at_eos else None
    return {
        "inputs": {"input_ids": to("tokens"), "position_ids": to("position_ids"), "attention_mask": mask,
                   "labels": to("labels")},
        "loss_mask": to("loss_mask"),  # [b, s]
        "num_tokens": b * s,
    }


def make_batch_fn(cfg: Config, manifest: dict) -> BatchFn:
    """GPT batches for this run: document resets per ``data.reset_at_eos`` with the shards' EOS id."""
    eos_id, reset = manifest.get("eos_id"), cfg.data.reset_at_eos
    return lambda rows, indices, device: batch_fn(rows, device, eos_id=eos_id, reset_at_eos=reset)


def loss_fn(output: torch.Tensor, batch: dict[str, Any]) -> torch.Tensor:
    """Mean next-token cross entropy over masked-in tokens. ``output`` is the model's per-token loss [b, s]
    (GPTModel's; Transformer-XL's too, which uses this loss)."""
    mask = batch["loss_mask"]
    return (output.float() * mask).sum() / mask.sum()


def flops_per_token(cfg: ModelConfig, vocab_size: int) -> float:
    """Training FLOPs per token (forward + backward = 3x forward), attention scores included (not causal-halved).

    Forward per layer: QKV + output projections 8h^2, MLP 4h*f (6h*f gated), scores and weighted sum 4sh;
    plus the logits 2hV. With f = 4h this is Megatron-LM's 72*l*h^2*(1 + s/(6h) + V/(12*l*h)).
    """
    h, s, l = cfg.hidden_size, cfg.seq_length, cfg.num_layers
    f = cfg.ffn_hidden_size or 4 * h
    mlp = (6 if cfg.activation == "swiglu" else 4) * h * f
    return 3.0 * (l * (8 * h * h + mlp + 4 * s * h) + 2 * h * vocab_size)


SPEC = register(ModelSpec(name="gpt", build=build, make_batch_fn=make_batch_fn, loss_fn=loss_fn,
                          flops_per_token=flops_per_token))
