"""The on-disk format of a checkpoint directory, read and written without a process group: the commit marker
(written last, so a directory without one never counts), ``latest``, step directory names, and the checks of a
checkpoint against the run that wants to load it. The bottom of pretrain.checkpoint.

Layout of one checkpoint::

    step_<N>/
      mp_rank_XX_model_states.pt, zero_pp_rank_*_optim_states.pt   DeepSpeed engine (model + ZeRO optimizer)
      train_state_rank<R>.pt                                       per rank: counters, data position, RNG states
      config.yaml                                                  the resolved run config
      COMMITTED                                                    JSON marker, written last by rank 0
    latest                                                         text: name of the newest complete checkpoint

The marker holds the step, the world size, the layout and each file's size and sha256.
"""

from __future__ import annotations

import json
import os
import re
from pathlib import Path
from typing import Any

from pretrain.config import ModelConfig
from pretrain.errors import CheckpointError

MARKER = "COMMITTED"
LATEST = "latest"
STEP_DIR = re.compile(r"^step_(\d+)$")
#: Layout keys that DeepSpeed's own loader needs unchanged, with their value in markers written before the key
#: existed; any difference goes through resharding, which matches parameters by name. The layer spec is one:
#: Transformer Engine's and the local layers save the same names (pretrain/models/layer_names.py) but may order
#: parameters differently, and DeepSpeed matches optimizer state by position.
RESHARD_KEYS = {"tensor": 1, "pipeline": 1, "virtual_pipeline": 1, "data": 1, "zero_stage": 1,
                "layer_spec": "local"}


def step_path(root: str | Path, step: int) -> Path:
    """The directory of step ``step``'s checkpoint under ``root``."""
    return Path(root) / f"step_{step}"


def complete_steps(root: str | Path) -> list[int]:
    """Steps under ``root`` whose checkpoint has its commit marker, ascending (contents not verified)."""
    root = Path(root)
    if not root.is_dir():
        return []
    steps = [int(m.group(1)) for p in root.iterdir() if (m := STEP_DIR.match(p.name))]
    return sorted(s for s in steps if (step_path(root, s) / MARKER).is_file())


def atomic_write(path: Path, text: str) -> None:
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(text)
    os.replace(tmp, path)  # atomic on POSIX: readers see the old or the new file, never half of one


def layout_changes(saved: dict, layout: dict) -> list[str]:
    """The RESHARD_KEYS in which a checkpoint's layout (``saved``, its marker's) differs from this run's
    ``layout``, as "key old->new"; empty when DeepSpeed can load the checkpoint itself."""
    return [f"{k} {saved.get(k, old)}->{layout.get(k, old)}" for k, old in RESHARD_KEYS.items()
            if saved.get(k, old) != layout.get(k, old)]


def read_marker(path: str | Path) -> dict[str, Any]:
    """The commit marker of a checkpoint directory; a one-line CheckpointError if it is absent or unreadable."""
    marker = Path(path) / MARKER
    if not marker.is_file():
        raise CheckpointError(f"{path}: not a complete checkpoint (no {MARKER} marker)")
    try:
        return json.loads(marker.read_text())
    except json.JSONDecodeError as e:
        raise CheckpointError(f"{marker}: unreadable commit marker ({e})") from None


#: Model fields that decide parameter shapes: a checkpoint loads only into a config that agrees on all of them.
SHAPE_FIELDS = ("family", "num_layers", "hidden_size", "num_attention_heads", "ffn_hidden_size", "activation",
                "position_embedding", "tie_embeddings", "nsp", "untie_r", "normalization", "num_query_groups",
                "add_bias_linear")


def check_model_fits(path: Path, model: ModelConfig, saved_layout: dict, layout: dict) -> None:
    """Refuse, in one line, a checkpoint whose model (its config.yaml and layout) has other parameter shapes than
    ``model`` (the padded vocabulary may differ with the tensor size: resharding copies the common rows)."""
    import yaml

    saved = (yaml.safe_load((path / "config.yaml").read_text()) or {}).get("model", {})
    fields = SHAPE_FIELDS + (("seq_length",) if model.position_embedding == "learned_absolute" else ())
    for key in fields:  # learned positions have one row per position; rope and relative ones have none
        if key in saved and saved[key] != getattr(model, key):
            raise CheckpointError(f"{path}: model.{key} is {saved[key]!r} in the checkpoint and "
                                  f"{getattr(model, key)!r} in this config; it does not fit this model")
    key = "tokenizer_vocab_size" if saved_layout.get("tensor") != layout.get("tensor") else "vocab_size"
    if key in saved_layout and key in layout and saved_layout[key] != layout[key]:
        raise CheckpointError(f"{path}: vocabulary of {saved_layout[key]} in the checkpoint and {layout[key]} in "
                              "this run (another tokenizer or model.vocab_size?); it does not fit this model")
