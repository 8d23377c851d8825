"""pretrain.metrics.console: the one-line format, the ETA, warnings that stand out, and the two output paths (plain
lines when stdout is not a terminal, the tqdm bar under the lines when it is)."""

from __future__ import annotations

import io

import pytest

from pretrain.config import MetricsConfig
from pretrain.metrics import MetricsLogger, names
from pretrain.metrics.console import Console, duration, format_step, human, short_lr


class Clock:
    def __init__(self):
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


class Terminal(io.StringIO):
    def isatty(self) -> bool:
        return True


def record(step: int, **extra) -> dict:
    return {names.STEP: step, names.LOSS: 4.81234, names.LR: 2.1e-3, names.TOKENS_PER_S: 8912.0,
            names.STEP_TIME_S: 0.2301, names.SKIPPED_STEPS: 0, names.LOSS_SPIKES: 0, **extra}


def test_the_issue_line():
    assert format_step(record(120), 300, eta_s=41) == ("step 120/300 (40%) · loss 4.812 · lr 2.1e-3 · 8.91k tok/s · "
                                                      "0.23 s/step · ETA 0:41")
    line = format_step(record(300, **{names.VAL_LOSS: 4.9, names.TFLOPS: 390.0}), 300, eta_s=0, mfu=0.394)
    assert line == "step 300/300 (100%) · loss 4.812 · val loss 4.900 · lr 2.1e-3 · 8.91k tok/s · MFU 39% · " \
                   "0.23 s/step · ETA 0:00"


@pytest.mark.parametrize("value, text", [(950, "950"), (8912, "8.91k"), (1.23e7, "12.3M"), (0.5, "0.5")])
def test_human(value, text):
    assert human(value) == text


@pytest.mark.parametrize("seconds, text", [(41, "0:41"), (3599, "59:59"), (7509, "2:05:09"), (float("nan"), "?")])
def test_duration(seconds, text):
    assert duration(seconds) == text


def test_short_lr():
    assert short_lr(3e-4) == "3.0e-4" and short_lr(0.0021) == "2.1e-3" and short_lr(12.0) == "1.2e1"


def test_plain_lines_eta_and_warnings_without_a_terminal():
    clock, stream = Clock(), io.StringIO()
    console = Console(300, stream=stream, clock=clock)
    console.log(record(10))
    clock.now += 20.0  # 10 steps in 20 s
    console.log(record(20))
    clock.now += 10.0  # 10 steps in 10 s: the ETA's average moves 30 % toward 1 s/step
    console.log(record(30, **{names.LAST_CHECKPOINT_STEP: 30}))
    console.log(record(31, **{names.SKIPPED_STEPS: 1, names.LOSS: float("nan")}))
    lines = stream.getvalue().splitlines()
    assert "ETA" not in lines[0]  # no rate yet
    assert lines[1].endswith("ETA 9:20")  # 280 steps × 2 s
    assert lines[2].endswith("ETA 7:39 · checkpoint step 30")  # 270 × (0.3 × 1 + 0.7 × 2) s
    assert lines[3].startswith("!! step 31/300") and "non-finite loss · update skipped" in lines[3]
    assert "\033[" not in stream.getvalue() and "\r" not in stream.getvalue()  # a log file reads clean


def test_terminal_gets_a_bar_and_colour():
    stream = Terminal()
    console = Console(50, stream=stream, clock=Clock())
    console.log(record(10))
    console.log(record(20, **{names.LOSS_SPIKES: 1}))
    console.close()
    out = stream.getvalue()
    assert "step 10/50 (20%) · loss 4.812" in out
    assert "\033[33;1m!! step 20/50" in out and "loss spike" in out
    assert "\r" in out and "20/50" in out.split("loss spike")[-1]  # the bar redrawn under the lines


def test_metrics_logger_keeps_the_full_record_in_jsonl(tmp_path, capsys):
    import json

    logger = MetricsLogger(tmp_path, MetricsConfig(), is_writer=True, total_steps=100)
    full = record(5, **{names.GRAD_NORM: 1.25, names.DATA_WAIT_S: 0.01})
    logger.log(full)
    logger.close()
    assert json.loads((tmp_path / "metrics.jsonl").read_text()) == full
    assert capsys.readouterr().out.startswith("step 5/100 (5%) · loss 4.812")  # pytest's stdout is no terminal
