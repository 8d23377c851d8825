"""Transformer-XL data: the ordered stream reader (data_pipeline.stream.StreamReader) behind the trainer's reader
interface.

The reference trains on ``LMOrderedIterator``: the corpus cut into ``batch_size`` contiguous lanes, segment k of
every lane in step k, so the memory a lane builds in one step is the context of its next segment. Here the
global batch is the number of lanes; each data-parallel rank reads its own lanes (global batch / dp of them) and
splits every segment into ``accumulation`` micro-batches of ``micro_batch_size`` lanes. ``last_indices`` names
each row's (global lane id, token offset in the lane), which the model uses to pick and reset memory.
"""

from __future__ import annotations

import dataclasses
from typing import Iterator

import numpy as np

from data_pipeline.errors import DataError
from data_pipeline.sampler import check_batch_sizes
from data_pipeline.stream import StreamReader
from pretrain.config import Config
from pretrain.errors import ConfigError
from pretrain.models.common import check_vocab_fits

STATE_VERSION = 1


class LaneReader:
    """Micro-batches [micro_batch_size, tgt_len + 1] of one DP rank's lanes, segment after segment.

    State = the stream position of the segment being handed out + how many of its micro-batches are done, so a
    checkpoint taken between micro-batches (or at a step boundary) resumes at exactly the next one.
    """

    def __init__(self, source, *, micro_batch_size: int, global_batch_size: int, tgt_len: int, dp_rank: int = 0,
                 dp_size: int = 1, expected_tokenizer_sha256: str | None = None, loop: bool = True):
        """Open the stream (manifest and shard checks happen here); ``global_batch_size`` = number of lanes."""
        self.accumulation = check_batch_sizes(micro_batch_size, global_batch_size, dp_size)
        self.stream = StreamReader(source, batch_size=global_batch_size, tgt_len=tgt_len, dp_rank=dp_rank,
                                   dp_size=dp_size, expected_tokenizer_sha256=expected_tokenizer_sha256, loop=loop)
        self.manifest = self.stream.manifest
        self.micro_batch_size, self.global_batch_size, self.tgt_len = micro_batch_size, global_batch_size, tgt_len
        self.dp_rank, self.dp_size = dp_rank, dp_size
        self.skipped_shards = 0  # an ordered stream cannot skip a shard (every lane after it would shift)
        self._state = self._initial_state()
        self._last = np.zeros((0, 2), dtype=np.int64)

    def _initial_state(self) -> dict:
        return {"stream": self.stream.state_dict(), "micro_batch": 0}

    @property
    def last_indices(self) -> np.ndarray:
        """(global lane id, token offset in the lane) int64 [micro_batch_size, 2] of the last micro-batch."""
        return self._last

    @property
    def bytes_read(self) -> int:
        """Bytes this rank's stream has read from shard files (a counter for metrics)."""
        return self.stream.bytes_read

    def source_fractions(self) -> list[float]:
        """One source: all of it."""
        return [1.0]

    def state_dict(self) -> dict:
        """Position of the next micro-batch (JSON-serialisable)."""
        return {"version": STATE_VERSION, "stream": dict(self._state["stream"]),
                "micro_batch": self._state["micro_batch"], "micro_batch_size": self.micro_batch_size,
                "dp_size": self.dp_size}

    def load_state_dict(self, state: dict) -> None:
        """Continue at ``state``: exact for any dp_size at a segment boundary (lanes are global); mid-segment
        only with the same micro_batch_size and dp_size."""
        where = self.stream.src.name
        if state.get("version") != STATE_VERSION:
            raise DataError(f"{where}: Transformer-XL data state version {state.get('version')}, expected "
                            f"{STATE_VERSION}")
        if state["micro_batch"] and (state["micro_batch_size"], state["dp_size"]) != (self.micro_batch_size,
                                                                                      self.dp_size):
            raise DataError(f"{where}: data state is mid-segment (micro_batch {state['micro_batch']}); it resumes "
                            f"only with the same micro_batch_size and dp_size")
        self.stream.load_state_dict(state["stream"])
        self._state = {"stream": dict(state["stream"]), "micro_batch": int(state["micro_batch"])}

    def __iter__(self) -> Iterator[np.ndarray]:
        """Yield micro-batches from the current position (one pass with loop=False)."""
        per_rank = self.global_batch_size // self.dp_size
        lanes = np.arange(self.dp_rank * per_rank, (self.dp_rank + 1) * per_rank, dtype=np.int64)
        mbs, skip = self.micro_batch_size, self._state["micro_batch"]
        segment_start = self._state["stream"]
        try:
            for segment in self.stream:  # [per_rank, tgt_len + 1]
                offset = self.stream.offset - self.tgt_len  # the stream has advanced past this segment
                after = self.stream.state_dict()
                for k in range(skip, self.accumulation):
                    done = k + 1 == self.accumulation
                    self._state = {"stream": after if done else segment_start, "micro_batch": 0 if done else k + 1}
                    rows = slice(k * mbs, (k + 1) * mbs)
                    self._last = np.stack([lanes[rows], np.full(mbs, offset, dtype=np.int64)], axis=1)
                    yield segment[rows]
                skip, segment_start = 0, after
        finally:
            if not self.stream.loop:  # a validation pass: the next iter() starts from the beginning
                self._state = self._initial_state()


def make_readers(cfg: Config, reader_args: dict) -> tuple[LaneReader, LaneReader | None]:
    """Training reader over data.train (one source; global batch = lanes) and validation reader over data.valid
    (micro_batch_size lanes per DP rank, one pass per evaluation, memory carried along its lanes); either is None
    when its data is not configured. ``reader_args`` without dp_rank / dp_size: one process."""
    check_config(cfg)
    mbs, dp_rank, dp_size = reader_args["micro_batch_size"], reader_args.get("dp_rank", 0), \
        reader_args.get("dp_size", 1)
    common = dict(micro_batch_size=mbs, tgt_len=cfg.model.seq_length, dp_rank=dp_rank, dp_size=dp_size,
                  expected_tokenizer_sha256=reader_args.get("expected_tokenizer_sha256"))
    train = valid = None
    if cfg.data.train:  # `pretrain eval` clears it: evaluation reads only the validation split
        source = {k: v for k, v in dataclasses.asdict(cfg.data.train[0]).items() if v != "" and k != "weight"}
        train = LaneReader(source, global_batch_size=cfg.train.global_batch_size or mbs * dp_size, loop=True,
                           **common)
    if cfg.data.valid:
        valid = LaneReader(cfg.data.valid, global_batch_size=mbs * dp_size, loop=False, **common)
    for reader in (train, valid):
        if reader is not None:
            check_vocab_fits(cfg, reader.manifest)
    return train, valid


def check_config(cfg: Config) -> None:
    """What Transformer-XL refuses of the data beyond config.validate: one-line ConfigErrors naming the key
    (sequence parallelism is refused where the model is built, TransformerXL.__init__)."""
    if len(cfg.data.train) > 1:
        raise ConfigError(f"data.train: transformer_xl trains on one ordered stream, got {len(cfg.data.train)} "
                          "sources (blending would break the lanes' continuity)")
    if cfg.data.on_bad_shard != "error":
        raise ConfigError("data.on_bad_shard: transformer_xl needs 'error' (skipping a shard shifts every lane)")
