"""Loading a checkpoint into another parallel layout: tensor / pipeline / virtual pipeline / data size and ZeRO stage.

DeepSpeed reloads a checkpoint only into the layout that wrote it (and ZeRO >= 1 only at the same data-parallel
size). Here every parameter is read back as the whole model's tensor, by its global name, with its AdamW state:

- value: the fp32 master weight (ZeRO >= 1: from the flat optimizer partitions, not the low-precision module),
- exp_avg, exp_avg_sq and step: from the torch AdamW state (ZeRO-0, per parameter) or from the flat partitions
  (ZeRO-1/2: one contiguous flat buffer per group split over the DP ranks; ZeRO-3: every parameter split over
  the DP ranks on its own), cut out with the same offsets as the fp32 weights;

then cut into this rank's tensor-parallel shard (models/init.py ``tp_shard``) and set into the new DeepSpeed engine:
the parameter and the torch AdamW state (ZeRO-0), or the fp32 partition and its optimizer state through
DeepSpeed's own ``safe_set_full_*`` (ZeRO 1-3), the low-precision weights following from the fp32 ones.

Reading is lazy: files are memory-mapped (``safe_load.load_checkpoint_file(mmap=True)``, weights only) and only
the parameters this rank holds are materialised, one at a time. A rank reads the old pipeline stages that held its
layers (all their tensor-parallel and DP files), and further stages only for the names still missing (embedding,
final norm, output layer).
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import torch
from megatron.core import parallel_state

from pretrain.checkpoint.consolidate import global_layer_name, join_tp_shards, model_file
from pretrain.checkpoint.safe_load import load_checkpoint_file
from pretrain.errors import CheckpointError
from pretrain.models.init import tp_shard, full_model_name
from pretrain.models.layer_names import canonical_name, layer_index

logger = logging.getLogger(__name__)
_STATE_KEYS = ("exp_avg", "exp_avg_sq")


@dataclass
class Saved:
    """One parameter's fp32 value, AdamW moments and step (None: no optimizer state), as one old rank saved it
    or as this rank gets it."""

    value: torch.Tensor
    exp_avg: torch.Tensor | None
    exp_avg_sq: torch.Tensor | None
    step: float | None = None


@dataclass
class _Entry:
    """A saved parameter not read yet: its AdamW step (None without state) and the loader of its tensors."""

    step: float | None
    load: Callable[[], Saved]


@dataclass
class _Target:
    """One parameter of this rank's model chunks, by its global name (ZeRO-3 keeps the shape in ``ds_shape``)."""

    name: str
    param: torch.nn.Parameter
    gated: bool  # a gated MLP's first layer: [gate; up] per TP rank

    @property
    def local_shape(self) -> tuple[int, ...]:
        return tuple(getattr(self.param, "ds_shape", self.param.shape))

    def full_shape(self, tp_size: int) -> tuple[int, ...]:
        shape = list(self.local_shape)
        if getattr(self.param, "tensor_model_parallel", False):
            shape[self.param.partition_dim] *= tp_size
        return tuple(shape)


def load_resharded(path: Path, saved_layout: dict, engine, num_layers: int, gated_mlp: bool) -> None:
    """Collective on every rank of the new layout: set this rank's parameters (ZeRO fp32 master copies
    included) and AdamW state from the checkpoint at ``path``, saved with ``saved_layout``.

    ``saved_layout`` is the commit marker's "layout"; ``engine`` a pretrain.parallel.engine.TrainEngine of the
    new layout (``engine.engine`` DeepSpeed's, ``engine.chunks`` this rank's model chunks). Raises a one-line
    CheckpointError naming the file or tensor that does not fit this model.
    """
    path = Path(path)
    tp_rank = parallel_state.get_tensor_model_parallel_rank()
    tp_size = parallel_state.get_tensor_model_parallel_world_size()
    targets = [_Target(full_model_name(chunk, local), param, gated_mlp and "linear_fc1" in local)
               for chunk in engine.chunks for local, param in chunk.named_parameters() if param.requires_grad]
    tied = any(getattr(c, "share_embeddings_and_output_weights", False) for c in engine.chunks)
    new_vocab = next((c.vocab_size for c in engine.chunks if hasattr(c, "vocab_size")), None)
    resize = saved_layout.get("vocab_size") != new_vocab and new_vocab is not None
    # With the same TP size (and vocabulary padding) each rank reads its own old shard: nothing to join or cut.
    same_tp = saved_layout["tensor"] == tp_size and not resize
    old_tp_ranks = [tp_rank] if same_tp else list(range(saved_layout["tensor"]))
    entries, counters = _read_needed(path, saved_layout, {t.name for t in targets}, num_layers, old_tp_ranks, tied)

    def local(target: _Target) -> Saved:
        """This rank's shard of ``target``: the old TP shards joined, then cut for the new TP rank."""
        parts = [entry.load() for entry in entries[target.name]]
        tensors = []
        for field in ("value", *_STATE_KEYS):
            shards = [getattr(part, field) for part in parts]
            if any(shard is None for shard in shards):
                tensors.append(None)
                continue
            shape = target.local_shape if same_tp else target.full_shape(tp_size)
            whole = _fit(target, shards, shape, resize, path)
            tensors.append(whole if same_tp else tp_shard(whole, target.param, tp_rank, tp_size, target.gated))
        return Saved(*tensors, step=entries[target.name][0].step)

    _apply(engine.engine, targets, local, {entries[t.name][0].step for t in targets}, path)
    ds = engine.engine
    ds.global_steps, ds.global_samples, ds.skipped_steps = counters
    if torch.distributed.get_rank() == 0:
        note = (f"; padded vocabulary {saved_layout.get('vocab_size')} -> {new_vocab}: common rows copied, "
                "the others zeroed (weights and AdamW state)" if resize else "")
        logger.info("resharded %s from layout %s into this run's%s", path, saved_layout, note)


def _fit(target: _Target, parts: list[torch.Tensor], shape: tuple[int, ...], resize: bool,
         path: Path) -> torch.Tensor:
    """The tensor of ``shape`` from the old TP ``parts``; vocabulary rows padded or cut where the padded
    vocabulary size differs between the layouts (it is a multiple of tensor x make_vocab_size_divisible_by)."""
    vocab_sized = resize and getattr(target.param, "partition_dim", None) == 0 and (
        "word_embeddings" in target.name or target.name.startswith("output_layer"))
    if not vocab_sized:
        whole = join_tp_shards(target.name, parts, shape, target.gated and len(parts) > 1, path)
        if tuple(whole.shape) != tuple(shape):
            raise CheckpointError(f"{path}: {target.name} is {tuple(whole.shape)} in the checkpoint, the model's "
                                  f"is {tuple(shape)} (saved by another model?)")
        return whole
    whole = torch.cat(parts, dim=0)  # [old padded vocab, ...]
    if whole.shape[1:] != shape[1:]:
        raise CheckpointError(f"{path}: {target.name} is {tuple(whole.shape)} in the checkpoint, the model's is "
                              f"{shape} (saved by another model?)")
    out = whole.new_zeros(shape)
    common = min(shape[0], whole.shape[0])
    out[:common] = whole[:common]
    return out


# -- reading the old layout ---------------------------------------------------------------------------------------

def _read_needed(path: Path, layout: dict, needed: set[str], num_layers: int, old_tp_ranks: list[int],
                 tied: bool) -> tuple[dict[str, list[_Entry]], tuple[int, int, int]]:
    """{global name: one entry per old TP rank in ``old_tp_ranks``} for every name in ``needed``, and DeepSpeed's
    counters (global steps, samples, skipped steps)."""
    tp, pp = layout["tensor"], layout["pipeline"]
    vpp = layout.get("virtual_pipeline", 1) if pp > 1 else 1
    per_chunk = num_layers // (pp * vpp)
    mine = {(index // per_chunk) % pp for name in needed if (index := layer_index(name)) is not None}
    order = list(dict.fromkeys([*sorted(mine), 0, pp - 1, *range(pp)]))
    found: dict[str, list[_Entry]] = {}
    counters = None
    for p in order:
        if needed <= found.keys():
            break
        for i, t in enumerate(old_tp_ranks):
            entries, counters = _read_mp_rank(path, layout, t + tp * p)
            for key, entry in entries.items():
                chunk, key = (int(key.split(".", 1)[0]), key.split(".", 1)[1]) if pp > 1 else (0, key)
                name = global_layer_name(key, (chunk * pp + p) * per_chunk)
                if tied and name == "output_layer.weight":  # a last stage's copy of the tied embedding
                    name = "embedding.word_embeddings.weight"
                if name in needed:
                    found.setdefault(name, [None] * len(old_tp_ranks))[i] = entry
    missing = sorted(n for n in needed if n not in found or None in found[n])
    if missing:
        raise CheckpointError(f"{path}: no {missing[0]} in the checkpoint (saved by another model?)")
    return found, counters


def _load(file: Path) -> dict:
    if not file.is_file():
        raise CheckpointError(f"{file}: missing file of this checkpoint's layout")
    return load_checkpoint_file(file, map_location="cpu", mmap=True)


def _read_mp_rank(path: Path, layout: dict, mp: int) -> tuple[dict[str, _Entry], tuple[int, int, int]]:
    """Every parameter saved by model-parallel rank ``mp`` (all its DP partitions), by its saved name."""
    stage, dp = layout["zero_stage"], layout["data"]
    model = _load(model_file(path, mp) if stage < 3 else path / f"zero_pp_rank_0_mp_rank_{mp:02d}_model_states.pt")
    counters = (model.get("global_steps", 0), model.get("global_samples", 0), model.get("skipped_steps", 0))
    if stage == 0:
        return _zero0_entries(model, model_file(path, mp)), counters
    # DeepSpeed prefixes the optimizer files "bf16_" in bf16 runs
    prefix = "bf16_" if (path / f"bf16_zero_pp_rank_0_mp_rank_{mp:02d}_optim_states.pt").is_file() else ""
    optim = [_load(path / f"{prefix}zero_pp_rank_{d}_mp_rank_{mp:02d}_optim_states.pt")["optimizer_state_dict"]
             for d in range(dp)]
    count = optim[0].get("partition_count")
    if (max(count) if isinstance(count, list) else count) != dp:
        raise CheckpointError(f"{path}: optimizer files of mp rank {mp} are partitioned {count} ways, the "
                              f"layout says data {dp}")
    reader = _zero3_entries if stage == 3 else _zero12_entries
    return reader(model["param_shapes"], optim), counters


def _zero0_entries(model: dict, file: Path) -> dict[str, _Entry]:
    """ZeRO-0: weights in "module"; the torch AdamW state_dict numbers the parameters group by group, in
    pretrain/optim.py's order: matrices (decay) first, then vectors (no decay), each in named_parameters order.
    In bf16 DeepSpeed's FP16_UnfusedOptimizer wraps AdamW and keeps one fp32 master per parameter, in that order."""
    module, buffers = model["module"], set(model.get("buffer_names") or [])
    names = [k for k, v in module.items() if torch.is_tensor(v) and k not in buffers]
    ordered = [n for n in names if module[n].ndim >= 2] + [n for n in names if module[n].ndim < 2]
    optimizer = model.get("optimizer") or {}
    masters = [m for group in optimizer.get("fp32_groups", []) for m in group]
    adamw = optimizer.get("optimizer_state_dict", optimizer)
    if "state" not in adamw or (masters and len(masters) != len(ordered)):
        raise CheckpointError(f"{file}: no AdamW state (with fp32 masters in bf16) under 'optimizer'")
    ids = [i for group in adamw["param_groups"] for i in group["params"]]
    if len(ids) != len(ordered):
        raise CheckpointError(f"{file}: {len(ids)} parameters in the optimizer state, {len(ordered)} in the model")
    entries = {}
    for i, (pid, name) in enumerate(zip(ids, ordered)):
        state = adamw["state"].get(pid, {})
        value = (lambda i=i: masters[i]) if masters else (lambda n=name: module[n].float())
        entries[canonical_name(name)] = _Entry(float(state["step"]) if "step" in state else None, lambda v=value, s=state: Saved(
            v(), *(s[k] if k in s else None for k in _STATE_KEYS)))
    return entries


def _slice(flats: list[torch.Tensor], start: int, numel: int) -> torch.Tensor:
    """Elements [start, start + numel) of the concatenation of ``flats`` (equal-size DP partitions), reading only
    the partitions they fall in."""
    size, pieces = flats[0].numel(), []
    while numel > 0:
        rank, offset = divmod(start, size)
        take = min(numel, size - offset)
        pieces.append(flats[rank][offset:offset + take])
        start, numel = start + take, numel - take
    return torch.cat(pieces) if len(pieces) > 1 else pieces[0].clone()


def _zero12_entries(param_shapes: list[dict], optim: list[dict]) -> dict[str, _Entry]:
    """ZeRO-1/2: per group, the parameters lie one after another (plus alignment padding) in one flat buffer cut
    into equal DP partitions; fp32 weights and each AdamW moment are flat buffers alike (as zero_to_fp32 reads)."""
    paddings = optim[0].get("param_alignment_paddings")
    entries = {}
    for i, shapes in enumerate(param_shapes):
        flats = {"value": [o["single_partition_of_fp32_groups"][i] for o in optim]}
        state = [o["base_optimizer_state"]["state"].get(i, {}) for o in optim]
        flats.update({k: [s[k] for s in state] for k in _STATE_KEYS if k in state[0]})
        step = float(state[0]["step"]) if "step" in state[0] else None
        offset = 0
        for j, (name, shape) in enumerate(shapes.items()):
            numel = math.prod(shape)
            entries[canonical_name(name)] = _Entry(step, lambda f=flats, o=offset, n=numel, s=shape: Saved(
                *(_slice(f[k], o, n).view(s) if k in f else None for k in ("value", *_STATE_KEYS))))
            offset += numel + (paddings[i][j] if paddings else 0)
    return entries


def _zero3_entries(param_shapes: list[dict], optim: list[dict]) -> dict[str, _Entry]:
    """ZeRO-3: every parameter is padded to a multiple of the DP size and split evenly; rank r's flat groups hold
    its piece of each parameter in turn (zero_to_fp32's GatheredTensor puts the pieces back together)."""
    from deepspeed.utils.zero_to_fp32 import GatheredTensor, zero3_partitioned_param_info

    dp = len(optim)
    flats = {"value": [o["fp32_flat_groups"] for o in optim]}
    state = [o["optimizer_state_dict"]["state"] for o in optim]
    groups = len(flats["value"][0])
    for key in _STATE_KEYS:
        if all(key in state[0].get(g, {}) for g in range(groups)):
            flats[key] = [[s[g][key] for g in range(groups)] for s in state]
    steps = [float(state[0][g]["step"]) if "step" in state[0].get(g, {}) else None for g in range(groups)]
    bounds = [0] + list(torch.tensor([f.numel() for f in flats["value"][0]]).cumsum(0).tolist())
    entries, offset = {}, 0
    for name, shape in ((n, torch.Size(s)) for group in param_shapes for n, s in group.items()):
        piece, _ = zero3_partitioned_param_info(shape.numel(), dp)
        group = max(g for g in range(groups) if bounds[g] <= offset)
        entries[canonical_name(name)] = _Entry(steps[group], lambda o=offset, p=piece, s=shape: Saved(
            *(GatheredTensor(flats[k], bounds, o, p, s).contiguous() if k in flats else None
              for k in ("value", *_STATE_KEYS))))
        offset += piece
    return entries


# -- setting the new engine ---------------------------------------------------------------------------------------

def _apply(ds_engine, targets: list[_Target], local: Callable[[_Target], Saved], steps: set, path: Path) -> None:
    """Set weights and AdamW state into DeepSpeed's engine, per its optimizer's kind."""
    optimizer, stage = ds_engine.optimizer, ds_engine.zero_optimization_stage()
    if stage == 0 and isinstance(optimizer, torch.optim.Optimizer):  # fp32: our AdamW itself
        return _apply_torch(optimizer, targets, local, {})
    if stage == 0 and hasattr(optimizer, "fp32_groups"):  # bf16: FP16_UnfusedOptimizer, fp32 master per param
        masters = {id(lp): master for lps, fp32s in zip(optimizer.fp16_groups, optimizer.fp32_groups)
                   for lp, master in zip(lps, fp32s)}
        return _apply_torch(optimizer.optimizer, targets, local, masters)
    if len(steps - {None}) > 1:  # one flat partition has one step count
        raise CheckpointError(f"{path}: parameters saved at different optimizer steps {sorted(steps - {None})}")
    step = next(iter(steps - {None}), None)
    if stage in (1, 2) and hasattr(optimizer, "single_partition_of_fp32_groups"):
        return _apply_zero12(optimizer, targets, local, step)
    if stage == 3:
        return _apply_zero3(optimizer, targets, local, step)
    raise CheckpointError(f"{path}: cannot load into DeepSpeed's {type(optimizer).__name__} (ZeRO-{stage})")


def _apply_torch(optimizer: torch.optim.Optimizer, targets: list[_Target], local,
                 masters: dict[int, torch.Tensor]) -> None:
    """ZeRO-0: AdamW's state is per parameter, keyed by the model's parameter (fp32) or by its fp32 master
    (``masters``: id of the bf16 parameter -> master)."""
    group_of = {id(p): g for g in optimizer.param_groups for p in g["params"]}
    for target in targets:
        saved, param = local(target), target.param
        master = masters.get(id(param), param)
        with torch.no_grad():
            param.copy_(saved.value)
            master.copy_(saved.value)
        optimizer.state.pop(master, None)
        if saved.exp_avg is None or saved.step is None:
            continue  # no state saved (the parameter never had a gradient): AdamW starts it at its first step
        group = group_of[id(master)]
        on_device = group.get("capturable") or group.get("fused")  # torch keeps `step` on the device then
        optimizer.state[master] = {
            "step": torch.tensor(saved.step, dtype=torch.float32, device=master.device if on_device else "cpu"),
            "exp_avg": saved.exp_avg.to(master).contiguous(), "exp_avg_sq": saved.exp_avg_sq.to(master).contiguous()}


def _flat_states(optimizer: torch.optim.Optimizer, flats: list[torch.Tensor], step: float | None) -> None:
    """AdamW state for DeepSpeed's flat fp32 partitions, zeros until the parameters' slices are set (torch
    creates it only at the first step; DeepSpeed's load does the same through load_state_dict)."""
    # torch keeps `step` on the parameters' device for fused (CUDA) and capturable AdamW, else on the CPU
    on_device = any(g.get("fused") or g.get("capturable") for g in optimizer.param_groups)
    for flat in flats:
        optimizer.state[flat] = {
            "step": torch.tensor(float(step or 0), dtype=torch.float32, device=flat.device if on_device else "cpu"),
            "exp_avg": torch.zeros_like(flat), "exp_avg_sq": torch.zeros_like(flat)}


def _set_full(param: torch.nn.Parameter, saved: Saved) -> None:
    from deepspeed.utils import safe_set_full_fp32_param, safe_set_full_optimizer_state

    safe_set_full_fp32_param(param, saved.value.to(param.device))
    for key in _STATE_KEYS:
        value = getattr(saved, key)
        safe_set_full_optimizer_state(param, (torch.zeros_like(saved.value) if value is None else value)
                                      .to(param.device), key)


def _apply_zero12(optimizer, targets: list[_Target], local, step: float | None) -> None:
    """ZeRO-1/2: each rank holds the whole low-precision parameter and its slice of the fp32 flat partition;
    DeepSpeed's hp mapping (``safe_set_full_*``) writes the slice this rank owns."""
    _flat_states(optimizer.optimizer, optimizer.single_partition_of_fp32_groups, step)
    optimizer._hp_optimizer_states_linked = False
    optimizer._lazy_init_hp_params_optimizer_state()  # link each parameter's fragment to the new state
    for target in targets:
        saved = local(target)
        with torch.no_grad():
            target.param.copy_(saved.value)
        _set_full(target.param, saved)


def _apply_zero3(optimizer, targets: list[_Target], local, step: float | None) -> None:
    """ZeRO-3: set the fp32 partitions and their state, then the low-precision partitions from them and
    re-gather the persistent parameters, as DeepSpeed's own load does (checkpoint_event_prologue/epilogue)."""
    optimizer.checkpoint_event_prologue()
    _flat_states(optimizer.optimizer, optimizer.fp32_partitioned_groups_flat, step)
    for target in targets:
        _set_full(target.param, local(target))
    for sub_group in range(len(optimizer.fp16_groups)):
        optimizer._reassign_or_swap_out_partitioned_parameters(sub_group)
    optimizer.checkpoint_event_epilogue()
