"""Faults the tests make happen on purpose in a real run: the chaos, watchdog and NaN tests set
``PRETRAIN_TEST_FAULTS`` in the environment of the runs they break; nothing else reads it, and it is parsed here
only (``TestFaults.from_env``)."""

from __future__ import annotations

import contextlib
import dataclasses
import os
import time

#: Environment variable of the fault-injection test hooks, e.g. ``save_delay_s=2,nan_loss_step=3``.
TEST_FAULTS_ENV = "PRETRAIN_TEST_FAULTS"


@dataclasses.dataclass(frozen=True)
class TestFaults:
    """Faults the tests inject into a real run (all off by default); parsed from ``PRETRAIN_TEST_FAULTS``."""

    __test__ = False  # not a pytest test class

    #: Sleep this long after a checkpoint's shards are written and before its commit marker (widens the
    #: window in which a kill leaves an uncommitted directory).
    save_delay_s: float = 0.0
    #: Make the loss of this optimizer step (1-based: the step that completes step N) NaN on every rank.
    nan_loss_step: int = 0
    #: Multiply the loss of this step by 1000 on every rank (a loss spike with finite gradients).
    spike_loss_step: int = 0
    #: Rank that sleeps ``hang_s`` seconds inside step ``hang_step`` (1-based); -1: none.
    hang_rank: int = -1
    #: See hang_rank.
    hang_step: int = 0
    #: See hang_rank.
    hang_s: float = 0.0
    #: Sleep this long in every step's forward/backward on every rank: tiny test models get steps long enough to
    #: be killed between, at almost no CPU cost (the goodput test).
    step_sleep_s: float = 0.0

    @classmethod
    def from_env(cls) -> "TestFaults":
        text = os.environ.get(TEST_FAULTS_ENV, "").strip()
        if not text:
            return cls()
        fields = {f.name: f.type for f in dataclasses.fields(cls)}
        values = {}
        for item in text.split(","):
            key, _, value = item.partition("=")
            if key.strip() not in fields:
                raise ValueError(f"{TEST_FAULTS_ENV}: unknown fault {key.strip()!r} (known: {', '.join(fields)})")
            kind = float if fields[key.strip()] in ("float", float) else int
            values[key.strip()] = kind(value)
        return cls(**values)


@contextlib.contextmanager
def injected_faults(faults: TestFaults, engine, step: int, rank: int):
    """Apply this step's test faults around its forward/backward: ``hang_*`` sleeps here on ``hang_rank`` (the
    watchdog test looks for this frame in the dumped stacks); ``nan_loss_step`` multiplies every micro-batch loss by
    NaN after the forward and before the backward, so the gradients are NaN too, as after a real overflow;
    ``spike_loss_step`` by 1000 (finite gradients)."""
    if faults.hang_rank == rank and faults.hang_step == step:
        time.sleep(faults.hang_s)
    if faults.step_sleep_s:
        time.sleep(faults.step_sleep_s)
    factor = float("nan") if faults.nan_loss_step == step else 1000.0 if faults.spike_loss_step == step else None
    if factor is None:
        yield
        return
    loss_fn = engine.loss_fn
    engine.loss_fn = lambda output, batch: loss_fn(output, batch) * factor
    try:
        yield
    finally:
        engine.loss_fn = loss_fn
