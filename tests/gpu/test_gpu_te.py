"""CUDA: the layer spec chosen on a GPU, and Transformer Engine checkpoints read with megatron-core's local layers.

The CPU side of the same contract is tests/unit/test_layer_spec.py (megatron-core's TE spec with CPU stand-ins).
"""

from __future__ import annotations

import importlib.util

import pytest
import torch

from tests.conftest import TINY_CONFIG, data_overrides, read_metrics, run_cli, value_after

pytestmark = [pytest.mark.gpu,
              pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")]

HAVE_TE = importlib.util.find_spec("transformer_engine") is not None
STEPS = 30
TRAIN = ["--train.log_every=1", f"--train.eval_every={STEPS}", "--train.eval_batches=4", f"--train.steps={STEPS}",
         f"--checkpoint.every_steps={STEPS}"]


def test_auto_spec_on_cuda_is_te_when_it_imports_else_local_with_the_reason(shakespeare, tmp_path):
    result = run_cli("train", str(TINY_CONFIG), "--train.steps=3", "--checkpoint.every_steps=0",
                     *data_overrides(shakespeare, tmp_path))
    assert result.returncode == 0, result.stderr[-3000:]
    if HAVE_TE:
        assert "GPT layers: transformer_engine spec" in result.stderr
    else:
        assert "GPT layers: local spec (Transformer Engine unusable" in result.stderr


@pytest.mark.skipif(not HAVE_TE, reason="Transformer Engine is not installed")
def test_te_checkpoint_evaluates_with_local_layers_and_continues_in_them(shakespeare, tmp_path):
    run_dir = tmp_path / "te"
    result = run_cli("train", str(TINY_CONFIG), "--model.layer_spec=transformer_engine", *TRAIN,
                     *data_overrides(shakespeare, run_dir))
    assert result.returncode == 0, result.stderr[-3000:]
    trained_val = read_metrics(run_dir)[STEPS]["val_loss"]

    # The same checkpoint on CPU: local layers, fp32 (the checkpoint's precision is auto).
    cpu = run_cli("eval", "--checkpoint", str(run_dir), "--max-batches", "4", env={"CUDA_VISIBLE_DEVICES": ""})
    assert cpu.returncode == 0, cpu.stderr[-3000:]
    # bf16 training-time evaluation vs fp32 evaluation of the same weights: within 2% (bf16 keeps 8 bits of
    # mantissa; averaged over 4 batches the loss moves by well under 1% in practice).
    assert value_after(cpu.stdout, "val loss") == pytest.approx(trained_val, rel=0.02)

    # Continue on the GPU with local layers: loaded by name (resharding), training goes on.
    more = run_cli("train", str(TINY_CONFIG), "--model.layer_spec=local", *TRAIN[:-2],
                   f"--train.steps={STEPS + 5}", "--checkpoint.every_steps=0", *data_overrides(shakespeare, run_dir))
    assert more.returncode == 0, more.stderr[-3000:]
    assert "layer_spec transformer_engine->local" in more.stdout + more.stderr
    assert read_metrics(run_dir)[STEPS + 5]["loss"] < read_metrics(run_dir)[1]["loss"]
