"""The one place that knows CPU from CUDA.

Production runs on CUDA + NCCL; tests, CI and the demo run the *same* code on CPU + gloo. megatron-core and
DeepSpeed are GPU-first and reach for CUDA in a few places that have nothing to do with the math. Each such place
gets a :class:`Shim` below, listed with the library function it replaces and why. Shims are applied only when
CUDA is absent, and each one is covered by a test (tests/unit/test_device_shims.py) that fails without it.

Nothing here changes numerics: every shim swaps *where* a buffer or an RNG state lives, never what is computed.
"""

from __future__ import annotations

import contextlib
import functools
import importlib
import logging
import os
from dataclasses import dataclass
from typing import Callable

import torch

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class DeviceInfo:
    """What this process trains on: torch device, process-group backend and compute dtype."""

    device: torch.device
    backend: str  # "nccl" on CUDA, "gloo" on CPU
    dtype: torch.dtype  # train.precision resolved by choose_dtype (auto: bf16 on GPUs that have it, else fp32)

    @property
    def is_cuda(self) -> bool:
        return self.device.type == "cuda"

    @property
    def name(self) -> str | None:
        """The GPU's name (e.g. for its peak FLOP/s in the MFU metric); None on CPU."""
        return torch.cuda.get_device_name(self.device) if self.is_cuda else None


def cuda_available() -> bool:
    """Whether this process runs on CUDA. The rest of the code asks here (or takes a ``DeviceInfo``) instead of
    calling ``torch.cuda.is_available()`` itself, so that the CPU/GPU decisions can be listed and tested."""
    return torch.cuda.is_available()


def choose_dtype(precision: str, on_cuda: bool, bf16_supported: bool, device_name: str = "") -> torch.dtype:
    """The compute dtype for ``train.precision`` on this device.

    ``auto``: bf16 on a GPU that has it (Ampere and newer), fp32 on one that does not (V100, T4: their bf16 is
    emulated, many times slower, and DeepSpeed's fp16 path with loss scaling is not one this engine runs) and on
    CPU (bf16 matmuls are slow there); the fallback is logged. ``bf16`` on a GPU without bf16 is refused with a
    one-line ConfigError; ``fp32`` and ``bf16`` are otherwise taken as asked (CPU bf16 works: the test tier).
    """
    from pretrain.errors import ConfigError

    if precision not in ("auto", "fp32", "bf16"):
        raise ConfigError(f"train.precision: expected auto, fp32 or bf16, got {precision!r}")
    if on_cuda and not bf16_supported:
        if precision == "bf16":
            raise ConfigError(f"train.precision: bf16 requested, but {device_name or 'this GPU'} has no bf16 "
                              "support; use fp32 (or auto)")
        if precision == "auto":
            logger.warning("train.precision=auto: %s has no bf16 support; training in fp32",
                           device_name or "this GPU")
            return torch.float32
    if precision == "auto":
        return torch.bfloat16 if on_cuda else torch.float32
    return {"fp32": torch.float32, "bf16": torch.bfloat16}[precision]


def detect(local_rank: int = 0, precision: str = "auto") -> DeviceInfo:
    """Pick device, backend and dtype for this process (dtype: :func:`choose_dtype`)."""
    if cuda_available():
        torch.cuda.set_device(local_rank % torch.cuda.device_count())
        device, backend = torch.device("cuda", torch.cuda.current_device()), "nccl"
        dtype = choose_dtype(precision, True, torch.cuda.is_bf16_supported(), torch.cuda.get_device_name(device))
    else:
        device, backend = torch.device("cpu"), "gloo"
        dtype = choose_dtype(precision, False, True)
    return DeviceInfo(device=device, backend=backend, dtype=dtype)


# ----------------------------------------------------------------------------------------------------------------
# The shims. Each `install()` patches one thing and returns a function that undoes it.
# ----------------------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Shim:
    """One CPU stand-in for a CUDA-only call in a GPU-first library."""

    name: str
    replaces: str  # the dotted name of what is replaced
    why: str
    install: Callable[[], Callable[[], None]]


def _patch(obj, attr: str, value) -> Callable[[], None]:
    old = getattr(obj, attr)
    setattr(obj, attr, value)
    return lambda: setattr(obj, attr, old)


def _install_current_device() -> Callable[[], None]:
    # mcore allocates communication buffers with `device=torch.cuda.current_device()` (tensor-parallel gathers and
    # reduce-scatters in tensor_parallel/mappings.py, GlobalMemoryBuffer in utils.py). On CPU torch that call
    # raises; "cpu" is the device those buffers belong on.
    return _patch(torch.cuda, "current_device", lambda: torch.device("cpu"))


def _cpu_rng_tracker_class():
    from megatron.core.tensor_parallel import random as mcore_random

    class CpuRNGStatesTracker(mcore_random.CudaRNGStatesTracker):
        """mcore's RNG tracker with the CPU generator standing in for the CUDA one.

        Tensor-parallel dropout must draw different masks on each TP rank (and identical ones across DP), so mcore
        keeps named generator states and swaps them in with ``fork()``. On CPU the generator that dropout uses is
        the default CPU generator, so that is the one whose state is swapped.
        """

        def add(self, name, seed):
            if seed in self.seeds_:
                raise Exception(f"seed {seed} already exists")
            if name in self.states_:
                raise Exception(f"rng state {name} already exists")
            self._is_initialized = True
            self.seeds_.add(seed)
            self.states_[name] = torch.Generator().manual_seed(seed).get_state()

        @contextlib.contextmanager
        def fork(self, name=mcore_random._MODEL_PARALLEL_RNG_TRACKER_NAME):
            if name not in self.states_:
                raise Exception(f"rng state {name} is not added")
            outer_state, outer_name = torch.get_rng_state(), self._current_state_name
            torch.set_rng_state(self.states_[name])
            self._current_state_name = name
            try:
                yield
            finally:
                self.states_[name] = torch.get_rng_state()
                torch.set_rng_state(outer_state)
                self._current_state_name = outer_name

    return CpuRNGStatesTracker


def _install_rng_tracker() -> Callable[[], None]:
    # `model_parallel_cuda_manual_seed` creates `CudaRNGStatesTracker`, whose add()/fork() call
    # torch.cuda.get_rng_state/manual_seed. Every attention layer enters fork() (even with dropout 0), so no model
    # runs without this. Replacing the class (looked up by name at tracker creation) keeps mcore's own seeding.
    from megatron.core.tensor_parallel import random as mcore_random

    undo = _patch(mcore_random, "CudaRNGStatesTracker", _cpu_rng_tracker_class())
    mcore_random.initialize_rng_tracker(force_reset=True)  # drop a CUDA tracker created before the shim

    def _undo():
        undo()
        mcore_random.initialize_rng_tracker(force_reset=True)

    return _undo


def _install_recompute_rng() -> Callable[[], None]:
    # Activation recomputation (tensor_parallel.random.CheckpointFunction) saves and restores "the CUDA RNG
    # state" around the recomputed forward so dropout masks repeat; on CPU that state is the CPU generator's.
    from megatron.core.tensor_parallel import random as mcore_random

    undo_get = _patch(mcore_random, "_get_cuda_rng_state", lambda *a, clone=False, **k: torch.get_rng_state())
    undo_set = _patch(mcore_random, "_set_cuda_rng_state", lambda state, *a, **k: torch.set_rng_state(state))
    return lambda: (undo_get(), undo_set())


def _install_deepspeed_shm_op() -> Callable[[], None]:
    # deepspeed.comm.torch.build_shm_op JIT-compiles a shared-memory all-reduce for the CPU accelerator on every
    # init_distributed (~2 min on 2 cores, and its inference_all_reduce can segfault). We all-reduce with gloo.
    # `import deepspeed.comm.torch as m` would bind deepspeed.comm's attribute `torch` (the torch package).
    ds_comm_torch = importlib.import_module("deepspeed.comm.torch")
    return _patch(ds_comm_torch, "build_shm_op", lambda: None)


class _CudaDeviceArgsOnCpu(torch.overrides.TorchFunctionMode):
    """Inside: `device="cuda"` arguments create CPU tensors and `Tensor.cuda()` returns the tensor itself."""

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func is torch.Tensor.cuda:
            return args[0]
        if str(kwargs.get("device", "")).startswith("cuda"):
            kwargs = {**kwargs, "device": "cpu"}
        return func(*args, **kwargs)


def _on_cpu(fn: Callable) -> Callable:
    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        with _CudaDeviceArgsOnCpu():
            return fn(*args, **kwargs)

    return wrapper


def _install_cuda_device_args() -> Callable[[], None]:
    # mcore's pipeline schedules create their token counter with a literal device="cuda" (schedules.py), and a
    # last pipeline stage copies the tied word embedding with `weight.data.cuda()` before syncing it with the
    # first stage (language_module.py). Only these entry points run under the rewriting mode: it costs a Python
    # call per torch op inside them, so it is not installed process-wide.
    from megatron.core.models.common.language_module import language_module
    from megatron.core.pipeline_parallel import schedules

    undo = [_patch(schedules, name, _on_cpu(getattr(schedules, name)))
            for name in ("forward_backward_no_pipelining", "forward_backward_pipelining_without_interleaving",
                         "forward_backward_pipelining_with_interleaving")]
    module = language_module.LanguageModule
    undo.append(_patch(module, "setup_embeddings_and_output_layer", _on_cpu(module.setup_embeddings_and_output_layer)))
    return lambda: [u() for u in undo]


def _install_lazy_torch_compile() -> Callable[[], None]:
    # megatron-core decorates its fusion kernels with `torch.compile` at import (jit_fuser in megatron/core/jit.py),
    # and the decoration alone imports torch._dynamo and torch._inductor: ~1.5 s of every process start that
    # imports megatron-core, the largest share of a test run's CPU time. On CPU those fused kernels are off
    # (bias_activation_fusion, bias_dropout_fusion: CUDA only), so they would be compiled for nothing; with this
    # shim a decorated function compiles on its first call instead. Install before megatron-core is imported (the
    # CLI does, for every command that builds a model); decorations made earlier stay as they were.
    compile_now = torch.compile

    def compile_on_first_call(model=None, **kwargs):
        if model is None:  # used as @torch.compile(...) with options
            return lambda fn: compile_on_first_call(fn, **kwargs)
        compiled = None

        @functools.wraps(model)
        def call(*args, **kw):
            nonlocal compiled
            if compiled is None:
                compiled = compile_now(model, **kwargs)
            return compiled(*args, **kw)

        return call

    return _patch(torch, "compile", compile_on_first_call)


SHIMS: tuple[Shim, ...] = (
    Shim("lazy_torch_compile", "torch.compile (megatron.core.jit.jit_fuser, applied at import)",
         "decorating megatron-core's fusion kernels imports torch._dynamo/_inductor (~1.5 s per process); on CPU "
         "those kernels are off, so compile on first call", _install_lazy_torch_compile),
    Shim("current_device", "torch.cuda.current_device (called by megatron.core.tensor_parallel.mappings, utils)",
         "mcore allocates TP communication buffers on torch.cuda.current_device()", _install_current_device),
    Shim("rng_tracker", "megatron.core.tensor_parallel.random.CudaRNGStatesTracker",
         "the model-parallel RNG tracker reads and seeds CUDA generator states", _install_rng_tracker),
    Shim("recompute_rng", "megatron.core.tensor_parallel.random._get_cuda_rng_state/_set_cuda_rng_state",
         "activation recomputation saves/restores the CUDA RNG state", _install_recompute_rng),
    Shim("deepspeed_shm_op", "deepspeed.comm.torch.build_shm_op",
         "DeepSpeed JIT-builds a CPU shared-memory comm op on every init (~2 min, can segfault)",
         _install_deepspeed_shm_op),
    Shim("cuda_device_args", "megatron.core.pipeline_parallel.schedules.forward_backward_*, "
         "LanguageModule.setup_embeddings_and_output_layer",
         "pipeline schedules and tied embeddings under pipelining put tensors on a literal 'cuda' device",
         _install_cuda_device_args),
)

_installed: dict[str, Callable[[], None]] = {}


# Shims that must be in place before megatron-core is first imported and import nothing heavy themselves: the CLI
# installs these for every model-building command, so a `--dry-run` still loads neither DeepSpeed nor a model.
IMPORT_TIME_SHIMS = ("lazy_torch_compile",)


def apply_cpu_shims(exclude: tuple[str, ...] = (), only: tuple[str, ...] | None = None) -> list[str]:
    """Install every shim not in ``exclude`` (only those in ``only`` when given); no-op when CUDA is available.
    Idempotent. Returns the installed names."""
    if cuda_available():
        return []
    # DeepSpeed picks its accelerator at import; without this it probes for CUDA and warns on every rank.
    os.environ.setdefault("DS_ACCELERATOR", "cpu")
    for shim in SHIMS:
        if shim.name not in exclude and shim.name not in _installed and (only is None or shim.name in only):
            _installed[shim.name] = shim.install()
    return sorted(_installed)


def remove_cpu_shims(names: tuple[str, ...] | None = None) -> None:
    """Undo installed shims (all when ``names`` is None). Used by the tests that prove each shim is needed."""
    names = list(_installed) if names is None else names
    unknown = [n for n in names if n not in _installed]
    if unknown:
        raise ValueError(f"shims not installed: {', '.join(unknown)} (installed: {', '.join(sorted(_installed))})")
    for name in names:
        _installed.pop(name)()
