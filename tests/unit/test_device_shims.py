"""Every CPU shim in pretrain.device is needed: the operation it serves works with it and fails without it.

Each test removes exactly one shim (``remove_cpu_shims((name,))``), shows the failure, and reinstalls it in a
``finally`` so later tests see the normal state. The shims matter only without CUDA; on a GPU machine they are
not installed and these tests skip.
"""

from __future__ import annotations

import contextlib
import importlib

import numpy as np
import pytest
import torch

from pretrain import device
from pretrain.config import ModelConfig, ParallelConfig

pytestmark = pytest.mark.skipif(torch.cuda.is_available(), reason="CPU shims are not installed when CUDA exists")

CPU = torch.device("cpu")
VOCAB = 128


@contextlib.contextmanager
def without(name: str):
    """Remove one shim for the duration of the block, then put every shim back."""
    assert name in device.apply_cpu_shims()
    device.remove_cpu_shims((name,))
    try:
        assert name not in device.apply_cpu_shims(exclude=(name,))
        yield
    finally:
        device.apply_cpu_shims()


def reseed(seed: int = 0) -> None:
    from megatron.core.tensor_parallel.random import model_parallel_cuda_manual_seed

    torch.manual_seed(seed)
    model_parallel_cuda_manual_seed(seed)


def tiny_gpt(parallel: ParallelConfig = ParallelConfig(), **model_kw):
    from pretrain.models import gpt

    torch.manual_seed(0)
    cfg = ModelConfig(**{"num_layers": 1, "hidden_size": 32, "num_attention_heads": 2, "seq_length": 16,
                         **model_kw})
    return gpt.build(cfg, parallel, torch.float32, VOCAB)


def forward_backward(model) -> float:
    """One training forward + backward on a fixed batch; returns the loss."""
    from pretrain.models import gpt

    rows = np.random.default_rng(0).integers(0, VOCAB, size=(2, 17), dtype=np.int64)
    batch = gpt.batch_fn(rows, CPU)
    loss = gpt.loss_fn(model(**batch["inputs"]), batch)
    loss.backward()
    return loss.item()


def grads(model) -> dict[str, torch.Tensor]:
    return {n: p.grad.clone() for n, p in model.named_parameters()}


@pytest.fixture(autouse=True)
def _world(mcore_world1):
    yield
    # Whatever a test did, leave every shim installed and the RNG tracker seeded for the next one.
    device.apply_cpu_shims()
    reseed(0)


# ---------------------------------------------------------------------------------------------------------------
# The list itself
# ---------------------------------------------------------------------------------------------------------------

# name -> the test below that proves it is needed. A new shim without a test here fails test_every_shim_is_tested.
PROVEN_BY = {
    "current_device": "test_current_device_is_needed",
    "rng_tracker": "test_rng_tracker_is_needed",
    "recompute_rng": "test_recompute_rng_is_needed",
    "deepspeed_shm_op": "test_deepspeed_shm_op_is_needed",
    "cuda_device_args": "test_cuda_device_args_is_needed",
    "lazy_torch_compile": "test_lazy_torch_compile_is_needed",
}


def test_every_shim_is_listed_documented_and_tested():
    names = [s.name for s in device.SHIMS]
    assert len(names) == len(set(names))
    assert set(names) == set(PROVEN_BY)
    for shim in device.SHIMS:
        assert shim.replaces.strip() and shim.why.strip() and callable(shim.install)
        assert PROVEN_BY[shim.name] in globals()
    assert device.apply_cpu_shims() == sorted(names)


def test_apply_is_idempotent():
    patched = torch.cuda.current_device
    assert device.apply_cpu_shims() == device.apply_cpu_shims()
    assert torch.cuda.current_device is patched  # not wrapped twice
    assert torch.cuda.current_device() == CPU


def test_exclude_and_remove_restore_the_original():
    from megatron.core.tensor_parallel import random as mcore_random

    patched = mcore_random._get_cuda_rng_state
    with without("recompute_rng"):
        assert mcore_random._get_cuda_rng_state is not patched
        assert mcore_random._get_cuda_rng_state.__module__ == "megatron.core.tensor_parallel.random"
    assert mcore_random._get_cuda_rng_state is not None
    assert mcore_random._get_cuda_rng_state().equal(torch.get_rng_state())  # the shim is back


def test_detect_on_cpu():
    info = device.detect(precision="auto")
    assert (info.device, info.backend, info.dtype, info.is_cuda) == (CPU, "gloo", torch.float32, False)
    assert device.detect(precision="bf16").dtype == torch.bfloat16
    assert device.detect(precision="fp32").dtype == torch.float32


@pytest.mark.parametrize("precision, on_cuda, bf16, expected", [
    ("auto", True, True, torch.bfloat16),   # A100, H100, H200
    ("auto", True, False, torch.float32),   # V100, T4: no bf16 -> fp32, logged
    ("fp32", True, False, torch.float32),
    ("auto", False, True, torch.float32),   # CPU
    ("bf16", False, True, torch.bfloat16),  # CPU bf16: the test tier for the production dtype
])
def test_precision_is_what_the_device_can_do(precision, on_cuda, bf16, expected, caplog):
    with caplog.at_level("WARNING", logger="pretrain.device"):
        assert device.choose_dtype(precision, on_cuda, bf16, "Tesla V100-SXM2-32GB") == expected
    assert ("no bf16 support; training in fp32" in caplog.text) == (on_cuda and not bf16 and precision == "auto")


def test_bf16_on_a_gpu_without_it_is_a_one_line_error():
    from pretrain.errors import ConfigError

    with pytest.raises(ConfigError, match=r"^train.precision: bf16 requested, but Tesla T4 has no bf16 support"):
        device.choose_dtype("bf16", True, False, "Tesla T4")


# ---------------------------------------------------------------------------------------------------------------
# One test per shim
# ---------------------------------------------------------------------------------------------------------------


def test_current_device_is_needed():
    """mcore allocates buffers on torch.cuda.current_device(): the global memory buffer (sequence-parallel and
    TP all-gathers) and RoPE's inverse frequencies, moved there on every forward.

    Note: a learned-absolute GPT at TP=1 happens not to reach current_device(); RoPE does, so it is the model here.
    """
    from megatron.core.utils import GlobalMemoryBuffer

    assert torch.cuda.current_device() == CPU
    assert GlobalMemoryBuffer().get_tensor((2, 3), torch.float32, "t").device == CPU
    loss = forward_backward(tiny_gpt(position_embedding="rope"))
    assert math_close(loss, np.log(VOCAB), 0.3)

    # RotaryEmbedding.forward is lru_cached per sequence length, so the model must not have run before.
    fresh = tiny_gpt(position_embedding="rope")
    with without("current_device"):
        with pytest.raises((AssertionError, RuntimeError), match="CUDA"):
            torch.cuda.current_device()
        with pytest.raises((AssertionError, RuntimeError), match="CUDA"):
            GlobalMemoryBuffer().get_tensor((2, 3), torch.float32, "t")
        with pytest.raises((AssertionError, RuntimeError), match="CUDA"):
            forward_backward(fresh)

    assert forward_backward(tiny_gpt(position_embedding="rope")) == pytest.approx(loss)  # works once reinstalled


def test_rng_tracker_is_needed():
    """Attention always enters the model-parallel tracker's fork(); mcore's tracker reads CUDA generator states."""
    from megatron.core.tensor_parallel import random as mcore_random

    assert type(mcore_random.get_cuda_rng_tracker()).__name__ == "CpuRNGStatesTracker"
    model = tiny_gpt()
    loss = forward_backward(model)
    assert math_close(loss, np.log(VOCAB), 0.3)
    model.zero_grad(set_to_none=True)

    with without("rng_tracker"):
        assert type(mcore_random.get_cuda_rng_tracker()) is mcore_random.CudaRNGStatesTracker
        # Seeding the model-parallel streams needs the CUDA generator ...
        with pytest.raises((AssertionError, RuntimeError), match="CUDA"):
            mcore_random.model_parallel_cuda_manual_seed(0)
        # ... and so no model can run forward: its attention forks a stream that could not be created.
        with pytest.raises(Exception, match="rng state|CUDA"):
            forward_backward(model)

    reseed(0)
    assert type(mcore_random.get_cuda_rng_tracker()).__name__ == "CpuRNGStatesTracker"
    assert forward_backward(model) == pytest.approx(loss)


def test_recompute_rng_is_needed():
    """Full activation recomputation saves and restores "the CUDA RNG state" around each recomputed layer."""
    model = tiny_gpt(ParallelConfig(activation_checkpointing="full"))
    assert model.decoder.config.recompute_granularity == "full"
    reseed(0)
    loss = forward_backward(model)
    assert math_close(loss, np.log(VOCAB), 0.3)

    with without("recompute_rng"):
        model.zero_grad(set_to_none=True)
        with pytest.raises((AssertionError, RuntimeError), match="CUDA"):
            forward_backward(model)

    model.zero_grad(set_to_none=True)
    reseed(0)
    assert forward_backward(model) == pytest.approx(loss)


def test_recompute_gives_the_same_gradients_with_dropout():
    """Numeric check of recomputation on CPU: with dropout on, recomputed layers must redraw the same masks, so loss
    and gradients equal the plain model's (same init seed, same RNG seeds). A different dropout stream differs."""
    drop = {"hidden_dropout": 0.2, "attention_dropout": 0.2}
    plain = tiny_gpt(**drop)
    recompute = tiny_gpt(ParallelConfig(activation_checkpointing="full"), **drop)
    for (n, p), (m, q) in zip(plain.named_parameters(), recompute.named_parameters()):
        assert n == m and torch.equal(p, q), n  # same init

    reseed(0)
    loss_plain = forward_backward(plain)
    reseed(0)
    loss_recompute = forward_backward(recompute)
    assert loss_recompute == pytest.approx(loss_plain, abs=1e-6)
    g_plain, g_recompute = grads(plain), grads(recompute)
    assert g_plain.keys() == g_recompute.keys()
    for name in g_plain:
        torch.testing.assert_close(g_recompute[name], g_plain[name], rtol=1e-5, atol=1e-7, msg=name)

    # The comparison is sensitive to the masks: other seeds give other dropout, so other gradients.
    plain.zero_grad(set_to_none=True)
    reseed(1)
    loss_other = forward_backward(plain)
    assert loss_other != pytest.approx(loss_plain, abs=1e-6)
    # And dropout was really on: without it the loss differs from the dropout run.
    no_drop = tiny_gpt()
    reseed(0)
    assert forward_backward(no_drop) != pytest.approx(loss_plain, abs=1e-6)


class _Sentinel(Exception):
    pass


# A fresh process (megatron-core is imported once per process): import it after the shims, all of them or all but
# lazy_torch_compile, and report whether torch.compile's machinery got loaded and what a decorated function is.
_IMPORT_AFTER_SHIMS = r"""
import sys
from pretrain import device
device.apply_cpu_shims(exclude=tuple(sys.argv[1:]))
import megatron.core.fusions.fused_bias_geglu as geglu
print("torch._dynamo" in sys.modules, "torch._inductor" in sys.modules,
      getattr(getattr(geglu.bias_geglu, "__wrapped__", None), "__name__", None))
"""


def test_lazy_torch_compile_is_needed():
    import subprocess
    import sys

    from tests.conftest import REPO, cli_env

    def loaded(*exclude: str) -> str:
        result = subprocess.run([sys.executable, "-c", _IMPORT_AFTER_SHIMS, *exclude], capture_output=True,
                                text=True, cwd=REPO, env=cli_env(), timeout=300)
        assert result.returncode == 0, result.stderr[-3000:]
        return result.stdout.split()

    assert loaded("lazy_torch_compile")[:2] == ["True", "True"]  # decorating at import loads dynamo + inductor
    # Deferred: the decorated kernel wraps the original, compiled by torch.compile on its first call, if ever.
    assert loaded() == ["False", "False", "bias_geglu"]


def test_deepspeed_shm_op_is_needed(monkeypatch):
    """DeepSpeed's init_distributed JIT-builds a shared-memory comm op on CPU (~2 min); the shim skips it."""
    import deepspeed.ops
    from deepspeed.accelerator import get_accelerator

    ds_comm_torch = importlib.import_module("deepspeed.comm.torch")
    builder = get_accelerator().create_op_builder("ShareMemCommBuilder")
    assert builder is not None
    # Without these the real function would return None without building, and the test would prove nothing.
    assert deepspeed.ops.__compatible_ops__.get(builder.NAME, False)

    calls = []

    def fake_load(self, *a, **k):
        calls.append(type(self).__name__)
        raise _Sentinel("would JIT-compile the shm comm op")

    monkeypatch.setattr(type(builder), "load", fake_load)

    assert ds_comm_torch.build_shm_op() is None
    assert calls == []

    with without("deepspeed_shm_op"):
        with pytest.raises(_Sentinel):
            ds_comm_torch.build_shm_op()
    assert calls == [type(builder).__name__]

    assert ds_comm_torch.build_shm_op() is None  # reinstalled
    assert len(calls) == 1


# ---------------------------------------------------------------------------------------------------------------
# CpuRNGStatesTracker semantics
# ---------------------------------------------------------------------------------------------------------------


def _fresh_tracker():
    from megatron.core.tensor_parallel import random as mcore_random

    tracker = type(mcore_random.get_cuda_rng_tracker())()
    assert type(tracker).__name__ == "CpuRNGStatesTracker"
    return tracker


def _mask(tracker, name) -> torch.Tensor:
    with tracker.fork(name):
        return torch.nn.functional.dropout(torch.ones(4096), p=0.5, training=True) > 0


def _schedule_step(model) -> float:
    """One forward/backward through megatron-core's schedule entry point (the one-stage variant)."""
    from megatron.core.pipeline_parallel import get_forward_backward_func

    from pretrain.models import gpt

    rows = np.random.default_rng(0).integers(0, VOCAB, size=(2, 17), dtype=np.int64)
    batch = gpt.batch_fn(rows, CPU)

    def forward_step(data_iterator, chunk):
        next(data_iterator)
        return chunk(**batch["inputs"]), lambda out: (gpt.loss_fn(out, batch), {"loss": gpt.loss_fn(out, batch)})

    out = get_forward_backward_func()(forward_step_func=forward_step, data_iterator=iter([batch]), model=[model],
                                      num_microbatches=1, seq_length=16, micro_batch_size=2)
    return float(out[0]["loss"])


def test_cuda_device_args_is_needed():
    model = tiny_gpt()
    assert _schedule_step(model) == pytest.approx(forward_backward(tiny_gpt()), rel=1e-6)
    with without("cuda_device_args"):
        with pytest.raises((AssertionError, RuntimeError), match="CUDA|cuda"):
            _schedule_step(tiny_gpt())
        weight = torch.zeros(2)
        with pytest.raises((AssertionError, RuntimeError), match="CUDA|cuda"):
            weight.cuda()  # what a tied last pipeline stage does to its output weight


def test_tracker_streams_differ_by_name_and_seed():
    tracker = _fresh_tracker()
    tracker.add("a", 1)
    tracker.add("b", 2)
    a, b = _mask(tracker, "a"), _mask(tracker, "b")
    assert not torch.equal(a, b)
    assert 0.4 < a.float().mean().item() < 0.6  # a real p=0.5 dropout mask
    # The same seed under another tracker draws the same first mask; each fork advances its stream.
    other = _fresh_tracker()
    other.add("a", 1)
    assert torch.equal(_mask(other, "a"), a)
    assert not torch.equal(_mask(other, "a"), a)


def test_tracker_fork_leaves_the_default_generator_alone():
    tracker = _fresh_tracker()
    tracker.add("a", 1)
    torch.manual_seed(123)
    expected = torch.rand(8)
    torch.manual_seed(123)
    _mask(tracker, "a")
    assert torch.equal(torch.rand(8), expected)


def test_tracker_get_set_states_reproduces_a_mask():
    tracker = _fresh_tracker()
    tracker.add("a", 7)
    _mask(tracker, "a")  # advance the stream a bit
    saved = tracker.get_states()
    first = _mask(tracker, "a")
    second = _mask(tracker, "a")
    assert not torch.equal(first, second)
    tracker.set_states(dict(saved))
    assert torch.equal(_mask(tracker, "a"), first)
    assert torch.equal(_mask(tracker, "a"), second)


def test_tracker_refuses_duplicates_and_unknown_names():
    tracker = _fresh_tracker()
    tracker.add("a", 1)
    with pytest.raises(Exception, match="seed 1 already exists"):
        tracker.add("b", 1)
    with pytest.raises(Exception, match="already exists"):
        tracker.add("a", 2)
    with pytest.raises(Exception, match="not added"):
        with tracker.fork("zzz"):
            pass


def math_close(a: float, b: float, tol: float) -> bool:
    return abs(a - b) <= tol


def test_docs_list_every_shim():
    """docs/cpu_and_gpu.md's shim table names exactly the shims device.py installs."""
    from tests.conftest import REPO

    table = (REPO / "docs" / "cpu_and_gpu.md").read_text().split("## The CPU shims", 1)[1].split("\n## ", 1)[0]
    listed = {line.split("|")[1].strip().strip("`") for line in table.splitlines()
              if line.startswith("| `")}
    assert listed == {shim.name for shim in device.SHIMS}
