"""Fault-tolerance pieces on their own: the hang watchdog (a thread that sleeps; subprocesses for the exit paths),
collective-timeout tightening on a real gloo group, the loss-spike z-score and the ft config checks."""

from __future__ import annotations

import math
import subprocess
import os
import sys
import textwrap
import time
from pathlib import Path

import pytest

from pretrain import fault_tolerance as ft
from pretrain.errors import ConfigError
from pretrain.config import load

REPO = Path(__file__).resolve().parents[2]
TINY = REPO / "configs" / "debug" / "gpt_tiny.yaml"


class ExitRecorder:
    """Stands in for os._exit in-process: records the code instead of ending pytest."""

    def __init__(self):
        self.codes: list[int] = []

    def __call__(self, code: int) -> None:
        self.codes.append(code)


def in_process_watchdog(tmp_path, step_timeout_s: float, **kwargs):
    stream = open(tmp_path / "watchdog.txt", "w+")
    exits = ExitRecorder()
    dog = ft.Watchdog(step_timeout_s, rank=3, linger_s=0.0, stream=stream, exit_fn=exits, backstop=False, **kwargs)
    return dog, exits, stream


def sleeping_step_that_hangs(seconds: float) -> None:
    time.sleep(seconds)  # the frame the dumped stacks must show


# -- watchdog in-process (a thread that sleeps) ---------------------------------------------------------------------


def test_watchdog_fires_on_a_sleeping_step_with_line_and_stacks(tmp_path):
    dog, exits, stream = in_process_watchdog(tmp_path, 0.3)
    dog.started = True  # past the first step: step_timeout_s applies
    start = time.monotonic()
    dog.beat(5, "forward/backward")
    sleeping_step_that_hangs(1.0)
    assert exits.codes == [ft.HANG_EXIT_CODE]
    stream.seek(0)
    text = stream.read()
    assert text.splitlines()[0] == ("rank 3: forward/backward of step 5 exceeded ft.step_timeout_s=0.3 s; "
                                   "Python stacks follow")
    assert "sleeping_step_that_hangs" in text and "test_watchdog_fires_on_a_sleeping_step" in text
    assert dog.fired and time.monotonic() - start >= 0.3
    dog.close()


def test_watchdog_writes_its_report_to_the_hang_dir(tmp_path):
    import socket

    dog, exits, stream = in_process_watchdog(tmp_path, 0.3, hang_dir=tmp_path / "hang")
    dog.started = True
    dog.beat(7, "forward/backward")
    sleeping_step_that_hangs(1.0)
    assert exits.codes == [ft.HANG_EXIT_CODE]
    report = (tmp_path / "hang" / "rank_3.txt").read_text()
    lines = report.splitlines()
    assert lines[0] == "rank 3: forward/backward of step 7 exceeded ft.step_timeout_s=0.3 s; Python stacks follow"
    assert lines[1] == (f"rank 3 (host {socket.gethostname()}, pid {os.getpid()}): step 7, not in a collective, "
                        f"at {__file__}:{sleeping_step_that_hangs.__code__.co_firstlineno + 1} "
                        "(sleeping_step_that_hangs); "
                        f"stacks also in {tmp_path / 'hang' / 'rank_3.txt'}")
    assert "sleeping_step_that_hangs" in report  # the stacks, in the file as on stderr
    stream.seek(0)
    assert lines[1] in stream.read()
    dog.close()


def test_watchdog_quiet_while_beats_keep_coming_and_after_close(tmp_path):
    dog, exits, _ = in_process_watchdog(tmp_path, 0.4)
    dog.started = True
    for step in range(12):  # 1.2 s in all, each beat well inside 0.4 s
        dog.beat(step, "forward/backward")
        time.sleep(0.1)
    dog.note("optimizer step")
    dog.close()
    time.sleep(0.6)
    assert exits.codes == [] and not dog.fired


def test_watchdog_startup_then_step_then_save_timeouts(tmp_path):
    dog, exits, stream = in_process_watchdog(tmp_path, 0.3, startup_timeout_s=1.0, save_timeout_s=1.0)
    dog.beat(1, "startup (resume, first step)")
    time.sleep(0.6)  # longer than the step timeout, shorter than the startup timeout
    assert exits.codes == []
    dog.started = True  # as step_completed() does, without touching process groups (none exist here)
    with dog.saving(1):
        time.sleep(0.6)  # a save gets save_timeout_s
    assert exits.codes == []
    time.sleep(0.7)  # after the save the step timeout is back
    assert exits.codes == [ft.HANG_EXIT_CODE]
    stream.seek(0)
    assert stream.read().startswith("rank 3: end (after checkpoint save) of step 1 exceeded ft.step_timeout_s=0.3 s")


def test_watchdog_disabled_by_zero_starts_no_thread(tmp_path):
    dog, exits, _ = in_process_watchdog(tmp_path, 0.0)
    dog.beat(1, "forward/backward")
    dog.step_completed(1)
    time.sleep(0.2)
    assert not dog.enabled and not dog._thread.is_alive() and exits.codes == []
    dog.close()


# -- watchdog exit paths (subprocesses) -----------------------------------------------------------------------------


def run_python(code: str, timeout: float = 60) -> tuple[subprocess.CompletedProcess, float]:
    start = time.monotonic()
    result = subprocess.run([sys.executable, "-c", textwrap.dedent(code)], capture_output=True, text=True,
                            timeout=timeout, cwd=REPO)
    return result, time.monotonic() - start


def test_watchdog_exits_the_process_with_hang_code():
    result, elapsed = run_python("""
        import time
        from pretrain import fault_tolerance as ft

        def stuck_in_a_collective():
            time.sleep(60)

        dog = ft.Watchdog(1.0, startup_timeout_s=1.0, rank=0, linger_s=0.5)
        dog.beat(7, "forward/backward")
        stuck_in_a_collective()
        print("not reached")
    """)
    assert result.returncode == ft.HANG_EXIT_CODE, result.stderr[-2000:]
    assert "rank 0: forward/backward of step 7 exceeded ft.startup_timeout_s=1 s" in result.stderr
    assert "stuck_in_a_collective" in result.stderr and "not reached" not in result.stdout
    assert elapsed < 1.0 + 0.5 + 8, elapsed  # timeout + linger + interpreter start-up on a busy machine


def test_watchdog_backstop_fires_when_a_thread_holds_the_gil():
    # A switch interval of 1000 s: the busy main thread never hands the GIL to the watchdog thread, as a C call
    # that does not release it would; faulthandler's C timer still dumps the stacks and exits (code 1).
    result, elapsed = run_python("""
        import sys
        from pretrain import fault_tolerance as ft

        def spinning_holding_the_gil():
            while True:
                pass

        dog = ft.Watchdog(1.0, rank=0, linger_s=0.0, backstop_grace_s=1.0)
        dog.beat(3, "forward/backward")
        sys.setswitchinterval(1000)
        spinning_holding_the_gil()
    """)
    assert result.returncode == 1, result.stderr[-2000:]
    assert "Timeout (0:00:02)!" in result.stderr and "spinning_holding_the_gil" in result.stderr
    assert "exceeded" not in result.stderr  # the Python watchdog never got to run
    assert elapsed < 2.0 + 8, elapsed


# -- collective timeouts (a real two-process gloo group) ------------------------------------------------------------


def tightened_collective_times_out() -> dict:
    """Rank 0 lowers every group's timeout to 1 s and runs an all-reduce rank 1 never joins."""
    import datetime

    import torch
    import torch.distributed as dist

    from pretrain.parallel.env import _group_timeout, tighten_collective_timeouts

    subgroup = dist.new_group([0, 1])
    before = _group_timeout(dist.distributed_c10d._get_default_group())
    changed = tighten_collective_timeouts(1.0)
    again = tighten_collective_timeouts(100.0)  # never raises a timeout
    result = {"before": before, "changed": changed, "again": again,
              "default": _group_timeout(dist.distributed_c10d._get_default_group()),
              "subgroup": _group_timeout(subgroup)}
    if dist.get_rank() == 0:
        start = time.monotonic()
        try:
            dist.all_reduce(torch.ones(1))
            result["error"] = None
        except RuntimeError as e:
            result["error"] = str(e).splitlines()[0]
        result["elapsed"] = time.monotonic() - start
    else:
        time.sleep(4)  # alive, connected, and not joining
    assert isinstance(result["default"], datetime.timedelta)
    return result


def test_tighten_collective_timeouts_bounds_a_stuck_all_reduce():
    from pretrain.testing import run_distributed

    rank0, rank1 = run_distributed(tightened_collective_times_out, 2, timeout_s=120)
    assert rank0["before"].total_seconds() == 1800  # torch's gloo default
    assert rank0["changed"] >= 2 and rank0["again"] == 0
    assert rank0["default"].total_seconds() == 1 and rank0["subgroup"].total_seconds() == 1
    assert rank0["error"] is not None and 0.9 <= rank0["elapsed"] < 3.5, rank0


# -- loss spikes ----------------------------------------------------------------------------------------------------


def test_loss_zscore_numbers():
    assert ft.loss_zscore((1.0, 2.0, 3.0), 5.0) == pytest.approx(3.0)  # mean 2, sample std 1
    assert ft.loss_zscore((1.0, 2.0, 3.0), 1.0) == pytest.approx(-1.0)
    assert ft.loss_zscore((4.0, 4.0, 4.0), 4.1) == pytest.approx(0.1 / 4e-6)  # spread floored at 1e-6 * mean
    assert math.isnan(ft.loss_zscore((1.0,), 9.0))  # too short to judge
    assert math.isnan(ft.loss_zscore((1.0, 2.0), math.nan))


def test_push_loss_keeps_the_newest_finite_losses():
    window = ()
    for loss in [1.0, 2.0, math.nan, 3.0, math.inf, 4.0]:
        window = ft.push_loss(window, loss, 3)
    assert window == (2.0, 3.0, 4.0)


def test_spike_detection_on_a_noisy_falling_loss():
    """The detector over a realistic curve: noise and a steady fall are not spikes, a jump is."""
    import random

    rng = random.Random(0)
    window, spikes = (), []
    for step in range(300):
        loss = 6.0 * math.exp(-step / 150) + 2.0 + rng.gauss(0, 0.02) + (1.5 if step == 250 else 0.0)
        if len(window) == 50 and ft.loss_zscore(window, loss) > 6.0:
            spikes.append(step)
        window = ft.push_loss(window, loss, 50)
    assert spikes == [250]


# -- config ---------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("override, key", [
    ("--ft.step_timeout_s=-1", "ft.step_timeout_s"),
    ("--ft.save_timeout_s=.inf", "ft.save_timeout_s"),
    ("--ft.spike_window=1", "ft.spike_window"),
    ("--ft.max_skipped_in_a_row=-2", "ft.max_skipped_in_a_row"),
    ("--ft.nan_policy=ignore", "ft.nan_policy"),
    ("--ft.spike_policy=abort", "ft.spike_policy"),
])
def test_bad_ft_values_are_one_line_errors(override, key):
    with pytest.raises(ConfigError) as info:
        load(TINY, [override])
    assert str(info.value).startswith(key) and "\n" not in str(info.value)


def test_ft_defaults():
    cfg = load(TINY).ft
    assert (cfg.step_timeout_s, cfg.startup_timeout_s, cfg.save_timeout_s) == (1800.0, 3600.0, 0.0)
    assert (cfg.nan_policy, cfg.spike_policy, cfg.spike_zscore, cfg.spike_window) == ("skip", "warn", 6.0, 100)
