"""The one DeepSpeed adapter: ZeRO config generated from ours, and the engine built around our model.

The trainer talks to the returned engine through DeepSpeed's engine API (backward, step, grad norm); it never
branches on the ZeRO stage.
"""

from __future__ import annotations

import hashlib
import logging

import deepspeed
import torch
import torch.distributed as dist
from megatron.core import parallel_state

from pretrain.config import Config
from pretrain.optim import build_optimizer
from pretrain.parallel.dims import DeepSpeedMpu, ParallelDims


def deepspeed_config(cfg: Config, dims: ParallelDims, dtype: torch.dtype) -> dict:
    """DeepSpeed's JSON config, generated from ours so there is one source of truth for batch sizes and ZeRO."""
    t = cfg.train
    accumulation = dims.grad_accumulation_steps(t.micro_batch_size, t.global_batch_size)
    on_cuda = torch.cuda.is_available()
    return {
        "train_micro_batch_size_per_gpu": t.micro_batch_size,
        "gradient_accumulation_steps": accumulation,
        "train_batch_size": t.micro_batch_size * accumulation * dims.data,
        # DeepSpeed computes the gradient norm only while clipping; a bound no gradient reaches keeps the norm
        # reported when clipping is off.
        "gradient_clipping": cfg.optim.clip_grad or 1e12,
        "bf16": {"enabled": dtype == torch.bfloat16},
        "zero_optimization": {
            "stage": cfg.parallel.zero_stage,
            "contiguous_gradients": True,
            # Overlapping reduction with backward needs CUDA streams; on CPU it only adds copies.
            "overlap_comm": on_cuda,
        },
        # Our AdamW is a plain torch optimizer; DeepSpeed calls any optimizer it did not build "untested".
        "zero_allow_untested_optimizer": True,
        "steps_per_print": 2**31 - 1,  # we log ourselves
        "wall_clock_breakdown": False,
    }


def build_engine(model: torch.nn.Module, cfg: Config, dims: ParallelDims, dtype: torch.dtype):
    """Wrap ``model`` in a DeepSpeed engine with our AdamW. Returns the engine (``engine.module`` is the model)."""
    logging.getLogger("DeepSpeed").setLevel(logging.WARNING)
    engine, *_ = deepspeed.initialize(
        model=model,
        optimizer=build_optimizer(model, cfg.optim),
        config=deepspeed_config(cfg, dims, dtype),
        mpu=DeepSpeedMpu(),
        dist_init_required=False,
    )
    _record_fp32_grad_norm(engine)
    return engine


def _record_fp32_grad_norm(engine) -> None:
    """Make ``get_global_grad_norm()`` answer in the one case DeepSpeed forgets: ZeRO-0 with fp32 parameters.

    There DeepSpeed clips through ``clip_fp32_gradients`` and drops the norm it computed; every other path (ZeRO
    optimizers, bf16 optimizer) stores it. Same computation, the result is kept.
    """
    from deepspeed.runtime.utils import clip_grad_norm_

    def clip_and_record():
        norm = clip_grad_norm_(parameters=engine.module.parameters(), max_norm=engine.gradient_clipping(),
                               mpu=engine.mpu)
        engine._global_grad_norm = float(norm)

    engine.clip_fp32_gradients = clip_and_record


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
