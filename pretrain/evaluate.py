"""Validation loss and perplexity over a fixed-order validation reader."""

from __future__ import annotations

import math
from typing import Any

import torch
import torch.distributed as dist
from megatron.core import parallel_state

from pretrain.models import BatchFn, ModelSpec


@torch.no_grad()
def evaluate(model, spec: ModelSpec, batch_fn: BatchFn, reader, device: torch.device,
             max_batches: int = 0) -> dict[str, Any]:
    """Token-weighted mean loss over ``reader`` (one pass; ``max_batches`` > 0 caps it), summed over DP ranks.

    Returns ``{"loss", "ppl", "tokens"}``. ``model`` may be the DeepSpeed engine (ZeRO-3 gathers parameters in its
    forward) or a bare module.
    """
    was_training = model.training
    model.eval()
    totals = torch.zeros(2, dtype=torch.float64, device=device)  # [sum of token losses, tokens]
    for i, rows in enumerate(reader):
        if max_batches and i >= max_batches:
            break
        batch = batch_fn(rows, reader.last_indices, device)
        loss = spec.loss_fn(model(**batch["inputs"]), batch)
        tokens = batch["loss_mask"].sum()
        totals += torch.stack([loss.double() * tokens, tokens.double()])
    if dist.is_initialized():
        dist.all_reduce(totals, group=parallel_state.get_data_parallel_group())
    model.train(was_training)
    loss = (totals[0] / totals[1].clamp(min=1)).item()
    return {"loss": loss, "ppl": math.exp(min(loss, 50.0)), "tokens": int(totals[1].item())}
