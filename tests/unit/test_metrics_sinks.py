"""TensorBoard and W&B sinks through the MetricsLogger: the scalars come back through TensorBoard's own event
reader and out of the W&B offline run's .wandb file; a sink that cannot start or fails while logging warns once and
the JSONL goes on."""

from __future__ import annotations

import json
import logging
import struct
import time

import pytest

from pretrain.config import MetricsConfig
from pretrain.config.sections import WandbConfig
from pretrain.metrics import MetricsLogger, names, sinks

RECORDS = [{names.STEP: step, names.LOSS: 5.0 - step / 10, names.LR: 1e-3 * step, names.TOKENS_PER_S: 900.0 + step,
            names.GOODPUT_S: {"productive": 2.0 * step, "startup": 5.0}, names.DATA_FRACTIONS: [0.25, 0.75]}
           for step in (10, 20, 30)]


def log_all(run_dir, cfg: MetricsConfig, records=RECORDS) -> None:
    logger = MetricsLogger(run_dir, cfg, is_writer=True, total_steps=30)
    for record in records:
        logger.log(record)
    logger.close()
    assert [json.loads(line)[names.STEP] for line in (run_dir / "metrics.jsonl").read_text().splitlines()] == [
        r[names.STEP] for r in records]


def test_scalars_flatten_nested_values():
    assert dict(sinks.scalars(RECORDS[0])) == {names.LOSS: 4.0, names.LR: 1e-2, names.TOKENS_PER_S: 910.0,
                                               "goodput_s/productive": 20.0, "goodput_s/startup": 5.0,
                                               "data_fractions/0": 0.25, "data_fractions/1": 0.75}


def test_tensorboard_events_read_back(tmp_path):
    pytest.importorskip("tensorboard")
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    other_rank = MetricsLogger(tmp_path / "rank1", MetricsConfig(console=False, tensorboard=True), is_writer=False)
    assert other_rank.sinks == [] and not (tmp_path / "rank1").exists()  # rank 0 only
    log_all(tmp_path, MetricsConfig(console=False, tensorboard=True))
    events = EventAccumulator(str(tmp_path / sinks.TENSORBOARD_DIR))
    events.Reload()
    assert {names.LOSS, "goodput_s/productive", "data_fractions/1"} <= set(events.Tags()["scalars"])
    loss = events.Scalars(names.LOSS)
    assert [e.step for e in loss] == [10, 20, 30]
    assert [e.value for e in loss] == pytest.approx([r[names.LOSS] for r in RECORDS])
    assert [e.value for e in events.Scalars("goodput_s/productive")] == [20.0, 40.0, 60.0]


def wandb_history(run_dir) -> dict[int, dict[str, float]]:
    """History rows of the offline run's .wandb file: W&B's 7-byte header, then LevelDB log blocks (32 KiB) of
    chunks ``crc32 | length | type | payload`` whose payloads are ``wandb_internal_pb2.Record`` protobufs."""
    from wandb.proto import wandb_internal_pb2

    (path,) = (run_dir / sinks.WANDB_DIR / "wandb").glob("offline-run-*/run-*.wandb")
    data, pos, payload, rows = path.read_bytes(), 7, b"", {}
    while pos + 7 <= len(data):
        if (left := 32768 - pos % 32768) < 7:  # block trailer
            pos += left
            continue
        _, length, kind = struct.unpack("<IHB", data[pos:pos + 7])
        if pos + 7 + length > len(data):  # the service is still writing this chunk
            break
        payload, pos = payload + data[pos + 7:pos + 7 + length], pos + 7 + length
        if kind in (1, 4):  # FULL or LAST chunk: a whole record
            record = wandb_internal_pb2.Record()
            record.ParseFromString(payload)
            payload = b""
            if record.WhichOneof("record_type") == "history":
                rows[record.history.step.num] = {i.key or "/".join(i.nested_key): json.loads(i.value_json)
                                                 for i in record.history.item}
    return rows


def test_wandb_offline_run_holds_our_scalars(tmp_path):
    pytest.importorskip("wandb")
    log_all(tmp_path, MetricsConfig(console=False, wandb=WandbConfig(enabled=True, mode="offline")))
    # W&B's service process writes the file; finish() can return before its last records are on disk (the
    # service's own exit, at the training process's exit, waits for them).
    deadline = time.monotonic() + 60
    while sorted(rows := wandb_history(tmp_path)) != [10, 20, 30] and time.monotonic() < deadline:
        time.sleep(0.2)
    assert sorted(rows) == [10, 20, 30]
    for record in RECORDS:
        row = rows[record[names.STEP]]
        assert row[names.LOSS] == pytest.approx(record[names.LOSS]) and row[names.LR] == pytest.approx(record[names.LR])
        assert row["goodput_s/productive"] == record[names.GOODPUT_S]["productive"]


def test_failing_sinks_warn_once_and_the_run_goes_on(tmp_path, caplog):
    pytest.importorskip("tensorboard")
    pytest.importorskip("wandb")
    (tmp_path / sinks.TENSORBOARD_DIR).write_text("a file where the event directory should be")
    cfg = MetricsConfig(console=False, tensorboard=True, wandb=WandbConfig(enabled=True, mode="offline"))
    with caplog.at_level(logging.WARNING, logger="pretrain.metrics.sinks"):
        logger = MetricsLogger(tmp_path, cfg, is_writer=True, total_steps=30)
        assert [s.sink.name for s in logger.sinks] == ["metrics.wandb"]  # TensorBoard could not start
        logger.log(RECORDS[0])
        logger.sinks[0].sink.run.finish()  # the W&B run goes away under us: its next log raises
        for record in RECORDS[1:]:
            logger.log(record)
        logger.close()
    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warnings) == 2, warnings
    assert warnings[0].startswith("metrics.tensorboard: cannot start") and "training goes on" in warnings[0]
    assert warnings[1].startswith("metrics.wandb: log failed (UsageError") and "training goes on" in warnings[1]
    assert len((tmp_path / "metrics.jsonl").read_text().splitlines()) == 3


def test_megatron_core_import_leaves_wandb_unloaded_until_used():
    """megatron-core imports wandb at import time; pretrain defers it (0.6 s of every rank's start-up) until a
    sink uses it, and then it is the real module."""
    import subprocess
    import sys

    script = ("import sys, pretrain.train; m = sys.modules['wandb']; assert 'wandb.sdk' not in sys.modules, "
              "'loaded at import'; import wandb; wandb.Settings; assert 'wandb.sdk' in sys.modules; "
              "print(type(m).__name__, type(sys.modules['wandb']).__name__)")
    out = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-2000:]
    assert out.stdout.split() == ["_DeferredModule", "module"]
