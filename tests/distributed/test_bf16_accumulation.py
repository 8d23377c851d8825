"""bf16 training accumulates and reduces gradients in fp32 (pretrain/parallel/grads.py).

One step's gradients (before clipping) of gpt_tiny in bf16 on the same 16 sequences, three ways in one process:

- "8 x 2": 8 micro-batches of 2, accumulated by the engine;
- "each of 8 x 2": the same 8 micro-batches, each alone (its backward, then a skipped step that clears the
  gradients), summed here in float64: exact accumulation of the very bf16 gradients "8 x 2" accumulates;
- "1 x 16": one micro-batch of 16;

and at DP=2 under ZeRO-0, ZeRO-1 and ZeRO-2 (4 micro-batches of 2 per rank, the same 8 pairs: the reader splits
each global batch into contiguous DP slices), whose two replicas' sums are all-reduced.

Each backward rounds its own gradient to bf16 once (the parameters are bf16) whatever the accumulation dtype; what
follows is what this tests. Measured, ||difference|| / ||reference|| over all gradients:

                                  fp32 accumulation (now)   bf16 accumulation (before)
  vs "each of 8 x 2" (exact sum)  3.8e-10                   2.6e-3 .. 3.1e-3
  vs "1 x 16"                     4.7e-3                    5.4e-3 .. 5.6e-3

Against the exact sum, fp32 accumulation leaves ~2^-24 per addition and bf16 rounds the running sum to 2^-9 at
each of the 7 additions: the bound 1e-5 separates them by orders of magnitude. Against "1 x 16" the runs differ by
more than accumulation: each backward's bf16 arithmetic depends on the batch shape (the CPU GEMMs block and round
differently for 2 and 16 sequences), 4.7e-3 here, which bf16 accumulation only raises in quadrature
(sqrt(4.7^2 + 2.8^2) = 5.5); so "1 x 16" is held to bf16 rounding of differently batched arithmetic, 2^-7, and the
exact sum is what tells fp32 from bf16 accumulation.

The same launch checks that a step with NaN gradients is skipped in bf16 ZeRO-0 (whose step is ours now) and ZeRO-1.
"""

from __future__ import annotations

import logging
import math

import pytest
import torch

from pretrain.testing import run_distributed
from tests.conftest import TINY_CONFIG

COMMON = ["--model.hidden_dropout=0.0", "--model.attention_dropout=0.0", "--train.precision=bf16",
          "--train.global_batch_size=16", "--checkpoint.every_steps=0", "--data.valid=", "--metrics.console=false"]
#: name -> (overrides, mode): "accumulate" one step's micro-batches, run "each" alone, or a "nan" step (below).
#: World size 1.
SINGLE = {"8 x 2": (["--train.micro_batch_size=2"], "accumulate"),
          "1 x 16": (["--train.micro_batch_size=16"], "accumulate"),
          "each of 8 x 2": (["--train.micro_batch_size=2"], "each"),
          **{f"NaN step ZeRO-{z}": ([f"--parallel.zero_stage={z}", "--train.micro_batch_size=16"], "nan")
             for z in (0, 1)}}
#: World size 2: DP=2.
DP2 = {f"DP=2 ZeRO-{z} 4 x 2": ([f"--parallel.zero_stage={z}", "--train.micro_batch_size=2"], "accumulate")
       for z in (0, 1, 2)}

logger = logging.getLogger(__name__)

#: ||a - b|| / ||b|| bounds (see the module docstring for the measured values behind them).
EXACT_BOUND = 1e-5  # against the float64 sum of the same micro-batch gradients: fp32 accumulation only
BF16_BOUND = 2**-7  # against one micro-batch of 16: bf16 rounding of differently batched arithmetic


def one_step_grads(jobs: dict[str, tuple[list[str], str]], data_args: list[str], root: str) -> dict[str, dict]:
    """In a spawned process group: each job's gradients after one step's forward/backward on the first global
    batch, reduced over data parallelism (rank 0 returns {job: {parameter name: float64 array}}); for a "nan" job,
    what a step with NaN gradients and the step after it did ({check: 0-d array})."""
    import torch.distributed as dist
    from deepspeed.utils import safe_get_full_grad
    from megatron.core import parallel_state

    from pretrain import device
    from pretrain.config import load
    from pretrain.parallel.dims import ParallelDims
    from pretrain.train import build

    def grads_now(model) -> dict[str, torch.Tensor]:
        out = {}
        for name, param in model.named_parameters():
            grad = getattr(param, "fp32_grad", None)  # bf16 ZeRO-0/1: the fp32 buffer (grads.main_grad)
            grad = safe_get_full_grad(param) if grad is None else grad  # ZeRO-2 (a collective) or .grad
            out[name] = grad.detach().double().clone()
        return out

    def nan_step(engine, batches) -> dict[str, torch.Tensor]:
        """A step whose loss (so every gradient) is NaN is skipped: parameters unchanged, gradient buffers
        cleared, a non-finite norm reported; the next step applies."""
        model = engine.engine.module
        before = {k: p.detach().clone() for k, p in model.named_parameters()}
        loss_fn = engine.loss_fn
        engine.loss_fn = lambda output, batch: loss_fn(output, batch) * float("nan")
        engine.forward_backward(batches)
        engine.loss_fn = loss_fn
        applied = engine.step()
        checks = {"applied": applied, "norm_finite": math.isfinite(engine.grad_norm()),
                  "unchanged": all(torch.equal(p, before[k]) for k, p in model.named_parameters()),
                  "grads_cleared": all(not bool(grad.any()) for grad in grads_now(model).values())}
        engine.forward_backward(batches)
        checks["next_applied"] = engine.step()
        checks["next_changed"] = not all(torch.equal(p, before[k]) for k, p in model.named_parameters())
        return {k: torch.tensor(float(v)) for k, v in checks.items()}

    results = {}
    for i, (name, (overrides, mode)) in enumerate(jobs.items()):
        cfg = load(str(TINY_CONFIG), [*data_args, f"--run.dir={root}/{dist.get_world_size()}-{i}", *COMMON,
                                      *overrides])
        trainer = build(cfg, ParallelDims.from_config(cfg, dist.get_world_size()), device.detect(0, "bf16"))
        try:
            data, engine = iter(trainer.train_data), trainer.engine
            batches = [trainer.batch_fn(next(data), trainer.train_data.last_indices, trainer.device)
                       for _ in range(trainer.accumulation)]
            if mode == "nan":
                results[name] = nan_step(engine, batches)
            elif mode == "each":
                total = None
                for batch in batches:
                    engine.forward_backward([batch])  # DeepSpeed scales by 1 / accumulation, as in "8 x 2"
                    grads = grads_now(engine.engine.module)
                    total = grads if total is None else {k: total[k] + v for k, v in grads.items()}
                    engine.step(skip=True)  # clears the gradients, leaves the parameters
                results[name] = total
            else:
                engine.forward_backward(batches)
                results[name] = grads_now(engine.engine.module)
        finally:
            trainer.watchdog.close()
            trainer.metrics.close()
            parallel_state.destroy_model_parallel()
    # numpy, not tensors: torch would pass tensors through shared memory that ends with this process
    return {job: {k: v.numpy() for k, v in g.items()} for job, g in results.items()} if dist.get_rank() == 0 else {}


@pytest.fixture(scope="module")
def grads(shakespeare, tmp_path_factory) -> dict[str, dict]:
    data_args = [f"--data.train={shakespeare['train']}", f"--data.tokenizer={shakespeare['tokenizer']}"]
    root = str(tmp_path_factory.mktemp("bf16_accumulation"))
    out = run_distributed(one_step_grads, 1, args=(SINGLE, data_args, root), timeout_s=900)[0]
    out.update(run_distributed(one_step_grads, 2, args=(DP2, data_args, root), timeout_s=900)[0])
    return {job: {k: torch.from_numpy(v) for k, v in g.items()} for job, g in out.items()}


def relative_difference(grads: dict[str, dict], name: str, reference: str) -> float:
    """||ours - ref|| / ||ref|| over every parameter's gradient together."""
    ours, ref = grads[name], grads[reference]
    assert ours.keys() == ref.keys()
    diff = sum(float((ours[k] - ref[k]).pow(2).sum()) for k in ref)
    value = (diff / sum(float(ref[k].pow(2).sum()) for k in ref)) ** 0.5
    logger.info("%s vs %s: relative difference %.3g", name, reference, value)
    return value


@pytest.mark.slow
@pytest.mark.parametrize("name", [name for name, (_, mode) in SINGLE.items() if mode == "nan"])
def test_nan_gradients_skip_the_step(grads, name):
    """ZeRO-0 (our fp32 step on DeepSpeed's masters) and ZeRO-1 (DeepSpeed's BF16_Optimizer) in bf16."""
    checks = {k: bool(v) for k, v in grads[name].items()}
    assert checks == {"applied": False, "norm_finite": False, "unchanged": True, "grads_cleared": True,
                      "next_applied": True, "next_changed": True}


@pytest.mark.slow
@pytest.mark.parametrize("name", ["8 x 2", *DP2])
def test_accumulated_micro_batches_match_one_batch_of_16(grads, name):
    assert relative_difference(grads, name, "each of 8 x 2") <= EXACT_BOUND  # fp32, not bf16, accumulation
    assert relative_difference(grads, name, "1 x 16") <= BF16_BOUND
