"""Gradients in every layout: fp32 accumulation and reduction in bf16, and a global norm that counts each gradient
element of one model replica exactly once (tensor shards, replicated parameters, the tied embedding under PP).

Why fp32 gradients in bf16 training: bf16 keeps 8 significant bits, so every addition into a bf16 buffer rounds
the running sum to a relative 2^-9; summing micro-batches or data-parallel replicas that way loses the small
contributions of a long accumulation. The low-precision gradient of one backward is rounded once (autograd
computes it in the parameter's dtype, as megatron-core without its fused wgrad accumulation does); everything
after that happens in fp32: the sum over micro-batches, the all-reduce over data parallelism, the norm, clipping
and the AdamW step on fp32 master weights.

How, per ZeRO stage (DeepSpeed 0.19.8, ``data_types.grad_accum_dtype`` and ``communication_data_type``):

- ZeRO-1: DeepSpeed's ``BF16_Optimizer``, which DeepSpeed picks for bf16 with fp32 accumulation. With
  ``immediate_grad_update`` each parameter's gradient moves into its fp32 buffer as soon as autograd has it, so
  megatron-core's pipeline schedule, which runs backward itself, accumulates in fp32 too. Its norm reads the
  low-precision parameters' attributes (``tensor_model_parallel``, ``ds_pipe_replicated``): right in every layout.
- ZeRO-2/3: DeepSpeed's ZeRO optimizers accumulate their gradient partitions in fp32 and reduce in fp32. Their
  norms count TP shards and replicated parameters right; these stages refuse pipelining (config validation).
- ZeRO-0: DeepSpeed 0.19.8 has no fp32 accumulation without ZeRO outside its own PipelineEngine
  (``_do_optimizer_sanity_check`` raises NotImplementedError), and its ``FP16_UnfusedOptimizer`` computes the norm
  on bare gradients, without the TP/PP attributes. :func:`accumulate_zero0_bf16_in_fp32` keeps that optimizer (its
  fp32 master per parameter, its checkpoint format) and moves the gradients onto the masters in fp32: a hook adds
  each bf16 gradient into its master's fp32 ``.grad`` and frees it; DeepSpeed's data-parallel all-reduce takes those
  (``get_grads_for_reduction``); the step computes the norm with :func:`clip_by_global_norm`.

Every parameter whose gradient lives elsewhere than ``.grad`` names it ``fp32_grad`` (see :func:`main_grad`), which
TrainEngine's pipeline sums (tied embedding, pipeline-shared parameters) use.

Not taken: BF16_Optimizer at ZeRO-0 too (DeepSpeed refuses it there, and it partitions the masters over DP and
writes ZeRO-1's files, which would change what a ZeRO-0 checkpoint is for resharding); fp32 parameters under
torch.autocast (changes the model's and its checkpoints' dtype and megatron-core's pipeline p2p dtype). Cost:
gradients take 4 bytes per parameter instead of 2 (pretrain/parallel/plan.py), and the data-parallel gradient
reduction sends twice the bytes (parameter all-gathers stay bf16).
"""

from __future__ import annotations

import functools
import math

import torch
import torch.distributed as dist
from megatron.core import parallel_state


def main_grad(param: torch.nn.Parameter) -> torch.Tensor | None:
    """The tensor in which ``param``'s gradient accumulates this step: its fp32 buffer in bf16 ZeRO-0/1, else
    ``.grad``."""
    fp32 = getattr(param, "fp32_grad", None)
    return param.grad if fp32 is None else fp32


def clip_by_global_norm(params_and_grads: list[tuple[torch.nn.Parameter, torch.Tensor]], max_norm: float,
                        device: torch.device) -> float:
    """Global L2 norm of one model replica's gradients (before clipping), and clip them in place to ``max_norm``.

    Counted: each tensor-parallel shard, replicated parameters on TP rank 0 only, the tied embedding once (its
    last-stage copy is marked ``ds_pipe_replicated``); summed over the TP x PP group. Gradients are reduced over
    data parallelism before this, so every DP rank computes the same norm.
    """
    tp_rank = parallel_state.get_tensor_model_parallel_rank()
    counted = [g.detach().float().norm() ** 2 for p, g in params_and_grads
               if not getattr(p, "ds_pipe_replicated", False)
               and (tp_rank == 0 or getattr(p, "tensor_model_parallel", False))]
    total = torch.stack(counted).sum() if counted else torch.zeros((), device=device)
    dist.all_reduce(total, group=parallel_state.get_model_parallel_group())
    norm = float(total.sqrt())
    coefficient = max_norm / (norm + 1e-6)  # DeepSpeed's (and Megatron's) rule
    if coefficient < 1:
        for _, g in params_and_grads:
            g.mul_(coefficient)
    return norm


def record_fp32_grad_norm(engine) -> None:
    """ZeRO-0 fp32: clip with a norm that is right under pipelining, and keep the norm.

    DeepSpeed's ``clip_fp32_gradients`` drops the norm it computes, and that norm skips replicated parameters
    (norms, biases) on every rank whose model-parallel rank is not 0, which under pipelining is every stage but the
    first.
    """
    def clip_and_record():
        pairs = [(p, p.grad) for p in engine.module.parameters() if p.grad is not None]
        engine._global_grad_norm = clip_by_global_norm(pairs, engine.gradient_clipping(), engine.device)

    engine.clip_fp32_gradients = clip_and_record


def accumulate_zero0_bf16_in_fp32(engine) -> None:
    """ZeRO-0 bf16 (DeepSpeed's FP16_UnfusedOptimizer, one fp32 master per bf16 parameter): accumulate, reduce,
    clip and step in fp32 on the masters' ``.grad`` (allocated once, zeroed after each step)."""
    wrapper = engine.optimizer
    # Its constructor steps AdamW once on zero gradients to create the state: AdamW's step count then starts at 1
    # (bias correction one step off: the first update was 0.73 x lr at beta2 0.95) and the masters take one
    # weight-decay step at the initial LR. Undo both: lazy state, as every other stage has; masters from the model.
    wrapper.optimizer.state.clear()
    wrapper.refresh_fp32_params()
    pairs = [(lp, master) for lps, masters in zip(wrapper.fp16_groups, wrapper.fp32_groups)
             for lp, master in zip(lps, masters)]
    for lp, master in pairs:
        master.grad = torch.zeros_like(master)
        lp.fp32_grad = master.grad
        lp.register_post_accumulate_grad_hook(_move_grad_into_fp32)
    # DeepSpeed's buffered all-reduce (engine.allreduce_gradients) reduces what this returns, its BF16_Optimizer's
    # hook; communication_data_type fp32 keeps them fp32 on the wire.
    wrapper.get_grads_for_reduction = lambda: ([master.grad for _, master in pairs], {})
    wrapper.step = functools.partial(_step_on_fp32_masters, engine, wrapper, pairs)


def _move_grad_into_fp32(param: torch.nn.Parameter) -> None:
    param.fp32_grad.add_(param.grad)  # [same shape], bf16 -> fp32 inside the add
    param.grad = None


@torch.no_grad()
def _step_on_fp32_masters(engine, wrapper, pairs, closure=None) -> bool:
    """FP16_UnfusedOptimizer.step with the fp32 gradients and a TP/PP-aware norm. A non-finite norm skips the
    update as DeepSpeed's overflow path does (``overflow``: the engine counts a skipped step and holds the LR)."""
    norm = clip_by_global_norm([(lp, master.grad) for lp, master in pairs], engine.gradient_clipping(),
                               engine.device)
    wrapper._global_grad_norm = norm  # read by the engine (get_global_grad_norm) and TrainEngine's gate
    wrapper.overflow = not math.isfinite(norm)
    if not wrapper.overflow:
        wrapper.optimizer.step()  # AdamW on the masters (gated by TrainEngine)
        for lp, master in pairs:
            lp.copy_(master)
    for _, master in pairs:
        master.grad.zero_()
    return wrapper.overflow


def link_bf16_optimizer_grads(engine) -> None:
    """ZeRO-1 bf16 (DeepSpeed's BF16_Optimizer): name each parameter's fp32 gradient buffer ``fp32_grad`` (a view
    of the optimizer's flat buffer, which holds every parameter's whole gradient on every DP rank), and give the
    optimizer the flat fp32 partitions under the name ZeRO-1/2's optimizer uses, which resharding
    (pretrain.checkpoint.reshard) sets through DeepSpeed's hp mapping like any ZeRO-1 partition."""
    from deepspeed.runtime.bf16_optimizer import BF16_Optimizer

    optimizer = engine.optimizer
    if not isinstance(optimizer, BF16_Optimizer):
        return
    for lps, grads in zip(optimizer.bf16_groups, optimizer.fp32_groups_gradients):
        for lp, grad in zip(lps, grads):
            lp.fp32_grad = grad.view(lp.shape)
    optimizer.single_partition_of_fp32_groups = optimizer.fp32_groups_flat_partition


def sum_sequence_parallel_grads(model: torch.nn.Module) -> None:
    """Under sequence parallelism each TP rank runs the norms (and row-parallel biases) on its own slice of the
    sequence, so their replicated parameters get partial gradients: sum them over the TP group as each one is
    computed (megatron-core leaves this to its DDP wrapper, which DeepSpeed replaces). A hook on the gradient,
    before DeepSpeed's own accumulate hooks, so every ZeRO stage partitions the summed gradient. The sum is taken
    in fp32 (a bf16 gradient is rounded once, after it)."""
    group = parallel_state.get_tensor_model_parallel_group()
    if parallel_state.get_tensor_model_parallel_world_size() == 1:
        return

    def all_reduce(grad: torch.Tensor) -> torch.Tensor:
        total = grad.float().contiguous()  # the same tensor when it is fp32 already
        dist.all_reduce(total, group=group)
        return total.to(grad.dtype)

    for param in model.parameters():
        if getattr(param, "sequence_parallel", False):
            param.register_hook(all_reduce)
