"""pretrain.metrics.goodput: the ledger's arithmetic on a scripted clock (attempts, commits, kills, torn lines),
and its Prometheus counters through a real exporter's /metrics."""

from __future__ import annotations

import time
import urllib.request

import pytest

from pretrain.metrics import goodput, names


class Clock:
    """A clock the test advances by hand."""

    def __init__(self, now: float):
        self.now = now

    def __call__(self) -> float:
        return self.now

    def tick(self, seconds: float) -> None:
        self.now += seconds


def run_attempt(path, clock, start, resume_step, steps, every, kill_after=None, wait=0.25, step_s=1.0):
    """Script one attempt: startup 10 s, steps of ``step_s`` (``wait`` of it data wait), a 2 s save every ``every``
    steps; returns the ledger (closed normally unless ``kill_after`` steps were done, then left as a SIGKILL
    leaves it)."""
    clock.now = start
    ledger = goodput.GoodputLedger(path, start=start, clock=clock)
    clock.tick(10.0)  # imports, process groups, resume
    ledger.resumed(resume_step)
    commit = {}
    for step in range(resume_step + 1, steps + 1):
        clock.tick(step_s)
        ledger.step_done(step, step_s, wait, applied=True)
        if step % every == 0:
            clock.tick(2.0)
            ledger.mark("checkpoint")
            commit = {names.LAST_CHECKPOINT_STEP: step}
        ledger.update({names.STEP: step}, commit)
        if kill_after is not None and step == resume_step + kill_after:
            return ledger  # SIGKILL: no finish()
    ledger.finish(commit)
    return ledger


def test_two_kills_account_every_second(tmp_path, capsys):
    path = tmp_path / goodput.FILE_NAME
    clock = Clock(1000.0)
    run_attempt(path, clock, 1000.0, 0, 30, every=10, kill_after=14)  # dies after step 14: 4 steps uncommitted
    run_attempt(path, clock, 1050.0, 10, 30, every=10, kill_after=13)  # step 23: 3 uncommitted
    ledger = run_attempt(path, clock, 1100.0, 20, 30, every=10)
    attempts = goodput.read(path)
    assert [a["attempt"] for a in attempts] == [1, 2, 3]
    parts = goodput.totals(attempts)
    assert parts["redone"] == pytest.approx(4 * 1.0 + 3 * 1.0)
    assert parts["startup"] == pytest.approx(3 * (10.0 + 0.25))  # the first step's data wait included
    assert parts["checkpoint"] == pytest.approx(3 * 2.0)  # saves at step 10 (attempt 1), 20 (2), 30 (3)
    # Productive: 10 + 10 + 10 committed steps (one attempt each), less their data wait, less the first steps'.
    assert parts["productive"] + parts["data_wait"] == pytest.approx(30 * 1.0 - 3 * 0.25)
    first_end = 1000.0 + 10 + 14 * 1.0 + 2.0  # startup, 14 steps, the step-10 save
    second_end = 1050.0 + 10 + 13 * 1.0 + 2.0
    assert parts["between_attempts"] == pytest.approx((1050.0 - first_end) + (1100.0 - second_end))
    wall = goodput.wall_s(attempts)
    assert wall == pytest.approx(clock.now - 1000.0)
    assert sum(parts.values()) == pytest.approx(wall)  # nothing uncommitted after the final save
    assert ledger.uncommitted_s() == 0
    printed = capsys.readouterr().out.strip().splitlines()[-1]
    assert printed.startswith(f"goodput {100 * parts['productive'] / wall:.1f}% of ") and "over 3 attempts" in printed
    assert "redone 7.0s" in printed


def test_skipped_steps_uncommitted_and_torn_line(tmp_path):
    path = tmp_path / goodput.FILE_NAME
    clock = Clock(0.0)
    ledger = goodput.GoodputLedger(path, start=0.0, clock=clock)
    ledger.resumed(0)
    for step, applied in ((1, True), (2, False), (3, True)):
        clock.tick(1.0)
        ledger.step_done(step, 1.0, 0.1, applied)
    record = {names.STEP: 3}
    ledger.update(record, {})
    assert ledger.seconds["skipped"] == pytest.approx(1.0)
    assert record[names.GOODPUT_UNCOMMITTED_S] == pytest.approx(0.9 + 1.0)  # step 1 (less startup wait) and 3
    assert sum(record[names.GOODPUT_S].values()) + record[names.GOODPUT_UNCOMMITTED_S] == pytest.approx(3.0)
    with open(path, "a") as f:
        f.write('{"attempt": 1, "sta')  # a SIGKILL in the middle of a line
    nxt = goodput.GoodputLedger(path, start=10.0, clock=clock)
    assert nxt.attempt == 2 and len(nxt.history) == 1
    nxt.flush()
    assert [a["attempt"] for a in goodput.read(path)] == [1, 2]
    assert goodput.totals(goodput.read(path))["redone"] == pytest.approx(1.9)


def test_other_ranks_write_nothing(tmp_path):
    ledger = goodput.GoodputLedger.for_run(tmp_path, is_writer=False)
    record = {names.STEP: 1}
    ledger.update(record, {names.LAST_CHECKPOINT_STEP: 1})
    ledger.finish({})
    assert record == {names.STEP: 1} and not (tmp_path / goodput.FILE_NAME).exists()


def test_exporter_serves_goodput_counters_by_kind():
    from pretrain.metrics.prometheus import PrometheusExporter

    exporter = PrometheusExporter(host="127.0.0.1", port=0, run="gp", rank=0, model="gpt", config_yaml="",
                                  layout={}, tokens_per_sample=128, peak=None, target_steps=10)
    try:
        kinds = dict.fromkeys(goodput.KINDS, 0.0) | {"productive": 12.5, "redone": 3.0}
        exporter.update({names.STEP: 5, names.GOODPUT_S: kinds, names.GOODPUT_UNCOMMITTED_S: 1.5})
        text = urllib.request.urlopen(f"http://127.0.0.1:{exporter.address[1]}/metrics", timeout=10).read().decode()
    finally:
        exporter.close()
    lines = {line.split("{")[0] + "|" + line.split('kind="')[1].split('"')[0]: float(line.rsplit(" ", 1)[1])
             for line in text.splitlines() if line.startswith(names.PROM_GOODPUT + "{")}
    assert lines[f"{names.PROM_GOODPUT}|productive"] == 12.5 and lines[f"{names.PROM_GOODPUT}|redone"] == 3.0
    assert len(lines) == len(goodput.KINDS)
    assert any(line.startswith(names.PROM_GOODPUT_UNCOMMITTED + "{") and line.endswith(" 1.5")
               for line in text.splitlines())


def test_slurm_job_start(monkeypatch):
    line = "JobId=72 JobName=train Restarts=1 SubmitTime=2026-12-07T02:31:20 StartTime=2026-12-07T02:31:26"
    assert goodput.scontrol_start_time(line) == time.mktime((2026, 12, 7, 2, 31, 26, 0, 0, -1))
    assert goodput.scontrol_start_time("JobId=9 StartTime=Unknown") is None
    monkeypatch.setenv("SLURM_JOB_ID", "72")
    monkeypatch.setenv("SLURM_JOB_START_TIME", "1700000000")
    monkeypatch.setenv("SLURM_STEP_ID", "1")  # a later step of the allocation: its start is not ours
    assert goodput.slurm_job_start() is None
    monkeypatch.setenv("SLURM_STEP_ID", "0")
    assert goodput.slurm_job_start() == 1700000000.0
    monkeypatch.delenv("SLURM_JOB_ID")
    assert goodput.slurm_job_start() is None
