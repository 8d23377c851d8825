"""The one DeepSpeed adapter: ZeRO config generated from ours, the engine built around our model chunks, and
``TrainEngine``, through which the trainer runs every layout without branching on ZeRO stage or pipelining.
(DeepSpeed's checkpoint files go through our checkpoint engine, pretrain/checkpoint/writer.py.)
"""

from __future__ import annotations

import hashlib
import logging
import math
from typing import Any

import deepspeed
import torch
import torch.distributed as dist
from megatron.core import parallel_state

from pretrain import device
from pretrain.config import Config
from pretrain.optim import build_optimizer
from pretrain.parallel import grads
from pretrain.parallel.dims import ParallelDims
from pretrain.parallel.grads import main_grad


class DeepSpeedMpu:
    """The ``mpu`` object DeepSpeed asks for, answered from megatron-core's parallel_state.

    DeepSpeed's "model parallel" group is every rank holding a different piece of one model replica (TP x PP);
    it uses it for TP-aware gradient norms and for checkpoint file names (mp_rank_XX).
    """

    get_data_parallel_group = staticmethod(parallel_state.get_data_parallel_group)
    get_data_parallel_rank = staticmethod(parallel_state.get_data_parallel_rank)
    get_data_parallel_world_size = staticmethod(parallel_state.get_data_parallel_world_size)
    get_model_parallel_group = staticmethod(parallel_state.get_model_parallel_group)
    get_tensor_model_parallel_group = staticmethod(parallel_state.get_tensor_model_parallel_group)
    get_tensor_model_parallel_rank = staticmethod(parallel_state.get_tensor_model_parallel_rank)
    get_tensor_model_parallel_world_size = staticmethod(parallel_state.get_tensor_model_parallel_world_size)

    @staticmethod
    def get_model_parallel_rank() -> int:
        return dist.get_rank(group=parallel_state.get_model_parallel_group())

    @staticmethod
    def get_model_parallel_world_size() -> int:
        return dist.get_world_size(group=parallel_state.get_model_parallel_group())


def deepspeed_config(cfg: Config, dims: ParallelDims, dtype: torch.dtype) -> dict:
    """DeepSpeed's JSON config, generated from ours so there is one source of truth for batch sizes and ZeRO.

    With pipelining, megatron-core's schedule runs every micro-batch's backward itself: DeepSpeed then sees one
    "micro-batch" per step (all of this rank's samples) and reduces gradients once, before its step.
    """
    t = cfg.train
    accumulation = dims.grad_accumulation_steps(t.micro_batch_size, t.global_batch_size)
    on_cuda, pipelined = device.cuda_available(), dims.pipeline > 1
    micro, accumulation = (t.micro_batch_size * accumulation, 1) if pipelined else (t.micro_batch_size, accumulation)
    bf16 = dtype == torch.bfloat16
    config = {
        "train_micro_batch_size_per_gpu": micro,
        "gradient_accumulation_steps": accumulation,
        "train_batch_size": micro * accumulation * dims.data,
        # DeepSpeed computes the gradient norm only while clipping; a bound no gradient reaches keeps the norm
        # reported when clipping is off.
        "gradient_clipping": cfg.optim.clip_grad or 1e12,
        # immediate_grad_update: BF16_Optimizer (bf16 ZeRO-1) moves each gradient into fp32 as autograd produces
        # it, also under a pipeline schedule, which bypasses DeepSpeed's backward.
        "bf16": {"enabled": bf16, "immediate_grad_update": bf16},
        "zero_optimization": {
            "stage": cfg.parallel.zero_stage,
            # Both work inside DeepSpeed's own backward (its reduction buckets and hooks), which a pipeline
            # schedule bypasses; overlapping also needs CUDA streams (on CPU it only adds copies).
            "contiguous_gradients": not pipelined,
            "overlap_comm": on_cuda and not pipelined,
        },
        # Our AdamW is a plain torch optimizer; DeepSpeed calls any optimizer it did not build "untested".
        "zero_allow_untested_optimizer": True,
        "steps_per_print": 2**31 - 1,  # we log ourselves
        "wall_clock_breakdown": False,
    }
    if bf16:  # accumulate and all-reduce gradients in fp32: pretrain/parallel/grads.py says why and how per stage
        config["communication_data_type"] = "fp32"
        if cfg.parallel.zero_stage > 0:  # ZeRO-0: our own (DeepSpeed 0.19.8 refuses it without its PipelineEngine)
            config["data_types"] = {"grad_accum_dtype": "fp32"}
    return config


def build_engine(chunks: list[torch.nn.Module], cfg: Config, dims: ParallelDims, dtype: torch.dtype):
    """Wrap this rank's model chunks in a DeepSpeed engine with our AdamW (``engine.module`` is the model: the
    one chunk without pipelining, else a ModuleList of the chunks)."""
    logging.getLogger("DeepSpeed").setLevel(logging.WARNING)
    model = chunks[0] if dims.pipeline == 1 else torch.nn.ModuleList(chunks)
    _mark_tied_copy(chunks)
    grads.sum_sequence_parallel_grads(model)
    engine, *_ = deepspeed.initialize(
        model=model,
        optimizer=build_optimizer(model, cfg.optim),
        config=deepspeed_config(cfg, dims, dtype),
        mpu=DeepSpeedMpu(),
        dist_init_required=False,
    )
    if dtype != torch.bfloat16:
        grads.record_fp32_grad_norm(engine)
    elif engine.zero_optimization_stage() == 0:
        grads.accumulate_zero0_bf16_in_fp32(engine)
    else:
        grads.link_bf16_optimizer_grads(engine)
    return engine


def _mark_tied_copy(chunks: list[torch.nn.Module]) -> None:
    """Parameters held more than once in one model replica are counted once in the gradient norm (DeepSpeed
    skips those marked ``ds_pipe_replicated``): the last stage's copy of a tied word embedding, and every copy
    but the first chunk's of a parameter marked ``pipeline_shared`` (one that every pipeline chunk holds, e.g.
    Transformer-XL's shared u and v)."""
    if parallel_state.get_pipeline_model_parallel_world_size() == 1:
        return
    first_stage = parallel_state.is_pipeline_first_stage(ignore_virtual=True)
    for i, chunk in enumerate(chunks):
        if not first_stage and getattr(chunk, "share_embeddings_and_output_weights", False) and chunk.post_process:
            chunk.output_layer.weight.ds_pipe_replicated = True
        for param in _pipeline_shared(chunk):
            param.ds_pipe_replicated = not (first_stage and i == 0)


def _pipeline_shared(chunk: torch.nn.Module) -> list[torch.nn.Parameter]:
    return [p for p in chunk.parameters() if getattr(p, "pipeline_shared", False)]


def verify_replicas(engine) -> str:
    """Check that every data-parallel replica holds bitwise-identical parameters; returns the shared sha256.

    Replicas drift only through bugs (a missed all-reduce, a rank-dependent RNG), and silently; a run checks this
    when it ends. Under ZeRO-3 each parameter is gathered in turn, so peak memory grows by one parameter only.
    """
    digest = hashlib.sha256()
    zero3 = engine.zero_optimization_stage() == 3
    for name, param in engine.module.named_parameters():
        with deepspeed.zero.GatheredParameters([param], enabled=zero3):
            digest.update(name.encode())
            digest.update(param.detach().float().cpu().numpy().tobytes())
    mine = digest.hexdigest()
    group = parallel_state.get_data_parallel_group()
    hashes = [None] * dist.get_world_size(group)
    dist.all_gather_object(hashes, mine, group=group)
    if len(set(hashes)) != 1:
        raise RuntimeError(f"parameters differ across data-parallel replicas: sha256 {sorted(set(hashes))}")
    return mine


class TrainEngine:
    """One optimizer step for any layout, so the trainer never branches on ZeRO stage or pipelining.

    Without pipelining the micro-batches run through DeepSpeed's own forward/backward (ZeRO-2/3 hooks, loss
    scaling, accumulation). With pipelining megatron-core's 1F1B or interleaved schedule runs them across the
    stages; gradients of a tied word embedding are then summed over its first- and last-stage copies, and
    DeepSpeed reduces over data parallelism once before its step. Losses come back on every rank.
    """

    def __init__(self, engine, chunks: list[torch.nn.Module], loss_fn, seq_length: int, micro_batch_size: int):
        self.engine, self.chunks, self.loss_fn = engine, chunks, loss_fn
        self.seq_length, self.micro_batch_size = seq_length, micro_batch_size
        self.pipelined = parallel_state.get_pipeline_model_parallel_world_size() > 1
        # One replica without ZeRO: DeepSpeed's all-reduce would flatten every gradient, reduce it over a group of
        # one and copy it back (3-4% of a 26M-parameter CPU step, bench/train_step.py); step() keeps its one side
        # effect instead.
        self.one_replica = (parallel_state.get_data_parallel_world_size() == 1
                            and engine.zero_optimization_stage() == 0)
        if self.one_replica:
            engine.enable_backward_allreduce = False
        self._skip_update = False
        self._gate_optimizer_step()

    @property
    def optimizer(self) -> torch.optim.Optimizer:
        return self.engine.optimizer

    def grad_norm(self) -> float:
        """Global gradient norm of the last step (before clipping), over every parallel dimension."""
        return float(self.engine.get_global_grad_norm() or 0.0)

    @property
    def training(self) -> bool:
        return self.engine.training

    def train(self, mode: bool = True) -> None:
        self.engine.train(mode)

    def forward_backward(self, batches: list[dict[str, Any]]) -> torch.Tensor:
        """Forward and backward of one step's micro-batches; the mean of their losses (same on every rank)."""
        if not self.pipelined:
            total = torch.zeros((), device=self.engine.device)
            for i, batch in enumerate(batches):
                # DeepSpeed counts accumulation in step() calls; we call step() once per optimizer step, so say
                # which backward ends the step (it reduces gradients there, and step() then updates).
                self.engine.set_gradient_accumulation_boundary(i == len(batches) - 1)
                loss = self.loss_fn(self.engine(**batch["inputs"]), batch)
                self.engine.backward(loss)  # scales by 1 / accumulation
                total += loss.detach()
            return total / len(batches)
        return self._pipeline(batches, forward_only=False).mean()

    def step(self, skip: bool = False) -> bool:
        """Clip, reduce over data parallelism, update (per ZeRO stage) and zero the gradients.

        The update is skipped, leaving parameters and optimizer state exactly as they were, when ``skip`` is set
        (the caller's decision, the same on every rank) or the global gradient norm is not finite (the same on
        every rank: it is reduced over all of them); gradients are reduced and cleared either way, so every ZeRO
        stage's buffers start the next step empty. Returns whether the update was applied.
        """
        if self.pipelined:
            self._sum_tied_embedding_grads()
            self._sum_pipeline_shared_grads()
        if self.one_replica:  # nothing to reduce, but
            for param in self.engine.module.parameters():  # unused parameters get zero gradients as DeepSpeed's
                if param.requires_grad and main_grad(param) is None:  # reduction gives them (AdamW decays them)
                    param.grad = torch.zeros_like(param)
        elif self.pipelined:
            self.engine.allreduce_gradients()  # DeepSpeed's backward does this itself when it runs backward
        self._skip_update = skip
        try:
            self.engine.step()
        finally:
            self._skip_update = False
        # A skipped update reports an inf (DeepSpeed's ZeRO and bf16 optimizers) or NaN (ZeRO-0 fp32) norm.
        return not skip and math.isfinite(self.grad_norm())

    def _gate_optimizer_step(self) -> None:
        """Put a gate in front of the torch optimizer that every layout's update ends in (ZeRO-0 fp32 steps it on
        the parameters; ZeRO-0 bf16 on the fp32 masters, ZeRO-1/2/3 on their fp32 partitions, then copy those back
        into the parameters, unchanged if the step did nothing). DeepSpeed's ZeRO and bf16 optimizers already skip a
        step whose norm is not finite (their overflow path: no update, gradient buffers cleared) but ZeRO-0 in
        fp32 does not, and none can skip on the caller's word; the gate does both, where every path passes."""
        basic = self.engine.basic_optimizer
        update = basic.step

        def gated_step(*args, **kwargs):
            # The global norm was computed before this call: by grads.record_fp32_grad_norm (ZeRO-0 fp32) or by
            # the optimizer wrapping `basic` (its _global_grad_norm; grads.py's step in ZeRO-0 bf16), on every
            # rank alike.
            wrapper = self.engine.optimizer
            norm = getattr(wrapper, "_global_grad_norm", None) if wrapper is not basic \
                else self.engine._global_grad_norm
            if self._skip_update or (norm is not None and not math.isfinite(float(norm))):
                return None
            return update(*args, **kwargs)

        basic.step = gated_step

    @property
    def eval_group(self) -> int:
        """Micro-batches to evaluate per call: the interleaved schedule needs at least one per pipeline stage."""
        vpp = parallel_state.get_virtual_pipeline_model_parallel_world_size()
        return parallel_state.get_pipeline_model_parallel_world_size() if vpp and vpp > 1 else 1

    @torch.no_grad()
    def losses(self, batches: list[dict[str, Any]]) -> torch.Tensor:
        """Forward-only loss of each micro-batch (evaluation), [len(batches)], on every rank."""
        if not self.pipelined:
            return torch.stack([self.loss_fn(self.engine(**b["inputs"]), b) for b in batches])
        n = len(batches)  # a short last group is padded with its last batch to the schedule's minimum
        return self._pipeline(batches + batches[-1:] * (self.eval_group - n), forward_only=True)[:n]

    def _pipeline(self, batches: list[dict[str, Any]], forward_only: bool) -> torch.Tensor:
        """Each micro-batch's loss [len(batches)] through megatron-core's schedule, on every rank."""
        from megatron.core.pipeline_parallel import get_forward_backward_func

        def forward_step(data_iterator, chunk):
            batch = next(data_iterator)  # every stage reads the batch: the first its tokens, the last its labels

            def loss(output):
                value = self.loss_fn(output, batch)
                return value, {"loss": value.detach().clone()}  # the schedule divides `value` in place

            return chunk(**batch["inputs"]), loss

        out = get_forward_backward_func()(
            forward_step_func=forward_step, data_iterator=[iter(batches) for _ in self.chunks],
            model=self.chunks, num_microbatches=len(batches), seq_length=self.seq_length,
            micro_batch_size=self.micro_batch_size, forward_only=forward_only)
        # The last stage holds the losses; the other stages get them from it.
        losses = torch.stack([o["loss"] for o in out]) if out else torch.zeros(len(batches),
                                                                               device=self.engine.device)
        dist.broadcast(losses, src=parallel_state.get_pipeline_model_parallel_last_rank(),
                       group=parallel_state.get_pipeline_model_parallel_group())
        return losses

    def memory_state(self) -> list[Any]:
        """State carried from step to step that is not a parameter (Transformer-XL's segment memory), one entry
        per chunk (None for chunks without); saved with this rank's train state in every checkpoint."""
        return [chunk.memory_state_dict() if hasattr(chunk, "memory_state_dict") else None for chunk in self.chunks]

    def load_memory_state(self, states: list[Any]) -> None:
        """Restore what :meth:`memory_state` returned."""
        for chunk, state in zip(self.chunks, states):
            if state is not None:
                chunk.load_memory_state_dict(state)

    def _sum_pipeline_shared_grads(self) -> None:
        """Every pipeline chunk holds its own copy of a ``pipeline_shared`` parameter: sum the copies' gradients
        over this rank's chunks and the pipeline group, so all copies take the same step and stay equal."""
        copies = [_pipeline_shared(chunk) for chunk in self.chunks]
        for params in zip(*copies):  # the same parameter in each chunk (chunks are built alike)
            if main_grad(params[0]) is None:
                continue
            total = torch.stack([main_grad(p) for p in params]).sum(0)
            dist.all_reduce(total, group=parallel_state.get_pipeline_model_parallel_group())
            for p in params:
                main_grad(p).copy_(total)

    def _sum_tied_embedding_grads(self) -> None:
        group = parallel_state.get_embedding_group(check_initialized=False)
        if group is None or dist.get_rank() not in dist.get_process_group_ranks(group):
            return
        first = parallel_state.is_pipeline_first_stage(ignore_virtual=True)
        chunk = self.chunks[0] if first else self.chunks[-1]
        if getattr(chunk, "share_embeddings_and_output_weights", False):
            grad = main_grad(chunk.shared_embedding_or_output_weight())
            if grad is not None:
                dist.all_reduce(grad, group=group)
