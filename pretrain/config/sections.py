"""The run configuration's sections: one dataclass per section (and per nested section), inert typed data.

Every field has a docstring-style comment (``#:``) that the README's config reference is written from.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal


@dataclass
class RunConfig:
    #: Run name; used in logs and metric labels.
    name: str = "run"
    #: Run directory: resolved config, metrics.jsonl and checkpoints/ live here. Reusing it resumes the run.
    dir: str = "runs/default"
    #: Seed for model init, dropout and data order. Same seed + same data = same run.
    seed: int = 1234


@dataclass
class ModelConfig:
    #: Model family, a key of the ModelSpec registry (pretrain/models): gpt, bert (MLM + NSP) or
    #: transformer_xl (segment memory + relative positions).
    family: Literal["gpt", "bert", "transformer_xl"] = "gpt"
    #: Number of transformer layers.
    num_layers: int = 2
    #: Hidden size (d_model).
    hidden_size: int = 64
    #: Attention heads; must divide hidden_size (and be divisible by parallel.tensor).
    num_attention_heads: int = 4
    #: MLP inner size; 0 means 4 * hidden_size.
    ffn_hidden_size: int = 0
    #: Training sequence length in tokens; must equal the data manifest's seq_length.
    seq_length: int = 128
    #: Vocabulary size; 0 means the tokenizer's (from the data manifest). Padded up for tensor parallelism.
    vocab_size: int = 0
    #: Pad the vocabulary to a multiple of this times parallel.tensor (Megatron's rule; keeps GEMMs aligned).
    make_vocab_size_divisible_by: int = 128
    #: Position embedding: learned_absolute (GPT-2) or rope.
    position_embedding: Literal["learned_absolute", "rope"] = "learned_absolute"
    #: MLP activation: gelu (erf), gelu_tanh (GPT-2's gelu_new) or swiglu.
    activation: Literal["gelu", "gelu_tanh", "swiglu"] = "gelu"
    #: Dropout after attention and MLP.
    hidden_dropout: float = 0.0
    #: Dropout on attention probabilities.
    attention_dropout: float = 0.0
    #: Std of the normal init of weights (output layers are scaled by 1/sqrt(2 * num_layers)).
    init_method_std: float = 0.02
    #: LayerNorm epsilon.
    layernorm_epsilon: float = 1e-5
    #: Normalization of every layer and the final one: layernorm (GPT-2, BERT) or rmsnorm (Llama: no mean, no
    #: bias; the epsilon is model.layernorm_epsilon). GPT only.
    normalization: Literal["layernorm", "rmsnorm"] = "layernorm"
    #: Key/value head groups (grouped-query attention; 1 = multi-query); 0 means one per attention head. Must
    #: divide num_attention_heads and be divisible by parallel.tensor. GPT only.
    num_query_groups: int = 0
    #: Biases in the attention and MLP linear layers (GPT-2 and BERT have them; Llama has none). GPT only.
    add_bias_linear: bool = True
    #: Base of the rotary position frequencies (10000 in Llama 2, 500000 in Llama 3); needs
    #: position_embedding=rope.
    rope_theta: float = 10000.0
    #: Llama 3.1-style rotary frequency scaling (HF config.json ``rope_scaling`` with ``rope_type: llama3``):
    #: HF's ``factor``; 0 = no scaling. Wavelengths longer than rope_original_max_position_embeddings /
    #: rope_low_freq_factor are stretched by this factor, those shorter than .../rope_high_freq_factor kept, those
    #: between interpolated (megatron-core's RotaryEmbedding._apply_scaling). Llama 3.1: 8, Llama 3.2: 32. GPT with
    #: position_embedding=rope only.
    rope_scaling_factor: float = 0.0
    #: HF ``rope_scaling.low_freq_factor`` (Llama 3.1 / 3.2: 1); used when rope_scaling_factor > 0.
    rope_low_freq_factor: float = 1.0
    #: HF ``rope_scaling.high_freq_factor`` (Llama 3.1 / 3.2: 4); must exceed rope_low_freq_factor.
    rope_high_freq_factor: float = 4.0
    #: HF ``rope_scaling.original_max_position_embeddings``: the context the unscaled model was trained at
    #: (Llama 3.1 / 3.2: 8192).
    rope_original_max_position_embeddings: int = 8192
    #: Tie input embedding and output projection (GPT-2 does).
    tie_embeddings: bool = True
    #: GPT layer implementation: auto (Transformer Engine's fused layers on CUDA when TE imports and the run needs
    #: nothing TE's spec drops, else megatron-core's local layers; the choice and its reason are logged),
    #: transformer_engine (required: a one-line error if it cannot be used) or local. Checkpoints do not depend
    #: on it: parameters are saved under the local spec's names.
    layer_spec: Literal["auto", "transformer_engine", "local"] = "auto"
    #: BERT: fraction of non-special tokens selected for masked-LM prediction (80% [MASK], 10% random, 10% kept).
    mask_prob: float = 0.15
    #: BERT: chance a sample is shorter than seq_length (the paper's short_seq_prob; fewer mismatches with
    #: fine-tuning lengths).
    short_seq_prob: float = 0.1
    #: BERT: train the next-sentence-prediction head (loss = MLM + NSP); false trains MLM only.
    nsp: bool = True
    #: Transformer-XL: hidden states per layer kept from earlier segments and attended to without gradient
    #: (the paper's mem_len); model.seq_length is the segment length (tgt_len).
    mem_length: int = 0
    #: Transformer-XL: relative distances beyond this share one encoding (the paper's clamp_len); 0: no clamp.
    clamp_len: int = 0
    #: Transformer-XL: every query attends to the same number of keys (the reference's same_length).
    same_length: bool = False
    #: Transformer-XL: memory length during evaluation (the paper evaluates with longer memory); -1: mem_length.
    eval_mem_length: int = -1
    #: Transformer-XL: clamp_len during evaluation; -1: clamp_len, 0: no clamp.
    eval_clamp_len: int = -1
    #: Transformer-XL: same_length during evaluation (the reference turns it on for evaluation).
    eval_same_length: bool = False
    #: Transformer-XL: a separate u (r_w_bias) and v (r_r_bias) per layer; false shares one pair across
    #: layers, as the paper and the reference's default do.
    untie_r: bool = False


@dataclass
class DataSource:
    """One training corpus in a blend. In YAML either a plain path or a mapping with these keys."""

    #: Shard directory holding manifest.json and the shards (written by `pretrain data prepare`).
    path: str = ""
    #: Relative share of training samples drawn from this source (normalised over all sources).
    weight: float = 1.0
    #: Shards as a brace pattern or URLs webdataset reads (`pipe:...`, http); empty means the manifest's shard
    #: files next to it in `path`.
    shards: str = ""


@dataclass
class DataConfig:
    #: Training sources: a shard directory, or a list of {path, weight[, shards]} blended deterministically
    #: (each global sample goes to the source with the largest weight * samples - count, Megatron's rule).
    train: list[DataSource] = field(default_factory=list)
    #: Directory of validation shards with manifest.json; empty disables evaluation.
    valid: str = ""
    #: sentencepiece model; must match the manifests' tokenizer checksum. Empty skips the check.
    tokenizer: str = ""
    #: DataLoader worker processes per rank (0 reads in the training process). Started from multiprocessing's
    #: fork server, never forked from the training process and its threads.
    num_workers: int = 0
    #: Shuffle shard and sequence order (seeded by run.seed and the epoch).
    shuffle: bool = True
    #: Rows are shuffled within windows of this many consecutive tar members (blocks of packed sequences).
    shuffle_window_blocks: int = 8
    #: GPT: restart position ids and block attention at each EOS (document end), no loss on the EOS input
    #: position (Megatron's reset_position_ids + reset_attention_mask + eod_mask_loss).
    reset_at_eos: bool = False
    #: A corrupt or missing shard: error (stop with a one-line message) or skip (warn, count in metrics).
    on_bad_shard: Literal["error", "skip"] = "error"


@dataclass
class ParallelConfig:
    #: Tensor-parallel size (megatron-core column/row-parallel layers).
    tensor: int = 1
    #: Pipeline-parallel size: the layers split into this many stages (megatron-core 1F1B schedule).
    pipeline: int = 1
    #: Model chunks per pipeline rank for the interleaved 1F1B schedule (1 = plain 1F1B); needs pipeline > 1.
    virtual_pipeline: int = 1
    #: Sequence parallelism on top of tensor parallelism (needs tensor > 1).
    sequence_parallel: bool = False
    #: DeepSpeed ZeRO stage: 0 (plain data parallel), 1 (optimizer state), 2 (+ gradients), 3 (+ parameters).
    #: Stages 2 and 3 partition gradients inside backward, so they need pipeline 1.
    zero_stage: Literal[0, 1, 2, 3] = 0
    #: Activation checkpointing (megatron-core recompute): none; selective (recompute only the attention core,
    #: cheap to redo, large to keep); full (keep only each layer's input, recompute the layer in backward).
    activation_checkpointing: Literal["none", "selective", "full"] = "none"


@dataclass
class OptimConfig:
    #: Peak learning rate (AdamW).
    lr: float = 1e-3
    #: Final learning rate of the decay.
    min_lr: float = 1e-4
    #: Linear warmup steps from 0 to lr.
    warmup_steps: int = 10
    #: Decay shape after warmup.
    schedule: Literal["cosine", "linear", "constant"] = "cosine"
    #: Steps over which lr decays to min_lr; 0 means train.steps.
    decay_steps: int = 0
    #: AdamW decoupled weight decay (not applied to biases and norms).
    weight_decay: float = 0.1
    #: AdamW beta1.
    beta1: float = 0.9
    #: AdamW beta2.
    beta2: float = 0.95
    #: AdamW epsilon.
    eps: float = 1e-8
    #: Clip the global gradient norm to this; 0 disables.
    clip_grad: float = 1.0


@dataclass
class TrainConfig:
    #: Optimizer steps to train for (the run ends at this step, also when resumed).
    steps: int = 100
    #: Sequences per micro batch per data-parallel rank.
    micro_batch_size: int = 8
    #: Sequences per optimizer step over all ranks; 0 means micro_batch_size * data-parallel size (no
    #: accumulation). Must be a multiple of micro_batch_size * data-parallel size; the quotient is the number of
    #: gradient-accumulation micro steps.
    global_batch_size: int = 0
    #: auto (bf16 on a GPU that has it; fp32 on a GPU without it, logged, and on CPU), fp32 or bf16.
    precision: Literal["auto", "fp32", "bf16"] = "auto"
    #: Log (console + metrics.jsonl) every N steps.
    log_every: int = 10
    #: Evaluate on data.valid every N steps; 0 only at the end.
    eval_every: int = 0
    #: Validation micro batches per evaluation; 0 means the whole split.
    eval_batches: int = 0


@dataclass
class CheckpointConfig:
    #: Checkpoint directory; empty means <run.dir>/checkpoints.
    dir: str = ""
    #: Save every N steps (and at the end); 0 saves only at the end.
    every_steps: int = 100
    #: Keep the newest N complete checkpoints; 0 keeps all.
    keep_last: int = 2
    #: Also keep every checkpoint whose step is a multiple of N for good (never pruned); 0: none.
    keep_every: int = 0
    #: Write checkpoints in a background thread (``checkpoint.async`` is accepted as this key): training waits only
    #: for a copy to host memory; the save commits at a later step once every rank has written it.
    async_save: bool = False
    #: A checkpoint directory (`step_<N>`, any layout) that seeds this run: used only while dir has no complete
    #: checkpoint that verifies, so a restarted run continues its own (Megatron's load/save); to fork from an older
    #: step, use a fresh run.dir.
    load: str = ""


@dataclass
class PrometheusConfig:
    #: Serve Prometheus metrics (/metrics) on every rank, at host:port + LOCAL_RANK.
    enabled: bool = False
    #: Address the exporter binds to; the default keeps it on the machine, anything else is an explicit choice.
    host: str = "127.0.0.1"
    #: Base port; local rank r serves on port + r.
    port: int = 9400


@dataclass
class WandbConfig:
    #: Log every logged step's scalars to Weights & Biases from rank 0 (needs the `wandb` extra); never fatal.
    enabled: bool = False
    #: W&B project.
    project: str = "pretrain"
    #: W&B entity (team or user); empty: the account's default.
    entity: str = ""
    #: W&B run name; empty: the run directory's name.
    name: str = ""
    #: online (upload while training), offline (write under <run.dir>/wandb; `wandb sync` later), or disabled.
    mode: Literal["online", "offline", "disabled"] = "online"


@dataclass
class MetricsConfig:
    #: Write metrics.jsonl in the run directory.
    jsonl: bool = True
    #: Print a line per logged step on rank 0.
    console: bool = True
    #: The Prometheus exporter (``metrics.prometheus.enabled``, ``.host``, ``.port``).
    prometheus: PrometheusConfig = field(default_factory=PrometheusConfig)
    #: Peak dense TFLOP/s of one device for the MFU metric; 0: look the GPU up in a table (no MFU on CPU).
    peak_tflops: float = 0.0
    #: Write TensorBoard event files under <run.dir>/tensorboard from rank 0 (needs the `tensorboard` extra).
    tensorboard: bool = False
    #: Weights & Biases (``metrics.wandb.enabled``, ``.project``, ``.entity``, ``.name``, ``.mode``).
    wandb: WandbConfig = field(default_factory=WandbConfig)


@dataclass
class FtConfig:
    #: On SIGTERM/SIGUSR1 save a checkpoint at the next step boundary and exit with the requeue code (75).
    save_on_signal: bool = True
    #: Hang watchdog: a training step (or one evaluation batch) running longer than this makes every rank print a
    #: line naming it, dump its Python stacks and exit with code 86; collective timeouts are lowered to about this
    #: after the first step. 0 disables the watchdog. The default, 30 min, is far above any healthy step and equals
    #: torch's gloo collective timeout, while a hung job loses at most that much of its allocation.
    step_timeout_s: float = 1800.0
    #: Bound on everything before the first step completes (resume, first step with its warm-up); 0: step_timeout_s.
    startup_timeout_s: float = 3600.0
    #: Bound on one checkpoint save (the time it holds the training loop); 0: step_timeout_s.
    save_timeout_s: float = 0.0
    #: A non-finite loss or gradient norm: skip (no update on any rank: parameters and optimizer state stay as they
    #: were; counted as skipped_steps) or abort (exit with code 87 and a one-line message naming the step).
    nan_policy: Literal["skip", "abort"] = "skip"
    #: Abort (code 87) after this many consecutive skipped steps: the run is no longer learning; 0: never.
    max_skipped_in_a_row: int = 10
    #: Loss spike: the data-parallel mean loss lies this many standard deviations above the mean of the previous
    #: spike_window losses; counted as loss_spikes with a warning; 0 disables.
    spike_zscore: float = 6.0
    #: Losses the spike z-score is measured against (kept in the checkpoint); needs >= 2.
    spike_window: int = 100
    #: What a loss spike does: warn (count it, update as usual) or skip (also skip its update, like a NaN).
    spike_policy: Literal["warn", "skip"] = "warn"
    #: Preflight (multi-process runs, before the first step): MiB of fp32 per rank in the timed all-reduce whose
    #: bus bandwidth is logged and exported (pretrain_preflight_allreduce_bus_bandwidth_bytes); 0 skips the timing
    #: (the agreement checks always run). 64 MiB is large enough to measure the link, not the latency.
    preflight_allreduce_mib: float = 64.0


@dataclass
class Config:
    """The whole run. Section names are a contract (README, configs/, launchers)."""

    #: Name, directory and seed of the run.
    run: RunConfig = field(default_factory=RunConfig)
    #: Architecture and sizes.
    model: ModelConfig = field(default_factory=ModelConfig)
    #: Shards, tokenizer, loader workers.
    data: DataConfig = field(default_factory=DataConfig)
    #: Tensor / pipeline / sequence parallelism and the ZeRO stage.
    parallel: ParallelConfig = field(default_factory=ParallelConfig)
    #: AdamW and the learning-rate schedule.
    optim: OptimConfig = field(default_factory=OptimConfig)
    #: Steps, batch sizes, precision, logging and evaluation cadence.
    train: TrainConfig = field(default_factory=TrainConfig)
    #: Where and how often to checkpoint.
    checkpoint: CheckpointConfig = field(default_factory=CheckpointConfig)
    #: Metric sinks.
    metrics: MetricsConfig = field(default_factory=MetricsConfig)
    #: Fault tolerance.
    ft: FtConfig = field(default_factory=FtConfig)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    def checkpoint_dir(self) -> Path:
        return Path(self.checkpoint.dir or Path(self.run.dir) / "checkpoints")
