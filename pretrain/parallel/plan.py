"""Dry run: plan a parallel layout for a large world by arithmetic alone (no GPUs, no process group, no model).

``pretrain train CFG --dry-run --world-size N`` checks the layout with :meth:`ParallelDims.from_config`, counts the
parameters each rank holds, estimates memory per GPU and refuses a layout that does not fit ``--gpu-memory-gib``.

Parameters (megatron-core GPTModel; written here for LayerNorm, linear biases and no GQA: RMSNorm drops the norm
biases, model.add_bias_linear=false the linear ones, and GQA shrinks k and v to groups/heads of q), h hidden, f MLP
width, V padded vocab, s sequence, t tensor parallel. Per layer: two LayerNorms 4h; QKV 3h^2 + 3h and MLP fc1 g*(h*f
+ f) (g = 2 for swiglu, which is gated) are column parallel, divided by t; the attention projection h^2 and fc2 f*h
are row parallel, weight divided by t, bias h replicated. First stage: word embeddings V*h/t (+ s*h learned
positions, replicated). Last stage: final LayerNorm 2h and the output layer V*h/t, which is the embedding itself
when tied and PP = 1, and a separate copy (kept in sync by megatron-core) when tied and PP > 1. Layers split evenly
over stages. BERT (post-LN BertModel) adds 2h token types and moves the final LayerNorm's 2h onto the embeddings
(first stage), and adds on the last stage its MLM head h^2 + 3h, the output bias V/t and with NSP the pooler h^2 + h
and binary head 2h + 2.

Memory per GPU, for the stage whose total is largest (bytes per parameter on that rank, P = its parameters):
- bf16 (precision auto = bf16, as on GPU): params 2P, grads 4P (accumulated and reduced in fp32,
  pretrain/parallel/grads.py; each backward's bf16 gradient lives only until it is added in), optimizer 12P = fp32
  master copy 4 + AdamW m, v 8. fp32 runs: 4P, 4P and 8P (no master copy). ZeRO divides the optimizer by DP from
  stage 1, grads from 2, params at 3.
- Activations, Korthikanti et al. 2022 ("Reducing Activation Recomputation in Large Transformer Models"), per layer
  and micro-batch b with a heads: s*b*h*(34 + 5*a*s/h) bytes unsharded; TP only s*b*h*(10 + 24/t + 5*a*s/(h*t));
  TP + sequence parallel s*b*h*(34 + 5*a*s/h)/t. The MLP's 16 of the 24 sharded terms is two [s, b, f] bf16
  tensors, so it is generalised to 4f/h (8f/h for swiglu, which also keeps the [s, b, 2f] fc1 output and the
  activation); GPT shapes (f = 4h, gelu) give the paper's numbers. Selective recompute drops the 5as/h term; full
  recompute keeps 2*s*b*h per layer (/t with SP) plus one layer's full activations while it is recomputed.
- Micro-batches in flight under 1F1B: stage i holds min(PP - i, m) (m micro-batches per step); interleaved, it
  holds min(2(PP-i-1) + (VPP-1)*PP + 1, m*VPP) model chunks (megatron-core's warmup), which for the first stage is
  the paper's PP * (1 + (PP-1)/(PP*VPP)) micro-batches of its layers.
- Logits on the last stage, one micro-batch: 8*s*b*V/t bytes, two fp32 [s, b, V/t] tensors in the vocab-parallel
  cross entropy (the upcast logits and the softmax it keeps for backward).

Not counted, covered by reserving 10% of the GPU (RESERVE): the CUDA context and NCCL buffers, allocator
fragmentation, DeepSpeed's reduce/all-gather buckets and the transient bf16 gradient of each backward,
ZeRO-3's gathered layer parameters, the embedding's activations, dropout savings when dropout is 0.
"""

from __future__ import annotations

import sys
from dataclasses import dataclass
from typing import TextIO

from pretrain import models
from pretrain.config import Config, ModelConfig
from pretrain.errors import ConfigError
from pretrain.parallel.dims import ParallelDims

GIB = 2**30
#: Fraction of the GPU kept back for what the estimate does not count (see the module docstring).
RESERVE = 0.10
#: Vocabulary assumed when model.vocab_size is 0 (it comes from the tokenizer, which a dry run does not read).
DEFAULT_VOCAB = 50257  # GPT-2's BPE, what the shipped GPT configs are sized for
#: Bytes per logit element on the last stage: two fp32 copies (upcast logits, softmax saved for backward).
LOGITS_BYTES = 8


@dataclass(frozen=True)
class StageMemory:
    """Estimated bytes on one GPU of pipeline stage ``stage`` (every TP/DP rank of a stage holds the same)."""

    stage: int
    params: int  # parameters held by one rank of this stage (before ZeRO partitioning)
    param_bytes: float
    grad_bytes: float
    optimizer_bytes: float
    activation_bytes: float

    @property
    def total_bytes(self) -> float:
        return self.param_bytes + self.grad_bytes + self.optimizer_bytes + self.activation_bytes


@dataclass(frozen=True)
class Plan:
    """The layout of one job and its per-GPU estimate; ``worst`` is the stage that needs the most memory."""

    cfg: Config
    dims: ParallelDims
    accumulation: int
    vocab_size: int  # padded
    vocab_note: str  # how the vocabulary was chosen, shown in the table
    precision: str
    total_params: int
    stages: tuple[StageMemory, ...]

    @property
    def worst(self) -> StageMemory:
        return max(self.stages, key=lambda st: st.total_bytes)

    @property
    def global_batch(self) -> int:
        return self.cfg.train.micro_batch_size * self.accumulation * self.dims.data

    @property
    def tokens_per_step(self) -> int:
        return self.global_batch * self.cfg.model.seq_length


# ----------------------------------------------------------------------------------------------------------------
# Parameters
# ----------------------------------------------------------------------------------------------------------------


def _gate(m: ModelConfig) -> int:
    return 2 if m.activation == "swiglu" else 1  # gated MLP: fc1 produces [gate, up], twice the width


def layer_params(m: ModelConfig, tensor: int = 1) -> int:
    """Parameters of one transformer layer on one TP rank (LayerNorms and row-parallel biases replicated)."""
    h, f, g = m.hidden_size, m.ffn_hidden_size or 4 * m.hidden_size, _gate(m)
    bias = 1 if m.add_bias_linear else 0
    qkv = h + 2 * h * (m.num_query_groups or m.num_attention_heads) // m.num_attention_heads  # grouped k, v
    sharded = (qkv * h + bias * qkv) + h * h + g * (h * f + bias * f) + f * h  # QKV, proj weight, fc1, fc2 weight
    norm = h if m.normalization == "rmsnorm" else 2 * h  # weight (+ bias)
    replicated = 2 * norm + 2 * bias * h  # two norms, proj bias, fc2 bias
    return sharded // tensor + replicated


def stage_params(m: ModelConfig, vocab_size: int, tensor: int = 1, pipeline: int = 1, stage: int = 0) -> int:
    """Parameters on one rank of pipeline stage ``stage``: its layers, plus embeddings first, output layer last."""
    h = m.hidden_size
    count = m.num_layers // pipeline * layer_params(m, tensor)
    if stage == 0:
        count += vocab_size * h // tensor + (m.seq_length * h if m.position_embedding == "learned_absolute" else 0)
    if stage == pipeline - 1:
        count += h if m.normalization == "rmsnorm" else 2 * h  # final norm
        if not m.tie_embeddings or pipeline > 1:  # tied with PP > 1: the last stage keeps its own copy
            count += vocab_size * h // tensor
    # The family's own extras (BERT's token types, MLM head, pooler, ...), as its spec counts them.
    return count + models.get(m.family).extra_stage_params(m, vocab_size, tensor, pipeline, stage)


def total_params(m: ModelConfig, vocab_size: int) -> int:
    """Unique parameters of the whole model (a tied output layer counted once)."""
    return stage_params(m, vocab_size)  # one stage, one TP rank: the whole model, a tied weight once


def padded_vocab(cfg: Config, tensor: int) -> tuple[int, str]:
    """The padded vocabulary and a note saying where it came from (config, or the assumed GPT-2 size)."""
    m = cfg.model
    raw = m.vocab_size or DEFAULT_VOCAB
    padded = models.padded_vocab_size(raw, m.make_vocab_size_divisible_by, tensor)
    if m.vocab_size:
        return padded, f"model.vocab_size {raw}, padded"
    return padded, f"assumed {raw} padded: model.vocab_size 0 means the tokenizer's; set --model.vocab_size=N"


# ----------------------------------------------------------------------------------------------------------------
# Activations
# ----------------------------------------------------------------------------------------------------------------


def layer_activation_bytes(cfg: Config, recompute: str | None = None) -> float:
    """Bytes one layer keeps for backward per micro-batch on one rank (Korthikanti et al. 2022, module doc)."""
    m, p = cfg.model, cfg.parallel
    s, b, h, a, t = m.seq_length, cfg.train.micro_batch_size, m.hidden_size, m.num_attention_heads, p.tensor
    recompute = recompute or p.activation_checkpointing
    sbh = s * b * h
    if recompute == "full":
        return 2 * sbh / (t if p.sequence_parallel else 1)  # only the layer input
    f = m.ffn_hidden_size or 4 * h
    sharded = 8 + (8 if _gate(m) == 2 else 4) * f / h  # Q, K, V, proj input; MLP inner tensors
    scores = 5 * a * s / h if recompute == "none" else 0.0  # softmax, dropout mask and output: [b, a, s, s]
    if p.sequence_parallel:
        return sbh * (10 + sharded + scores) / t
    return sbh * (10 + (sharded + scores) / t)


def micro_batches_in_flight(stage: int, pipeline: int, virtual: int, micro_batches: int) -> float:
    """Micro-batches of this stage's layers whose activations are alive at the peak of the 1F1B schedule."""
    if pipeline == 1:
        return 1.0  # accumulation runs backward after each forward
    if virtual == 1:
        return float(min(pipeline - stage, micro_batches))
    chunks = min(2 * (pipeline - stage - 1) + (virtual - 1) * pipeline + 1, micro_batches * virtual)
    return chunks / virtual  # each chunk is 1/virtual of the stage's layers


# ----------------------------------------------------------------------------------------------------------------
# The plan
# ----------------------------------------------------------------------------------------------------------------


def estimate(cfg: Config, world_size: int) -> Plan:
    """Check the layout (one-line ConfigError) and estimate memory per GPU for every pipeline stage."""
    dims = ParallelDims.from_config(cfg, world_size)
    m, p = cfg.model, cfg.parallel
    accumulation = dims.grad_accumulation_steps(cfg.train.micro_batch_size, cfg.train.global_batch_size)
    vocab, note = padded_vocab(cfg, dims.tensor)
    precision = "fp32" if cfg.train.precision == "fp32" else "bf16"  # auto is bf16 on the GPUs this plans for
    weight, grad, optim = (2, 4, 12) if precision == "bf16" else (4, 4, 8)
    dp, zero = dims.data, p.zero_stage
    layers_per_stage = m.num_layers // dims.pipeline
    per_layer = layer_activation_bytes(cfg)
    working = layer_activation_bytes(cfg, "none") if p.activation_checkpointing == "full" else 0.0
    logits = LOGITS_BYTES * m.seq_length * cfg.train.micro_batch_size * vocab / dims.tensor
    stages = []
    for stage in range(dims.pipeline):
        n = stage_params(m, vocab, dims.tensor, dims.pipeline, stage)
        in_flight = micro_batches_in_flight(stage, dims.pipeline, dims.virtual_pipeline, accumulation)
        activations = per_layer * layers_per_stage * in_flight + working
        activations += logits if stage == dims.pipeline - 1 else 0.0
        stages.append(StageMemory(
            stage=stage, params=n, param_bytes=weight * n / (dp if zero >= 3 else 1),
            grad_bytes=grad * n / (dp if zero >= 2 else 1), optimizer_bytes=optim * n / (dp if zero >= 1 else 1),
            activation_bytes=activations))
    return Plan(cfg=cfg, dims=dims, accumulation=accumulation, vocab_size=vocab, vocab_note=note,
                precision=precision, total_params=total_params(m, vocab), stages=tuple(stages))


def advice(plan: Plan) -> str:
    """What to change when the worst stage does not fit, aimed at its largest part."""
    worst, p, t = plan.worst, plan.cfg.parallel, plan.cfg.train
    parts = {"activations": worst.activation_bytes, "optimizer": worst.optimizer_bytes,
             "grads": worst.grad_bytes, "params": worst.param_bytes}
    largest = max(parts, key=parts.get)
    tips = []
    if largest == "activations":
        if p.activation_checkpointing != "full":
            nxt = "selective" if p.activation_checkpointing == "none" else "full"
            tips.append(f"parallel.activation_checkpointing={nxt}")
        if p.tensor > 1 and not p.sequence_parallel:
            tips.append("parallel.sequence_parallel=true")
        if t.micro_batch_size > 1:
            tips.append(f"train.micro_batch_size={t.micro_batch_size // 2}")
    else:
        nxt = {"optimizer": 1, "grads": 2, "params": 3}[largest]
        if p.zero_stage < nxt and (nxt == 1 or p.pipeline == 1):
            tips.append(f"parallel.zero_stage={nxt}")
    tips.append(f"parallel.tensor or parallel.pipeline above {p.tensor} x {p.pipeline}")
    return f"largest part is {largest} ({parts[largest] / GIB:.1f} GiB); try " + ", ".join(tips)


# ----------------------------------------------------------------------------------------------------------------
# Output
# ----------------------------------------------------------------------------------------------------------------


def _count(n: int) -> str:
    for unit, scale in (("B", 1e9), ("M", 1e6), ("K", 1e3)):
        if n >= scale:
            return f"{n:,} ({n / scale:.2f} {unit})"
    return f"{n:,}"


def format_table(plan: Plan, gpu_memory_gib: float) -> str:
    """The plan as an aligned two-column text table (what ``--dry-run`` prints)."""
    d, m, p, t, worst = plan.dims, plan.cfg.model, plan.cfg.parallel, plan.cfg.train, plan.worst
    usable = gpu_memory_gib * (1 - RESERVE)
    fits = worst.total_bytes / GIB <= usable
    where = f"stage {worst.stage} of {d.pipeline}" if d.pipeline > 1 else "every rank"
    sections: list[tuple[str, list[tuple[str, str]]]] = [
        (f"layout ({m.family}: {m.num_layers} layers, hidden {m.hidden_size}, {m.num_attention_heads} heads, "
         f"seq {m.seq_length})", [
            ("world size", str(d.world_size)),
            ("tensor parallel (TP)", str(d.tensor)),
            ("pipeline parallel (PP)", str(d.pipeline)),
            ("virtual pipeline (VPP)", str(d.virtual_pipeline)),
            ("data parallel (DP)", str(d.data)),
            ("ZeRO stage", str(p.zero_stage)),
            ("sequence parallel", "on" if p.sequence_parallel else "off"),
            ("activation recompute", p.activation_checkpointing)]),
        ("batch", [
            ("micro batch", f"{t.micro_batch_size} sequences per rank"),
            ("global batch", f"{plan.global_batch} sequences"),
            ("accumulation steps", str(plan.accumulation)),
            ("tokens per step", f"{plan.tokens_per_step:,}")]),
        ("parameters", [
            ("vocabulary", f"{plan.vocab_size} ({plan.vocab_note})"),
            ("total parameters", _count(plan.total_params)),
            ("per rank, largest stage", _count(max(s.params for s in plan.stages)))]),
        (f"memory per GPU, GiB ({where}, {plan.precision})", [
            ("params", f"{worst.param_bytes / GIB:8.2f}"),
            ("grads", f"{worst.grad_bytes / GIB:8.2f}"),
            ("optimizer", f"{worst.optimizer_bytes / GIB:8.2f}"),
            ("activations", f"{worst.activation_bytes / GIB:8.2f}"),
            ("total", f"{worst.total_bytes / GIB:8.2f}"),
            ("GPU budget", f"{usable:8.2f}   ({gpu_memory_gib:g} GiB less {RESERVE:.0%} reserve): "
                           + ("fits" if fits else "DOES NOT FIT"))]),
    ]
    if d.pipeline > 1:
        by_stage = ", ".join(f"{s.stage}: {s.total_bytes / GIB:.2f}" for s in plan.stages)
        sections[-1][1].append(("total by stage", by_stage))
    width = max(len(k) for _, rows in sections for k, _ in rows) + 4
    lines = []
    for title, rows in sections:
        lines.append(title)
        lines.extend(f"  {key:<{width}}{value}" for key, value in rows)
    return "\n".join(lines)


def dry_run(cfg: Config, world_size: int, gpu_memory_gib: float = 80.0, out: TextIO | None = None) -> int:
    """Print the plan; return 0 when it fits. Raises ConfigError (one line, exit 2) for bad or oversized layouts."""
    if not gpu_memory_gib > 0:
        raise ConfigError(f"--gpu-memory-gib: must be > 0, got {gpu_memory_gib}")
    models.get(cfg.model.family).check_config(cfg)  # as `pretrain train` would, before anything is printed
    plan = estimate(cfg, world_size)  # invalid layouts fail here too
    out = out or sys.stdout
    print(format_table(plan, gpu_memory_gib), file=out, flush=True)
    usable = gpu_memory_gib * (1 - RESERVE)
    need = plan.worst.total_bytes / GIB
    if need > usable:
        raise ConfigError(f"--gpu-memory-gib {gpu_memory_gib:g}: the estimate {need:.1f} GiB per GPU exceeds the "
                          f"usable {usable:.1f} GiB; {advice(plan)}")
    return 0
