"""A checkpoint in one process: its config, its whole model and its tokenizer (for eval, generate, finetune and
export).

Loads checkpoints saved with any tensor / pipeline / data-parallel layout and ZeRO stage 0-2 (stage 3 with
tensor = pipeline = 1): the shards are consolidated into the whole model (pretrain/checkpoint/consolidate.py).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import torch
import yaml

from pretrain import config as config_mod
from pretrain import device as device_layer
from pretrain import models
from pretrain.errors import CheckpointError
from pretrain.checkpoint.format import MARKER, complete_steps, read_marker, step_path
from pretrain.checkpoint.consolidate import ConsolidatedTensors, consolidated_state_dict, model_file
from pretrain.checkpoint.safe_load import load_checkpoint_file, safe_torch_load
from pretrain.config import Config


@dataclass
class LoadedModel:
    """A model ready for inference, with what produced it."""

    model: torch.nn.Module
    cfg: Config
    spec: models.ModelSpec
    device: torch.device
    path: Path


def resolve_checkpoint(path: str | Path) -> Path:
    """A complete step directory from a step directory, a checkpoints/ directory or a run directory."""
    path = Path(path)
    for root in (path, path / "checkpoints"):
        if (root / MARKER).is_file():
            return root
        steps = complete_steps(root)
        if steps:
            return step_path(root, steps[-1])
    raise CheckpointError(f"{path}: no complete checkpoint here (looked for COMMITTED in it and in step_* below)")


def read_config(path: Path) -> Config:
    """The run config saved next to a checkpoint's weights (config.yaml), without loading any weight."""
    try:
        return config_mod.from_dict(yaml.safe_load((path / "config.yaml").read_text()))
    except OSError as e:
        raise CheckpointError(f"{path}: no readable config.yaml ({e.strerror})") from None


def load_model(path: str | Path) -> LoadedModel:
    """Build the whole model in this process from the checkpoint's own config.yaml and load its weights,
    consolidated from whatever tensor / pipeline layout saved them (fp32 gathered under ZeRO-3)."""
    path = resolve_checkpoint(path)
    layout = read_marker(path)["layout"]
    cfg, spec, info, vocab_size = _prepare(path, layout)
    model = _build(cfg, spec, info, vocab_size).to(info.device)
    target = model.state_dict()
    if layout["zero_stage"] == 3:
        state = _zero3_state_dict(path, layout)
    else:
        state = consolidated_state_dict(path, layout, target, cfg.model.num_layers,
                                        gated_mlp=cfg.model.activation == "swiglu")
    model.load_state_dict(state, strict=False)  # strict=False: megatron's `_extra_state` entries are optional
    missing = [k for k in target if k not in state and not k.endswith("_extra_state")]
    if missing:
        raise CheckpointError(f"{path}: checkpoint lacks {len(missing)} model tensors, e.g. {missing[0]}")
    model.eval()
    return LoadedModel(model=model, cfg=cfg, spec=spec, device=info.device, path=path)


def model_skeleton(path: str | Path) -> LoadedModel:
    """The checkpoint's whole model built on the meta device: its names, shapes, dtype and megatron-core config,
    no memory for weights (the streaming export reads those one at a time with :func:`tensor_reader`)."""
    path = resolve_checkpoint(path)
    cfg, spec, info, vocab_size = _prepare(path, read_marker(path)["layout"])
    with torch.device("meta"):  # megatron-core allocates without a device argument on CPU (use_cpu_initialization)
        model = _build(cfg, spec, info, vocab_size)
    return LoadedModel(model=model.eval(), cfg=cfg, spec=spec, device=info.device, path=path)


def tensor_reader(loaded: LoadedModel) -> Callable[[str], torch.Tensor]:
    """``read(name)``: the whole model's tensor ``name`` (state-dict name, any saved layout) as a fresh CPU tensor
    of that tensor's dtype in ``loaded.model`` (the trained precision, as ``load_model`` holds it). Stages 0-2 read it alone from the memory-mapped per-rank files;
    ZeRO-3 (tensor = pipeline = 1) is gathered whole first by DeepSpeed's zero_to_fp32, the one layout that is
    not read one tensor at a time."""
    path = loaded.path
    layout = read_marker(path)["layout"]
    like = {name: t for name, t in loaded.model.state_dict().items()
            if torch.is_tensor(t) and not name.endswith("_extra_state")}
    if layout["zero_stage"] == 3:
        state = _zero3_state_dict(path, layout)

        def read(name: str) -> torch.Tensor:
            if name not in state:
                raise CheckpointError(f"{path}: checkpoint lacks model tensor {name}")
            return state.pop(name).to(like[name].dtype)
        return read
    tensors = ConsolidatedTensors(path, layout, {name: tuple(t.shape) for name, t in like.items()},
                                  loaded.cfg.model.num_layers, gated_mlp=loaded.cfg.model.activation == "swiglu")
    return lambda name: tensors.get(name).to(like[name].dtype)


def _prepare(path: Path, layout: dict) -> tuple[Config, models.ModelSpec, device_layer.DeviceInfo, int]:
    """(config for one process, model spec, device, padded vocabulary) of a checkpoint; a one-process group."""
    cfg = read_config(path)
    cfg.parallel = config_mod.ParallelConfig()  # inference runs unsharded in one process
    cfg.model.layer_spec = "auto"  # saved names do not depend on the spec: take what this machine can run
    _init_single_process(cfg)
    info = device_layer.detect(0, cfg.train.precision)
    return cfg, models.get(cfg.model.family), info, _vocab_size(path, layout)


def _build(cfg: Config, spec: models.ModelSpec, info: device_layer.DeviceInfo, vocab_size: int) -> torch.nn.Module:
    """The model in the trained precision throughout, as DeepSpeed's engine held it in training (module.bfloat16()):
    spec.build gives megatron-core's layers that dtype but torch's own (LayerNorm, learned positions) stay fp32, and
    a bf16 checkpoint's forward then failed in the first matmul of mixed dtypes."""
    model = spec.build(cfg.model, cfg.parallel, info.dtype, vocab_size, document_masks=cfg.data.reset_at_eos)
    return model.to(dtype=info.dtype)


def _vocab_size(path: Path, layout: dict) -> int:
    """The padded vocabulary the checkpoint was trained with: recorded in the marker's layout, else (older
    checkpoints) the rows of the first rank's word embedding times the tensor-parallel size."""
    if "vocab_size" in layout:
        return layout["vocab_size"]
    state = load_checkpoint_file(model_file(path, 0), map_location="cpu")["module"]
    rows = [v.shape[0] for k, v in state.items() if k.endswith("word_embeddings.weight")]
    if not rows:
        raise CheckpointError(f"{path}: cannot tell the vocabulary size (no word embedding in rank 0's model file)")
    return rows[0] * layout["tensor"]


def _init_single_process(cfg: Config) -> None:
    import torch.distributed as dist

    from pretrain.parallel import env
    from pretrain.parallel.dims import ParallelDims

    device_layer.apply_cpu_shims()
    if not dist.is_initialized():  # a one-process group of its own, even inside a launcher's environment
        env.init_distributed(device_layer.detect(0).backend, single_process=True)
        env.init_process_groups(ParallelDims(world_size=1), cfg.run.seed)


def _zero3_state_dict(path: Path, layout: dict) -> dict[str, torch.Tensor]:
    """ZeRO-3 partitions parameters across data-parallel ranks; DeepSpeed reassembles the fp32 weights (of one
    model-parallel rank: its tool does not join tensor-parallel shards)."""
    if layout["tensor"] != 1 or layout["pipeline"] != 1:
        raise CheckpointError(f"{path}: ZeRO-3 checkpoints load with tensor = pipeline = 1 only (saved with "
                              f"tensor={layout['tensor']} pipeline={layout['pipeline']})")
    from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint

    with safe_torch_load():  # it calls torch.load(weights_only=False) itself
        return get_fp32_state_dict_from_zero_checkpoint(str(path.parent), tag=path.name)


def tokenizer_for(loaded: LoadedModel):
    """The run's tokenizer: the copy in the run directory, else data.tokenizer from the config."""
    from data_pipeline.tokenizer import Tokenizer

    run_copy = loaded.path.parent.parent / "tokenizer.model"
    path = run_copy if run_copy.is_file() else Path(loaded.cfg.data.tokenizer)
    if not path.is_file():
        raise CheckpointError(f"{loaded.path}: tokenizer not found (looked at {run_copy} and data.tokenizer)")
    return Tokenizer(str(path))
