"""GPT: megatron-core's GPTModel (local layer spec on CPU, Transformer Engine spec when usable on CUDA)."""

from __future__ import annotations

import functools
import logging
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from megatron.core.models.gpt import GPTModel
from megatron.core.models.gpt.gpt_layer_specs import get_gpt_layer_local_spec
from megatron.core.transformer import TransformerConfig
from megatron.core.transformer.transformer_block import TransformerBlockSubmodules, get_num_layers_to_build

from data_pipeline.batches import gpt_batch
from pretrain import device
from pretrain.config import Config, ModelConfig, ParallelConfig
from pretrain.errors import ConfigError
from pretrain.models.spec import BatchFn, Classification, ModelSpec, register
from pretrain.models.attention import SDPAttention
from pretrain.models.layer_names import install_canonical_names

logger = logging.getLogger(__name__)

_ACTIVATIONS = {
    "gelu": F.gelu,  # exact (erf), as Hugging Face's "gelu" that export maps it to
    "gelu_tanh": functools.partial(F.gelu, approximate="tanh"),
    "swiglu": F.silu,  # gated: megatron-core applies silu(x1) * x2 when gated_linear_unit=True
}


def _activation(cfg: ModelConfig, on_cuda: bool) -> tuple[Any, bool]:
    """(activation function, bias-activation fusion) for megatron-core's MLP.

    megatron-core's fused bias-GeLU kernel is the tanh approximation, and it is chosen by ``activation_func is
    F.gelu``: so only ``gelu_tanh`` may use it (handing megatron-core F.gelu), while ``gelu`` stays exact, unfused,
    on every device. The fused bias-SwiGLU computes silu exactly.
    """
    fused = on_cuda and cfg.activation in ("gelu_tanh", "swiglu")
    if fused and cfg.activation == "gelu_tanh":
        return F.gelu, True
    return _ACTIVATIONS[cfg.activation], fused


def transformer_config(cfg: ModelConfig, parallel: ParallelConfig, dtype: torch.dtype,
                       on_cuda: bool | None = None) -> TransformerConfig:
    """The megatron-core TransformerConfig for our model section (``on_cuda``: default this process's device).

    Fusions that need Transformer Engine or Apex stay off; megatron-core enables the ones available on CUDA
    through the layer spec instead.
    """
    on_cuda = device.cuda_available() if on_cuda is None else on_cuda
    recompute = parallel.activation_checkpointing
    activation, bias_activation_fusion = _activation(cfg, on_cuda)
    return TransformerConfig(
        num_layers=cfg.num_layers,
        hidden_size=cfg.hidden_size,
        num_attention_heads=cfg.num_attention_heads,
        ffn_hidden_size=cfg.ffn_hidden_size or 4 * cfg.hidden_size,
        hidden_dropout=cfg.hidden_dropout,
        attention_dropout=cfg.attention_dropout,
        init_method_std=cfg.init_method_std,
        layernorm_epsilon=cfg.layernorm_epsilon,
        activation_func=activation,
        gated_linear_unit=cfg.activation == "swiglu",
        add_bias_linear=cfg.add_bias_linear,
        num_query_groups=cfg.num_query_groups or None,
        normalization="RMSNorm" if cfg.normalization == "rmsnorm" else "LayerNorm",
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
        bias_activation_fusion=bias_activation_fusion,
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


class RMSNorm(torch.nn.RMSNorm):
    """torch RMSNorm (Llama's: x / sqrt(mean(x^2) + eps) * weight, no bias) for the local layer spec, with its
    weight marked for sequence parallelism as :class:`LayerNorm`'s."""

    def __init__(self, config: TransformerConfig, hidden_size: int, eps: float = 1e-5, **_):
        super().__init__(hidden_size, eps=eps)
        for param in self.parameters():
            param.sequence_parallel = config.sequence_parallel


def norm_class(config: TransformerConfig) -> type[torch.nn.Module]:
    """The local spec's norm for ``config.normalization`` (megatron-core's name: LayerNorm or RMSNorm)."""
    return RMSNorm if config.normalization == "RMSNorm" else LayerNorm


LOCAL, TRANSFORMER_ENGINE = "local", "transformer_engine"


def choose_layer_spec(requested: str, on_cuda: bool, document_masks: bool) -> tuple[str, str]:
    """(LOCAL or TRANSFORMER_ENGINE, why) for ``model.layer_spec`` = ``requested`` (auto, transformer_engine or
    local). ``document_masks``: the run feeds per-document attention masks (data.reset_at_eos), which TE's layer
    spec would ignore (it fixes the mask type to causal). ``auto`` takes TE only where it builds, and falls back
    to the local spec for any failure (megatron-core 0.16 raises NameError, not ImportError, without TE);
    ``transformer_engine`` where it cannot be used is a one-line ConfigError."""
    if requested == LOCAL:
        return LOCAL, "model.layer_spec=local"
    refuse = requested == TRANSFORMER_ENGINE
    if document_masks:
        why = "data.reset_at_eos needs per-document attention masks, which TE's causal layer spec ignores"
        if refuse:
            raise ConfigError(f"model.layer_spec: transformer_engine cannot honour data.reset_at_eos ({why}); "
                              "use model.layer_spec=local or auto")
        return LOCAL, why
    if not on_cuda:
        if refuse:
            raise ConfigError("model.layer_spec: transformer_engine needs CUDA; this process has none")
        return LOCAL, "no CUDA"
    try:
        _te_layer_spec()
    except Exception as e:  # noqa: BLE001 - any failure to build TE's spec means: not usable here
        why = f"Transformer Engine unusable ({type(e).__name__}: {e})"
        if refuse:
            raise ConfigError(f"model.layer_spec: transformer_engine requested, but {why}") from None
        return LOCAL, why
    return TRANSFORMER_ENGINE, "Transformer Engine imports on CUDA"


def _te_layer_spec():
    from megatron.core.models.gpt.gpt_layer_specs import get_gpt_layer_with_transformer_engine_spec

    return get_gpt_layer_with_transformer_engine_spec()


def layer_spec(config: TransformerConfig, vp_stage: int | None, name: str = LOCAL):
    """The layers of one chunk: Transformer Engine's fused spec (``name`` TRANSFORMER_ENGINE), or megatron-core's
    local (pure torch) one with our LayerNorm (for the block's final norm too) and SDPA core attention
    (pretrain/models/attention.py)."""
    if name == TRANSFORMER_ENGINE:
        return _te_layer_spec()
    spec = get_gpt_layer_local_spec()
    norm = norm_class(config)
    spec.submodules.input_layernorm = spec.submodules.pre_mlp_layernorm = norm
    spec.submodules.self_attention.submodules.core_attention = SDPAttention  # fused, not separate ops
    layers = get_num_layers_to_build(config, vp_stage=vp_stage)
    return TransformerBlockSubmodules(layer_specs=[spec] * layers, layer_norm=norm)


_logged: set[str] = set()


def build(cfg: ModelConfig, parallel: ParallelConfig, dtype: torch.dtype, vocab_size: int,
          pre_process: bool = True, post_process: bool = True, vp_stage: int | None = None,
          document_masks: bool = False) -> GPTModel:
    """GPTModel (one pipeline chunk): embedding if ``pre_process``, output layer + loss if ``post_process``;
    megatron-core picks the chunk's layers from the pipeline rank and ``vp_stage``. The layer spec is
    :func:`choose_layer_spec`'s (logged once); parameters save under spec-independent names
    (pretrain/models/layer_names.py)."""
    config = transformer_config(cfg, parallel, dtype)
    name, why = choose_layer_spec(cfg.layer_spec, device.cuda_available(), document_masks)
    if (message := f"GPT layers: {name} spec ({why})") not in _logged:
        _logged.add(message)
        # Without CUDA there is nothing to choose; on CUDA the choice (and a TE failure) is worth a line.
        logger.log(logging.INFO if device.cuda_available() else logging.DEBUG, message)
    model = model_from_spec(cfg, config, layer_spec(config, vp_stage, name), vocab_size, pre_process,
                            post_process, vp_stage)
    model.layer_spec_name = name  # recorded in the checkpoint layout: a change of spec loads by name
    return model


def model_from_spec(cfg: ModelConfig, config: TransformerConfig, spec, vocab_size: int, pre_process: bool = True,
                    post_process: bool = True, vp_stage: int | None = None) -> GPTModel:
    """GPTModel with the layer ``spec`` given, saving under canonical parameter names; with
    ``model.rope_scaling_factor``, Llama 3.1-style scaled rotary frequencies (:func:`scale_rope`)."""
    model = install_canonical_names(GPTModel(
        config=config,
        transformer_layer_spec=spec,
        vocab_size=vocab_size,
        max_sequence_length=cfg.seq_length,
        pre_process=pre_process,
        post_process=post_process,
        share_embeddings_and_output_weights=cfg.tie_embeddings,
        position_embedding_type=cfg.position_embedding,
        rotary_base=cfg.rope_theta,  # megatron-core's type hint says int; the frequencies are computed in float
        vp_stage=vp_stage,
    ))
    if cfg.rope_scaling_factor:
        scale_rope(model, cfg)
    return model


def scale_rope(model: GPTModel, cfg: ModelConfig) -> None:
    """Replace the model's rotary inverse frequencies with Llama 3.1's scaled ones (HF ``rope_type: llama3``),
    computed by megatron-core's own ``RotaryEmbedding._apply_scaling`` from the unscaled ones.

    GPTModel's ``rope_scaling=True`` passes only the factor and keeps low/high frequency factors 1 and 4 and an
    original context of 8192 fixed; Llama 3.2 and models adapted to other contexts need them as configured. The
    frequencies are a plain attribute (not saved in checkpoints: megatron-core drops ``inv_freq`` from state dicts),
    read at every forward, so setting them once after construction is enough.
    """
    rotary = model.rotary_pos_emb
    rotary.inv_freq = rotary._apply_scaling(
        rotary.inv_freq, factor=cfg.rope_scaling_factor, low_freq_factor=cfg.rope_low_freq_factor,
        high_freq_factor=cfg.rope_high_freq_factor,
        original_max_position_embeddings=cfg.rope_original_max_position_embeddings)


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

    Forward per layer: QKV + output projections 8h^2 (q and output 4h^2 + k and v 4h^2 * groups / heads), MLP
    4h*f (6h*f gated), scores and weighted sum 4sh; plus the logits 2hV. With f = 4h this is Megatron-LM's
    72*l*h^2*(1 + s/(6h) + V/(12*l*h)).
    """
    h, s, l = cfg.hidden_size, cfg.seq_length, cfg.num_layers
    f = cfg.ffn_hidden_size or 4 * h
    mlp = (6 if cfg.activation == "swiglu" else 4) * h * f
    kv = 2 * h * h * (cfg.num_query_groups or cfg.num_attention_heads) // cfg.num_attention_heads  # k, v: GQA
    return 3.0 * (l * (2 * (2 * h * h + kv) + mlp + 4 * s * h) + 2 * h * vocab_size)


class GPTDecoder:
    """Incremental GPT forward with megatron-core's key/value cache.

    Learned absolute positions end at ``seq_length``: when the cache is full, the newest half of the context is
    encoded again as a fresh prompt (a sliding window, as full recomputation would see it).
    """

    def __init__(self, model: torch.nn.Module, seq_length: int, device: torch.device):
        self.model, self.seq_length, self.device = model, seq_length, device
        self.context = None

    def prefill(self, ids: list[int]) -> torch.Tensor:
        """Encode ``ids`` (the last seq_length of them) from an empty cache; logits [V] of the next token."""
        from megatron.core.inference.contexts import StaticInferenceContext

        ids = ids[-self.seq_length:]
        self.context = StaticInferenceContext(max_batch_size=1, max_sequence_length=self.seq_length)
        s = len(ids)
        # No mask tensor: a fresh cache keeps the layers' causal mask type, so the prompt attends causally.
        logits = self._forward(torch.tensor([ids], device=self.device),
                               torch.arange(s, device=self.device)[None], None)
        self.context.sequence_len_offset = s
        self.context.enable_decode_mode()
        self.history = list(ids)
        return logits

    def step(self, token: int) -> torch.Tensor:
        """Append ``token``; logits [V] of the one after it."""
        self.history.append(token)
        if self.context.sequence_len_offset >= self.seq_length:  # no position left: re-encode the newer half
            return self.prefill(self.history[-(self.seq_length // 2):])
        position = self.context.sequence_len_offset
        logits = self._forward(torch.tensor([[token]], device=self.device),
                               torch.tensor([[position]], device=self.device), None)
        self.context.sequence_len_offset += 1
        return logits

    def _forward(self, input_ids, position_ids, attention_mask) -> torch.Tensor:
        out = self.model(input_ids=input_ids, position_ids=position_ids, attention_mask=attention_mask,
                         inference_context=self.context, runtime_gather_output=True)  # [1, 1, V]: last position
        return out[0, -1]


def classification_frame(tokenizer, ids: list[int], max_length: int) -> list[int]:
    """A GPT classification example: the text, then EOS (the token every pretraining document ends with)."""
    return ids[: max_length - 1] + [tokenizer.eos_id]


def classification_features(backbone: GPTModel, input_ids: torch.Tensor, lengths: torch.Tensor) -> torch.Tensor:
    """The final hidden state (after the final LayerNorm) of the last real token, as GPT-2's classifier takes it;
    right padding is invisible to it under the causal mask. input_ids [b, s], lengths [b] -> [b, h]."""
    b, s = input_ids.shape
    positions = torch.arange(s, device=input_ids.device)[None]  # [1, s]
    # No mask tensor: the layers are causal by their mask type (pretrain/models/attention.py).
    hidden = backbone(input_ids=input_ids, position_ids=positions, attention_mask=None)  # [s, b, h]
    return hidden[lengths - 1, torch.arange(b, device=input_ids.device)]  # [b, h]


SPEC = register(ModelSpec(
    name="gpt", build=build, make_batch_fn=make_batch_fn, loss_fn=loss_fn, flops_per_token=flops_per_token,
    decoder=lambda model, cfg, device: GPTDecoder(model, cfg.seq_length, device),
    classification=Classification(frame=classification_frame, features=classification_features),
    hf_export="gpt2"))
