"""The console a person reads: one short line per logged step, a live tqdm bar under the lines when stdout is a
terminal, plain lines otherwise (logs, Slurm output files, pipes). The full record goes to metrics.jsonl.

    step 120/300 (40%) · loss 4.812 · lr 2.1e-3 · 8.9k tok/s · 0.23 s/step · ETA 0:41

Steps whose update was skipped, loss spikes and non-finite losses get a line that starts with ``!!`` (yellow on a
terminal); evaluations and checkpoint commits are appended to the step's line.
"""

from __future__ import annotations

import math
import shutil
import sys
import time
from typing import Any, TextIO

from pretrain.metrics import names

WARN, RESET = "\033[33;1m", "\033[0m"
#: Seconds per step for the ETA: an exponential average of the wall time between logged steps (weight of the newest).
ETA_WEIGHT = 0.3


def human(value: float) -> str:
    """``950``, ``8.9k``, ``12.3M``: three significant digits at most."""
    for scale, suffix in ((1e9, "G"), (1e6, "M"), (1e3, "k")):
        if abs(value) >= scale:
            return f"{value / scale:.3g}{suffix}"
    return f"{value:.3g}"


def duration(seconds: float) -> str:
    """``0:41`` (m:ss) under an hour, ``2:05:09`` (h:mm:ss) above; ``?`` when unknown."""
    if not math.isfinite(seconds) or seconds < 0:
        return "?"
    minutes, secs = divmod(int(round(seconds)), 60)
    hours, minutes = divmod(minutes, 60)
    return f"{hours}:{minutes:02d}:{secs:02d}" if hours else f"{minutes}:{secs:02d}"


def short_lr(lr: float) -> str:
    """``2.1e-3``: two significant digits, no zero-padded exponent."""
    mantissa, exponent = f"{lr:.1e}".split("e")
    return f"{mantissa}e{int(exponent)}"


def format_step(record: dict[str, Any], total_steps: int, eta_s: float | None = None, mfu: float | None = None,
                events: tuple[str, ...] = ()) -> str:
    """The one line of a logged record (see the module docstring); ``events`` (e.g. ``update skipped``) are
    appended."""
    step = record[names.STEP]
    parts = [f"step {step}/{total_steps} ({100 * step / max(total_steps, 1):.0f}%)"]
    if names.LOSS in record:
        parts.append(f"loss {record[names.LOSS]:.3f}")
    if names.VAL_LOSS in record:
        parts.append(f"val loss {record[names.VAL_LOSS]:.3f}")
    if names.LR in record:
        parts.append(f"lr {short_lr(record[names.LR])}")
    if names.TOKENS_PER_S in record:
        parts.append(f"{human(record[names.TOKENS_PER_S])} tok/s")
    if mfu is not None:
        parts.append(f"MFU {100 * mfu:.0f}%")
    if names.STEP_TIME_S in record:
        parts.append(f"{record[names.STEP_TIME_S]:.3g} s/step")
    if eta_s is not None:
        parts.append(f"ETA {duration(eta_s)}")
    parts.extend(events)
    return " · ".join(parts)


class Console:
    """Rank 0's console sink. ``log(record)`` per logged record; ``close()`` at the end."""

    def __init__(self, total_steps: int, peak_flops: float | None = None, stream: TextIO | None = None,
                 clock=time.monotonic):
        self.total_steps, self.peak_flops, self.clock = total_steps, peak_flops, clock
        self.stream = stream or sys.stdout
        self.tty = bool(getattr(self.stream, "isatty", lambda: False)())
        self.seconds_per_step: float | None = None
        self._last: tuple[int, float] | None = None  # (step, clock) of the previous record
        self._counters = {names.SKIPPED_STEPS: None, names.LOSS_SPIKES: None}
        self._checkpoint_step = None
        self.bar = None

    def eta(self, step: int) -> float | None:
        """Seconds to train.steps at the averaged wall time per step between logged records."""
        now = self.clock()
        if self._last is not None and step > self._last[0]:
            per_step = (now - self._last[1]) / (step - self._last[0])
            self.seconds_per_step = per_step if self.seconds_per_step is None else (
                ETA_WEIGHT * per_step + (1 - ETA_WEIGHT) * self.seconds_per_step)
        if self._last is None or step > self._last[0]:
            self._last = (step, now)
        return None if self.seconds_per_step is None else self.seconds_per_step * (self.total_steps - step)

    def events(self, record: dict[str, Any]) -> tuple[list[str], bool]:
        """What stands out in this record (skipped update, loss spike, non-finite loss, a commit) and whether it
        is a warning."""
        events, warn = [], False
        loss = record.get(names.LOSS)
        if loss is not None and not math.isfinite(loss):
            events.append("non-finite loss")
            warn = True
        for key, text in ((names.SKIPPED_STEPS, "update skipped"), (names.LOSS_SPIKES, "loss spike")):
            if key in record:
                seen, self._counters[key] = self._counters[key], record[key]
                if seen is not None and record[key] > seen:
                    events.append(text)
                    warn = True
        committed = record.get(names.LAST_CHECKPOINT_STEP)
        if committed is not None and committed != self._checkpoint_step:
            self._checkpoint_step = committed
            events.append(f"checkpoint step {committed:g}")
        return events, warn

    def line(self, record: dict[str, Any]) -> str:
        """The record's console line (advances the ETA and the event counters)."""
        step = record[names.STEP]
        mfu = (record[names.TFLOPS] * 1e12 / self.peak_flops
               if self.peak_flops and names.TFLOPS in record else None)
        events, warn = self.events(record)
        text = format_step(record, self.total_steps, self.eta(step), mfu, tuple(events))
        if warn:
            text = f"{WARN}!! {text}{RESET}" if self.tty else f"!! {text}"
        return text

    def log(self, record: dict[str, Any]) -> None:
        """Print the record's line; on a terminal, also move the live bar."""
        text = self.line(record)
        if not self.tty:
            print(text, file=self.stream, flush=True)
            return
        from tqdm import tqdm

        if self.bar is None:
            # A terminal that reports no size (a bare pty, some batch consoles) gets 100 x 24: at 0 rows tqdm hides
            # the bar.
            size = shutil.get_terminal_size((100, 24))
            self.bar = tqdm(total=self.total_steps, initial=record[names.STEP], file=self.stream, unit="step",
                            ncols=size.columns, nrows=size.lines, leave=False, mininterval=0)  # moved on log steps
        self.bar.write(text, file=self.stream)
        self.bar.update(record[names.STEP] - self.bar.n)

    def close(self) -> None:
        """Remove the bar (the lines above it stay)."""
        if self.bar is not None:
            self.bar.close()
            self.bar = None
