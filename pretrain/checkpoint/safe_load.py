"""Reading checkpoint files without running code from them: ``torch.load(weights_only=True)`` with an allow-list.

A ``.pt`` file is a pickle, and unpickling may call any importable function (``os.system``, ``builtins.exec``):
a downloaded checkpoint handed to ``pretrain eval``/``generate``/``finetune``/``export`` or ``checkpoint.load`` would
run whatever its author put in it. Every checkpoint file we read goes through ``load_checkpoint_file``: torch's
restricted unpickler (tensors, containers, numbers, strings) plus ``allowed_globals()``, exactly the other types that
our train state and DeepSpeed's own files hold (found by loading real checkpoints of every layout, see the list).
Anything else is refused with a one-line ``CheckpointError`` naming the file, before any of it runs.

It imports nothing of ours but the errors, so every module that reads checkpoints can use it.
"""

from __future__ import annotations

import contextlib
import pickle
import re
import sys
from pathlib import Path
from typing import Any, Iterator

import numpy as np
import torch

from pretrain.errors import CheckpointError

#: torch's own loader, also while ``safe_torch_load`` has put ours in its place.
_torch_load = torch.load


def allowed_globals() -> list[Any]:
    """The globals a checkpoint file may name beyond torch's own weights-only set (tensors, containers, numbers).

    Each entry is here because a real checkpoint of ours needs it: found with
    ``torch.serialization.get_unsafe_globals_in_checkpoint`` on every file of gpt/bert/txl checkpoints at ZeRO 0-3,
    fp32 and bf16, TP=2, PP=2 with virtual stages, sync and async saves (torch 2.13, numpy 2.4, DeepSpeed 0.19.8),
    then loading all 81 files with exactly this list (equal to an unrestricted load). Nothing is here "just in
    case", and each is a type whose unpickling only builds data."""
    try:
        from numpy._core.multiarray import _reconstruct  # numpy >= 2
    except ImportError:
        from numpy.core.multiarray import _reconstruct
    allowed: list[Any] = [
        # train_state_rank*.pt, rng.numpy: np.random.get_state() = ('MT19937', uint32 array[624], pos, has_gauss,
        # cached_gaussian); the array pickles as _reconstruct(ndarray, (0,), b'b') and a BUILD with its dtype.
        # numpy 1.x spelled the function numpy.core.multiarray._reconstruct (numpy 2 pickles numpy._core...):
        # files written under either load, matched by name to the same function.
        # The dtype's BUILD needs its class too: numpy 2 gives every dtype kind its own (numpy.dtypes.UInt32DType).
        _reconstruct, (_reconstruct, "numpy.core.multiarray._reconstruct"), np.ndarray, np.dtype,
        type(np.dtype(np.uint32)),
    ]
    if "deepspeed" not in sys.modules:
        # Importing DeepSpeed picks its accelerator once for the process, so reading a file must not be what
        # imports it. Its types are only in files that code running DeepSpeed (training, zero_to_fp32) reads.
        return allowed
    from deepspeed.runtime.fp16.loss_scaler import LossScaler
    from deepspeed.runtime.zero.config import ZeroStageEnum
    from deepspeed.utils.tensor_fragment import fragment_address

    return allowed + [
        # *zero_pp_rank_*_optim_states.pt (ZeRO 1-3, fp32 and bf16): optimizer_state_dict["zero_stage"] is this enum,
        ZeroStageEnum,
        # its "loss_scaler" the (static, scale 1) LossScaler object: plain attributes (cur_scale, dynamic, ...),
        LossScaler,
        # and (ZeRO 1/2) "param_slice_mappings": a fragment_address(numel, start) namedtuple per parameter.
        fragment_address,
    ]


@contextlib.contextmanager
def _allow_listed() -> Iterator[None]:
    # Scoped to the load, not process-wide: other torch.load calls in the process keep torch's default set.
    # Only what is not allowed already is added (and removed again), so a caller's own additions survive.
    missing = [g for g in allowed_globals() if g not in torch.serialization.get_safe_globals()]
    with torch.serialization.safe_globals(missing):
        yield


#: What torch's refusal names: the global it would import, or the class it would build.
_UNSUPPORTED = re.compile(r"GLOBAL ([\w.]+)|but got <class '([^']+)'>")


def load_checkpoint_file(path: str | Path, **kwargs: Any) -> Any:
    """``torch.load(path, weights_only=True, **kwargs)`` with ``allowed_globals()``; a file that names anything else,
    or is not a readable torch file, raises a one-line CheckpointError naming it (nothing in it has run).
    ``kwargs``: map_location, mmap; a ``weights_only`` from the caller (DeepSpeed passes False) is overridden."""
    kwargs.pop("weights_only", None)
    try:
        with _allow_listed():
            return _torch_load(path, weights_only=True, **kwargs)
    except pickle.UnpicklingError as e:
        if found := _UNSUPPORTED.search(str(e)):
            raise CheckpointError(f"{path}: refused to unpickle {found.group(1) or found.group(2)}: not a type our "
                                  "checkpoints hold (unpickling can run code; loaded weights-only with an allow-list)"
                                  ) from None
        raise CheckpointError(f"{path}: not a readable torch checkpoint file ({_detail(e)})") from None
    except (RuntimeError, EOFError, ValueError) as e:
        raise CheckpointError(f"{path}: not a readable torch checkpoint file ({_detail(e)})") from None


def _detail(error: Exception) -> str:
    """The one line of torch's multi-line load error that says what is wrong (not its advice around it)."""
    lines = [line.strip() for line in str(error).splitlines() if line.strip()]
    advice = ("Weights only load failed", "Please file an issue", "Check the documentation")
    lines = [line.removeprefix("WeightsUnpickler error:").strip() for line in lines if not line.startswith(advice)]
    return next((line for line in lines if line), type(error).__name__)


@contextlib.contextmanager
def safe_torch_load() -> Iterator[None]:
    """Within the block, ``torch.load`` is ``load_checkpoint_file``: for library code that calls ``torch.load``
    itself with ``weights_only=False`` (DeepSpeed's zero_to_fp32). Not thread-safe; use it in one-process tools."""
    def load(f, map_location=None, *_, **kwargs):  # torch.load's signature; pickle_module etc. are ignored
        kwargs = {k: v for k, v in kwargs.items() if k in ("mmap",)}
        return load_checkpoint_file(f, map_location=map_location, **kwargs)

    original, torch.load = torch.load, load
    try:
        yield
    finally:
        torch.load = original
