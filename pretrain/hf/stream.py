"""Streaming pieces of the Hugging Face conversions: safetensors files written one tensor at a time, and the peak
resident memory a command reached (checkpoint tensors are read one at a time by
pretrain.checkpoint.consolidate.ConsolidatedTensors).

safetensors' own ``save_file`` takes every tensor of a file at once (and copies each to bytes before writing), so a
5 GB shard needs 10 GB of memory. The file format is simple enough to write in place instead: an 8-byte header
length, the JSON header (dtype, shape and byte range of every tensor), then the data. With the names, dtypes and
shapes known up front (the conversion run on meta tensors gives them, free), :class:`ShardedSafetensorsWriter`
writes every header first and each tensor's bytes at its offset when the conversion produces it. The bytes equal
``safetensors.torch.save_file``'s (tests/integration/test_hf_streaming.py checks that against the library).
"""

from __future__ import annotations

import json
import math
import os
import resource
import struct
from pathlib import Path

import torch

#: torch dtype -> safetensors' name.
SAFETENSORS_DTYPES = {torch.int64: "I64", torch.float64: "F64", torch.float32: "F32", torch.int32: "I32",
                      torch.bfloat16: "BF16", torch.float16: "F16", torch.int16: "I16", torch.int8: "I8",
                      torch.uint8: "U8", torch.bool: "BOOL"}
#: safetensors orders a file's tensors by dtype, in descending order of its Dtype enum (larger alignment first),
#: then by name; this is that order for the dtypes above (measured on safetensors 0.8: I64 before F64, BF16 before F16).
_DTYPE_RANK = {name: i for i, name in enumerate(["I64", "F64", "F32", "I32", "BF16", "F16", "I16", "I8", "U8", "BOOL"])}

Spec = tuple[torch.dtype, tuple[int, ...]]


def nbytes(spec: Spec) -> int:
    dtype, shape = spec
    return math.prod(shape) * dtype.itemsize


def safetensors_header(specs: dict[str, Spec], metadata: dict[str, str] | None) -> tuple[bytes, dict[str, int]]:
    """(the bytes before the data of a safetensors file holding ``specs``, each tensor's data offset from the
    start of the file), exactly as safetensors writes them: compact JSON padded with spaces to 8 bytes."""
    for name, (dtype, _) in specs.items():
        if dtype not in SAFETENSORS_DTYPES:
            raise ValueError(f"tensor {name}: dtype {dtype} has no safetensors name here")
    order = sorted(specs, key=lambda name: (_DTYPE_RANK[SAFETENSORS_DTYPES[specs[name][0]]], name))
    entries: dict[str, dict] = {"__metadata__": metadata} if metadata else {}
    offsets, offset = {}, 0
    for name in order:
        size = nbytes(specs[name])
        entries[name] = {"dtype": SAFETENSORS_DTYPES[specs[name][0]], "shape": list(specs[name][1]),
                         "data_offsets": [offset, offset + size]}
        offsets[name], offset = offset, offset + size
    text = json.dumps(entries, separators=(",", ":"), ensure_ascii=False).encode()
    text += b" " * (-len(text) % 8)
    start = 8 + len(text)
    return struct.pack("<Q", len(text)) + text, {name: start + o for name, o in offsets.items()}


def shard_names(specs: dict[str, Spec], max_shard_bytes: int) -> list[list[str]]:
    """Tensor names split into shards in their order, each at most ``max_shard_bytes`` unless one tensor alone is
    larger (transformers' save_pretrained rule)."""
    shards: list[list[str]] = [[]]
    size = 0
    for name, spec in specs.items():
        if shards[-1] and size + nbytes(spec) > max_shard_bytes:
            shards.append([])
            size = 0
        shards[-1].append(name)
        size += nbytes(spec)
    return shards


class ShardedSafetensorsWriter:
    """model.safetensors, or model-0000i-of-0000n.safetensors shards with model.safetensors.index.json, for the
    tensors ``specs`` announces (name -> (dtype, shape), in the order that decides the shards); ``write`` takes
    them one at a time in any order; ``close`` raises ValueError naming a tensor never written."""

    def __init__(self, specs: dict[str, Spec], output: Path, max_shard_bytes: int):
        self.specs, self.output = dict(specs), Path(output)
        for stale in [*self.output.glob("model*.safetensors"), self.output / "model.safetensors.index.json"]:
            stale.unlink(missing_ok=True)  # a re-export must not leave another shard count's files behind
        shards = shard_names(self.specs, max_shard_bytes)
        files = (["model.safetensors"] if len(shards) == 1 else
                 [f"model-{i:05d}-of-{len(shards):05d}.safetensors" for i in range(1, len(shards) + 1)])
        self.file_of, self.offset, self.handles = {}, {}, {}
        for file, names in zip(files, shards):
            header, offsets = safetensors_header({n: self.specs[n] for n in names}, {"format": "pt"})
            handle = open(self.output / file, "wb")  # noqa: SIM115 - closed in close()
            handle.write(header)
            handle.truncate(len(header) + sum(nbytes(self.specs[n]) for n in names))
            self.handles[file] = handle
            self.file_of.update(dict.fromkeys(names, file))
            self.offset.update(offsets)
        self.index = None if len(shards) == 1 else {
            "metadata": {"total_size": sum(nbytes(s) for s in self.specs.values())}, "weight_map": self.file_of}
        self.pending = set(self.specs)

    def write(self, name: str, tensor: torch.Tensor) -> None:
        """Write ``tensor``'s bytes at its place; its dtype and shape must be the announced ones."""
        if name not in self.pending:
            raise ValueError(f"tensor {name}: not announced, or written twice")
        if (tensor.dtype, tuple(tensor.shape)) != self.specs[name]:
            raise ValueError(f"tensor {name}: {tensor.dtype} {tuple(tensor.shape)}, announced as {self.specs[name]}")
        data = tensor.detach().to("cpu").contiguous().reshape(-1).view(torch.uint8)  # little-endian host order
        handle = self.handles[self.file_of[name]]
        handle.seek(self.offset[name])
        handle.write(data.numpy().data)
        self.pending.discard(name)

    def close(self) -> int:
        """Close the files and write the index (sharded); returns the number of safetensors files."""
        for handle in self.handles.values():
            handle.close()
        if self.pending:
            raise ValueError(f"tensor {sorted(self.pending)[0]} never written ({len(self.pending)} such)")
        if self.index is not None:
            (self.output / "model.safetensors.index.json").write_text(json.dumps(self.index, indent=2) + "\n")
        return len(self.handles)


# -- memory ---------------------------------------------------------------------------------------------------------

class PeakRSS:
    """This process's peak resident set size from now on (Linux: VmHWM after resetting it through
    /proc/self/clear_refs; elsewhere, or where that is refused, the lifetime peak from getrusage)."""

    def __init__(self):
        self.reset = False
        try:
            Path("/proc/self/clear_refs").write_text("5")  # 5: reset the peak RSS to the current RSS
            self.reset = True
        except OSError:
            pass
        self.start = self.current()

    @staticmethod
    def current() -> int:
        """Resident bytes now (0 where /proc is absent)."""
        try:
            return int(Path("/proc/self/statm").read_text().split()[1]) * os.sysconf("SC_PAGE_SIZE")
        except OSError:
            return 0

    def peak(self) -> int:
        """Peak resident bytes since construction (at least the current)."""
        if self.reset:
            for line in Path("/proc/self/status").read_text().splitlines():
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) * 1024
        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024

    def summary(self, weights_bytes: int) -> str:
        """"peak RSS X MB, Y MB above the start, for Z MB of weights"."""
        peak = self.peak()
        return (f"peak RSS {peak / 1e6:.0f} MB, {(peak - self.start) / 1e6:.0f} MB above its start, for "
                f"{weights_bytes / 1e6:.0f} MB of weights")
