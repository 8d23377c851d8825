"""Validation loss and perplexity over a fixed-order validation reader."""

from __future__ import annotations

import math
from typing import Any, Callable

import torch
import torch.distributed as dist
from megatron.core import parallel_state

from pretrain.models.spec import BatchFn


@torch.no_grad()
def evaluate(model, losses_of: Callable[[list[dict[str, Any]]], torch.Tensor], batch_fn: BatchFn, reader,
             device: torch.device, max_batches: int = 0, group: int = 1) -> dict[str, Any]:
    """Token-weighted mean loss over ``reader`` (one pass; ``max_batches`` > 0 caps it), summed over DP ranks.

    Returns ``{"loss", "ppl", "tokens"}``. ``losses_of(batches)`` gives each micro-batch's mean loss (a bare
    module's forward, or the train engine's, which runs the pipeline schedule over ``group`` micro-batches at a
    time); ``model`` is put in eval mode meanwhile.
    """
    was_training = model.training
    model.train(False)
    totals = torch.zeros(2, dtype=torch.float64, device=device)  # [sum of token losses, tokens]
    batches = []
    for i, rows in enumerate(reader):
        if max_batches and i >= max_batches:
            break
        batches.append(batch_fn(rows, reader.last_indices, device))
        if len(batches) == group:
            totals += _sums(losses_of(batches), batches)
            batches = []
    if batches:
        totals += _sums(losses_of(batches), batches)
    if dist.is_initialized():
        dist.all_reduce(totals, group=parallel_state.get_data_parallel_group())
    model.train(was_training)
    loss = (totals[0] / totals[1].clamp(min=1)).item()
    return {"loss": loss, "ppl": math.exp(min(loss, 50.0)), "tokens": int(totals[1].item())}


def _sums(losses: torch.Tensor, batches: list[dict[str, Any]]) -> torch.Tensor:
    """[token-weighted loss sum, tokens] of micro-batches with mean losses ``losses``."""
    tokens = torch.stack([b["loss_mask"].sum() for b in batches]).double()
    return torch.stack([(losses.double() * tokens).sum(), tokens.sum()])
