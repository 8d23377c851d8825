"""Optional sinks people already use: TensorBoard event files (``metrics.tensorboard``) and Weights & Biases
(``metrics.wandb.enabled``). Rank 0 only (MetricsLogger builds them on the writer rank), optional dependencies (the
``tensorboard`` and ``wandb`` extras), never fatal: a sink that cannot start or fails while logging warns once and
the run goes on without it (``Guarded``).

Each logged record becomes scalars at its step: numbers as they are (``loss``, ``lr``, ...), dicts and lists
flattened with a slash (``goodput_s/productive``, ``data_fractions/0``).
"""

from __future__ import annotations

import hashlib
import logging
import math
from pathlib import Path
from typing import Any, Callable, Iterator

from pretrain.metrics import names

logger = logging.getLogger(__name__)

TENSORBOARD_DIR = "tensorboard"  # under the run directory
WANDB_DIR = "wandb"  # under the run directory; W&B writes its run folders below it


def scalars(record: dict[str, Any]) -> Iterator[tuple[str, float]]:
    """(tag, value) for every number in ``record`` except the step, nested dicts and lists flattened."""
    def walk(key: str, value: Any) -> Iterator[tuple[str, float]]:
        if isinstance(value, bool):
            yield key, float(value)
        elif isinstance(value, (int, float)):
            yield key, float(value)
        elif isinstance(value, dict):
            for sub, item in value.items():
                yield from walk(f"{key}/{sub}", item)
        elif isinstance(value, (list, tuple)):
            for i, item in enumerate(value):
                yield from walk(f"{key}/{i}", item)

    for key, value in record.items():
        if key != names.STEP:
            yield from walk(key, value)


class TensorBoardSink:
    """Event files under ``<run_dir>/tensorboard`` via ``torch.utils.tensorboard.SummaryWriter`` (needs the
    ``tensorboard`` package); a resumed attempt appends a new event file to the same directory."""

    name = "metrics.tensorboard"

    def __init__(self, run_dir: Path):
        from torch.utils.tensorboard import SummaryWriter

        self.writer = SummaryWriter(log_dir=str(Path(run_dir) / TENSORBOARD_DIR))

    def log(self, record: dict[str, Any]) -> None:
        step = int(record[names.STEP])
        for tag, value in scalars(record):
            self.writer.add_scalar(tag, value, step)
        self.writer.flush()  # a killed run keeps its events up to the last log step

    def close(self) -> None:
        self.writer.close()


class WandbSink:
    """A Weights & Biases run (``wandb`` package) in ``<run_dir>/wandb``; the run id is derived from the run
    directory, so a resumed attempt continues the same W&B run. ``metrics.wandb.mode=offline`` writes locally only
    (``wandb sync`` uploads later)."""

    name = "metrics.wandb"

    def __init__(self, run_dir: Path, cfg):
        import wandb

        run_dir = Path(run_dir)
        (run_dir / WANDB_DIR).mkdir(parents=True, exist_ok=True)
        config_file = run_dir / "config.yaml"
        config = None
        if config_file.is_file():
            import yaml

            config = yaml.safe_load(config_file.read_text())
        run_id = hashlib.sha256(str(run_dir.resolve()).encode()).hexdigest()[:16]
        self.run = wandb.init(project=cfg.project, entity=cfg.entity or None, name=cfg.name or run_dir.name,
                              id=run_id, resume="allow", dir=str(run_dir / WANDB_DIR), mode=cfg.mode, config=config,
                              settings=wandb.Settings(console="off", x_disable_stats=True, silent=True))
        logger.info("metrics.wandb: run %s (%s) in %s", self.run.id, cfg.mode, self.run.dir)

    def log(self, record: dict[str, Any]) -> None:
        values = {tag: value for tag, value in scalars(record) if math.isfinite(value)}
        self.run.log(values, step=int(record[names.STEP]))

    def close(self) -> None:
        self.run.finish()


class Guarded:
    """Runs a sink's calls; the first failure logs one warning naming the sink and turns the sink off."""

    def __init__(self, sink):
        self.sink = sink

    @classmethod
    def start(cls, name: str, factory: Callable[[], Any]) -> "Guarded | None":
        """The sink ``factory()`` builds, or None (one warning) when it cannot start (missing package, ...)."""
        try:
            return cls(factory())
        except Exception as e:  # noqa: BLE001 - any failure of an optional sink must leave training alone
            logger.warning("%s: cannot start (%s: %s); training goes on without it", name, type(e).__name__,
                           str(e).splitlines()[0] if str(e) else "")
            return None

    def _call(self, method: str, *args) -> None:
        if self.sink is None:
            return
        try:
            getattr(self.sink, method)(*args)
        except Exception as e:  # noqa: BLE001 - see start()
            logger.warning("%s: %s failed (%s: %s); training goes on without it", self.sink.name, method,
                           type(e).__name__, str(e).splitlines()[0] if str(e) else "")
            self.sink = None

    def log(self, record: dict[str, Any]) -> None:
        self._call("log", record)

    def close(self) -> None:
        self._call("close")


def from_config(run_dir: Path, cfg) -> list[Guarded]:
    """The optional sinks ``cfg`` (MetricsConfig) turns on, each guarded; for the writer rank only."""
    sinks = []
    if cfg.tensorboard:
        sinks.append(Guarded.start(TensorBoardSink.name, lambda: TensorBoardSink(run_dir)))
    if cfg.wandb.enabled:
        sinks.append(Guarded.start(WandbSink.name, lambda: WandbSink(run_dir, cfg.wandb)))
    return [s for s in sinks if s is not None]
