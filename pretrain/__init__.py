"""Distributed LLM pretraining: megatron-core models under DeepSpeed ZeRO, fed by resumable WebDataset shards.

Start reading at ``pretrain/train.py``; the command line is ``pretrain/cli.py``.
"""

import importlib
import importlib.util
import sys
import types

__version__ = "0.1.0"


class _DeferredModule(types.ModuleType):
    """Stands in ``sys.modules`` for an installed module until something reads one of its attributes; then the
    real module is imported in its place, and the stand-in forwards to it (for whoever kept the stand-in)."""

    def __init__(self, spec):
        super().__init__(spec.name)
        self.__spec__ = spec  # what an `import` statement reads of a module already in sys.modules
        self.__file__ = spec.origin  # what inspect.getmodule reads of every module in sys.modules

    def __getattr__(self, name: str):
        if name.startswith("__") and name not in ("__path__", "__version__", "__all__"):
            # hasattr probes of tools that scan sys.modules (inspect, warnings, pickle) must not load it
            raise AttributeError(name)
        real = sys.modules.get(self.__name__)
        if real is None or real is self:
            del sys.modules[self.__name__]
            real = importlib.import_module(self.__name__)
        return getattr(real, name)


def _defer_import(name: str) -> None:
    """Make ``import NAME`` cost nothing until NAME is used.

    For wandb: megatron-core imports it at import time wherever it is installed (megatron.core.inference's
    dynamic context, megatron.core.timers) and uses it only when asked to log there; the import costs every rank
    ~0.6 s of CPU at start-up. Our W&B sink (pretrain/metrics/sinks.py) calls ``wandb.init`` and so loads it."""
    if name in sys.modules:
        return
    try:
        spec = importlib.util.find_spec(name)
    except (ImportError, ValueError):
        return
    if spec is not None:
        sys.modules[name] = _DeferredModule(spec)


_defer_import("wandb")
