"""Parameter names that do not depend on the layer spec, so a checkpoint saved with Transformer Engine's fused
layers (GPU) loads into megatron-core's local layers (CPU) and back.

The two specs hold the same parameters under different names: TE fuses each pre-norm into the linear after it,
so the local ``input_layernorm.weight`` is TE's ``self_attention.linear_qkv.layer_norm_weight`` and
``pre_mlp_layernorm.weight`` is ``mlp.linear_fc1.layer_norm_weight`` (biases alike). The correspondence is
megatron-core's own: the local spec's ``sharded_state_dict_keys_map``, which its dist_checkpointing uses for the
same purpose. TE modules also save an ``_extra_state`` (FP8 scaling metadata); we never train in FP8, so it holds
nothing a checkpoint needs and is not saved.

On disk every parameter has its canonical (local-spec) name, in the model's own order: hooks on each model chunk
rename at ``state_dict()`` and ``load_state_dict()``, so DeepSpeed's engine files, consolidation, resharding and
export all see one naming whatever spec trained the model.
"""

from __future__ import annotations

import functools
import re

import torch

EXTRA_STATE = "_extra_state"

#: A transformer layer's number inside a parameter name, ``<prefix>layers.<index>.<rest>``, the prefix empty or
#: ending in "." (``decoder.``, ``encoder.``, ``module.decoder.``): the one pattern that layout-independent init,
#: consolidation and resharding read and rewrite layer numbers with.
LAYER = re.compile(r"(?P<prefix>(?:.*?\.)?)layers\.(?P<index>\d+)\.")


def layer_index(name: str) -> int | None:
    """The layer number in ``name`` (e.g. 3 in ``decoder.layers.3.mlp.linear_fc1.weight``); None outside layers."""
    match = LAYER.match(name)
    return int(match["index"]) if match else None


def with_layer_index(name: str, index: int) -> str:
    """``name`` with its layer number replaced by ``index`` (``name`` must be a layer's)."""
    match = LAYER.match(name)
    return f"{match['prefix']}layers.{index}.{name[match.end():]}"


@functools.lru_cache(maxsize=1)
def _te_to_canonical() -> tuple[tuple[re.Pattern, str], ...]:
    from megatron.core.models.gpt.gpt_layer_specs import get_gpt_layer_local_spec

    keys_map = get_gpt_layer_local_spec().submodules.sharded_state_dict_keys_map  # local prefix -> TE prefix
    return tuple((re.compile(r"(^|\.)" + re.escape(te)), local) for local, te in keys_map.items())


def canonical_name(name: str) -> str:
    """``name`` (a parameter's state-dict key, any prefix) with TE's fused-norm names replaced by the local
    spec's, e.g. ``decoder.layers.3.self_attention.linear_qkv.layer_norm_bias`` ->
    ``decoder.layers.3.input_layernorm.bias``; other names unchanged."""
    for pattern, local in _te_to_canonical():
        name, found = pattern.subn(lambda m: m.group(1) + local, name, count=1)
        if found:
            return name
    return name


def _rename_in_place(state_dict: dict, prefix: str, rename) -> None:
    """Apply ``rename(name) -> name | None`` (None drops) to the keys under ``prefix``, keeping the dict's order:
    the order of a ZeRO-0 checkpoint's weights is the order of its optimizer state (pretrain/checkpoint/reshard)."""
    items = list(state_dict.items())
    state_dict.clear()
    for key, value in items:
        if key.startswith(prefix):
            name = rename(key[len(prefix):])
            if name is None:
                continue
            key = prefix + name
        state_dict[key] = value


def install_canonical_names(model: torch.nn.Module) -> torch.nn.Module:
    """Make ``model`` (one chunk) save its parameters under canonical names and load canonical or TE-named ones
    (older GPU checkpoints); returns ``model``. The hooks fire under any parent (a ModuleList of chunks, DeepSpeed's
    engine) because they are the chunk's own."""
    own = list(model.state_dict().keys())  # before the hooks: this spec's names
    by_canonical = {canonical_name(k): k for k in own if not k.endswith(EXTRA_STATE)}
    extra = [k for k in own if k.endswith(EXTRA_STATE)]
    # The local spec's names are canonical already: only its loading maps (TE names of older checkpoints).
    spec_names = bool(extra) or any(k != v for k, v in by_canonical.items())

    def save_hook(module, state_dict, prefix, local_metadata):
        if spec_names:
            _rename_in_place(state_dict, prefix,
                             lambda name: None if name.endswith(EXTRA_STATE) else canonical_name(name))

    def load_pre_hook(module, state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys,
                      error_msgs):
        def rename(name: str) -> str | None:
            if name.endswith(EXTRA_STATE):
                return name if name in extra else None
            return by_canonical.get(canonical_name(name), name)

        _rename_in_place(state_dict, prefix, rename)
        for name in extra:  # not on disk: each TE module takes back what it holds now (no FP8 history)
            if prefix + name not in state_dict:
                owner = name[: -len(EXTRA_STATE)].rstrip(".")
                state_dict[prefix + name] = model.get_submodule(owner).get_extra_state()

    model._register_state_dict_hook(save_hook)
    model.register_load_state_dict_pre_hook(load_pre_hook)
    return model
