"""ParallelDims: how the world splits into tensor x pipeline x data parallel groups, checked before any work."""

from __future__ import annotations

from dataclasses import dataclass, field


from pretrain.config import Config
from pretrain.errors import ConfigError


@dataclass(frozen=True)
class ParallelDims:
    """The layout of one job. ``data`` is derived: world / (tensor * pipeline). ``virtual_pipeline`` model chunks
    per pipeline rank (interleaved schedule) do not change the number of ranks."""

    world_size: int
    tensor: int = 1
    pipeline: int = 1
    virtual_pipeline: int = 1
    data: int = field(init=False)

    def __post_init__(self):
        for key, value in [("world size", self.world_size), ("parallel.tensor", self.tensor),
                           ("parallel.pipeline", self.pipeline), ("parallel.virtual_pipeline", self.virtual_pipeline)]:
            if value < 1:
                raise ConfigError(f"{key} must be >= 1, got {value}")
        mp = self.tensor * self.pipeline
        if self.world_size % mp != 0:
            raise ConfigError(
                f"parallel.tensor ({self.tensor}) x parallel.pipeline ({self.pipeline}) = {mp} does not divide "
                f"the world size {self.world_size}")
        object.__setattr__(self, "data", self.world_size // mp)

    @classmethod
    def from_config(cls, cfg: Config, world_size: int) -> "ParallelDims":
        """Build and check the layout against the model and batch sizes; one-line ConfigError naming the key."""
        p, m, t = cfg.parallel, cfg.model, cfg.train
        dims = cls(world_size=world_size, tensor=p.tensor, pipeline=p.pipeline, virtual_pipeline=p.virtual_pipeline)
        ffn = m.ffn_hidden_size or 4 * m.hidden_size
        groups = [("model.num_query_groups", m.num_query_groups)] if m.num_query_groups else []
        for key, value in [("model.num_attention_heads", m.num_attention_heads), ("model.ffn_hidden_size", ffn),
                           *groups]:
            if value % p.tensor:
                raise ConfigError(f"{key} ({value}) is not divisible by parallel.tensor ({p.tensor})")
        if p.sequence_parallel and m.seq_length % p.tensor:
            raise ConfigError(f"model.seq_length ({m.seq_length}) is not divisible by parallel.tensor ({p.tensor}) "
                              "as sequence parallelism needs")
        stages = p.pipeline * p.virtual_pipeline
        if m.num_layers % stages:
            raise ConfigError(f"model.num_layers ({m.num_layers}) is not divisible by parallel.pipeline "
                              f"({p.pipeline}) x parallel.virtual_pipeline ({p.virtual_pipeline}) = {stages}")
        micro_batches = dims.grad_accumulation_steps(t.micro_batch_size, t.global_batch_size)  # checks batch sizes
        if p.virtual_pipeline > 1 and micro_batches < p.pipeline:
            global_batch = t.global_batch_size or t.micro_batch_size * dims.data
            raise ConfigError(
                f"train.global_batch_size ({global_batch}) gives {micro_batches} micro-batches per step "
                f"(micro {t.micro_batch_size} x data-parallel {dims.data}); the interleaved schedule needs at least "
                f"parallel.pipeline ({p.pipeline})")
        return dims

    def grad_accumulation_steps(self, micro_batch_size: int, global_batch_size: int) -> int:
        """Micro steps per optimizer step: global = micro x accumulation x data-parallel size."""
        per_step = micro_batch_size * self.data
        if global_batch_size == 0:
            return 1
        if global_batch_size % per_step:
            raise ConfigError(
                f"train.global_batch_size ({global_batch_size}) is not divisible by train.micro_batch_size "
                f"({micro_batch_size}) x data-parallel size ({self.data}) = {per_step}")
        return global_batch_size // per_step
