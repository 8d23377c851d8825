"""GPT layer specs: which one is chosen (and why), checkpoint names that do not depend on it, exact GeLU.

No Transformer Engine installs on these machines, so the TE side is built from megatron-core's own TE spec
(``get_gpt_layer_with_transformer_engine_spec``: where the norms live, which modules fuse them) with CPU stand-ins
for TE's modules in place of its ``TESpecProvider``; the stand-ins name their fused norm parameters as megatron-core
says TE does (the local spec's ``sharded_state_dict_keys_map``). tests/gpu/test_gpu_te.py does the same round trip
with the real TE on a GPU.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from pretrain.errors import ConfigError
from pretrain.config import ModelConfig, ParallelConfig
from pretrain.models import gpt
from pretrain.models.attention import SDPAttention
from pretrain.models.init import init_weights

CFG = ModelConfig(num_layers=2, hidden_size=32, num_attention_heads=2, seq_length=16)
VOCAB = 128


# -- choosing the spec -------------------------------------------------------------------------------------------


def test_auto_falls_back_to_local_for_any_te_failure_and_says_why():
    # On this machine megatron-core's TE spec raises NameError (TESpecProvider is undefined without TE), which
    # an `except ImportError` does not catch.
    with pytest.raises(NameError):
        gpt._te_layer_spec()
    name, why = gpt.choose_layer_spec("auto", on_cuda=True, document_masks=False)
    assert name == gpt.LOCAL and "Transformer Engine unusable (NameError" in why
    assert gpt.choose_layer_spec("auto", on_cuda=False, document_masks=False) == (gpt.LOCAL, "no CUDA")
    assert gpt.choose_layer_spec("local", on_cuda=True, document_masks=True)[0] == gpt.LOCAL


def test_per_document_masks_never_go_to_te_silently():
    name, why = gpt.choose_layer_spec("auto", on_cuda=True, document_masks=True)
    assert name == gpt.LOCAL and "data.reset_at_eos" in why


@pytest.mark.parametrize("on_cuda, masks, needle", [(True, True, "data.reset_at_eos"), (False, False, "CUDA"),
                                                   (True, False, "NameError")])
def test_required_te_that_cannot_be_used_is_a_one_line_error(on_cuda, masks, needle):
    with pytest.raises(ConfigError) as info:
        gpt.choose_layer_spec("transformer_engine", on_cuda=on_cuda, document_masks=masks)
    message = str(info.value)
    assert message.startswith("model.layer_spec") and needle in message and "\n" not in message


def test_build_logs_the_chosen_spec(mcore_world1, caplog):
    gpt._logged.clear()
    with caplog.at_level("DEBUG", logger="pretrain.models.gpt"):
        model = gpt.build(CFG, ParallelConfig(), torch.float32, VOCAB, document_masks=True)
    assert model.layer_spec_name == gpt.LOCAL
    assert "GPT layers: local spec (data.reset_at_eos" in caplog.text


# -- exact GeLU on CUDA ------------------------------------------------------------------------------------------


def test_gelu_stays_exact_on_cuda_and_only_gelu_tanh_fuses():
    from megatron.core.fusions.fused_bias_gelu import bias_gelu_impl

    x, bias = torch.randn(64, 8), torch.randn(8)
    # megatron-core's fused bias-GeLU, chosen by `activation_func is F.gelu`, is the tanh approximation:
    fused = bias_gelu_impl(x, bias)
    torch.testing.assert_close(fused, F.gelu(x + bias, approximate="tanh"))
    assert not torch.allclose(fused, F.gelu(x + bias), atol=1e-6)
    for activation, fusion, func in [("gelu", False, F.gelu), ("gelu_tanh", True, F.gelu), ("swiglu", True, F.silu)]:
        tc = gpt.transformer_config(ModelConfig(activation=activation), ParallelConfig(), torch.bfloat16,
                                    on_cuda=True)
        assert (tc.bias_activation_fusion, tc.activation_func) == (fusion, func), activation
    cpu = gpt.transformer_config(ModelConfig(activation="gelu_tanh"), ParallelConfig(), torch.float32, on_cuda=False)
    assert cpu.bias_activation_fusion is False
    torch.testing.assert_close(cpu.activation_func(x), F.gelu(x, approximate="tanh"))


# -- spec-independent checkpoint names ---------------------------------------------------------------------------


def _te_norm_prefix() -> str:
    """What TE calls a fused norm's parameters, per megatron-core (e.g. ``layer_norm_`` + ``weight``)."""
    from megatron.core.models.gpt.gpt_layer_specs import get_gpt_layer_local_spec

    prefixes = {te.rsplit(".", 1)[1] for te in
                get_gpt_layer_local_spec().submodules.sharded_state_dict_keys_map.values()}
    assert len(prefixes) == 1, prefixes
    return prefixes.pop()


def _te_spec(monkeypatch):
    """megatron-core's TE layer spec with CPU stand-ins for TE's modules."""
    from megatron.core.models import backends
    from megatron.core.models.gpt import gpt_layer_specs
    from megatron.core.tensor_parallel import ColumnParallelLinear

    norm = _te_norm_prefix()

    class LayerNormColumnParallelLinear(ColumnParallelLinear):
        """TE's LayerNormLinear in CPU terms: a LayerNorm whose parameters the linear owns, then the linear."""

        def __init__(self, input_size, *args, **kwargs):
            super().__init__(input_size, *args, **kwargs)
            self.register_parameter(norm + "weight", torch.nn.Parameter(torch.ones(input_size)))
            self.register_parameter(norm + "bias", torch.nn.Parameter(torch.zeros(input_size)))
            self.extra_loaded = None

        def forward(self, x):
            x = F.layer_norm(x, x.shape[-1:], getattr(self, norm + "weight"), getattr(self, norm + "bias"),
                             self.config.layernorm_epsilon)
            return super().forward(x)

        def get_extra_state(self):  # TE keeps FP8 metadata here
            return torch.tensor([len(self.weight)], dtype=torch.int64)

        def set_extra_state(self, state):
            self.extra_loaded = state

    class StandInTESpecProvider(backends.LocalSpecProvider):
        def fuse_layernorm_and_linear(self) -> bool:
            return True

        def column_parallel_layer_norm_linear(self):
            return LayerNormColumnParallelLinear

        def core_attention(self):
            return SDPAttention

    monkeypatch.setattr(gpt_layer_specs, "TESpecProvider", StandInTESpecProvider, raising=False)
    return gpt_layer_specs.get_gpt_layer_with_transformer_engine_spec()


@pytest.fixture()
def both(mcore_world1, monkeypatch):
    config = gpt.transformer_config(CFG, ParallelConfig(), torch.float32)
    local = gpt.model_from_spec(CFG, config, gpt.layer_spec(config, None, gpt.LOCAL), VOCAB)
    te = gpt.model_from_spec(CFG, config, _te_spec(monkeypatch), VOCAB)
    for model in (local, te):
        init_weights([model], seed=5, std=0.02, num_layers=CFG.num_layers)
    return local, te


def _forward(model, rows):
    model.eval()
    with torch.no_grad():
        return model(**gpt.batch_fn(rows, torch.device("cpu"))["inputs"])


def test_te_and_local_layers_save_the_same_names_and_values(both):
    local, te = both
    raw = dict(te.named_parameters())
    assert any(_te_norm_prefix() in name for name in raw)  # the stand-in really has TE's layout
    assert not any("input_layernorm" in name for name in raw)
    saved_local, saved_te = local.state_dict(), te.state_dict()
    assert set(saved_te) == set(saved_local)  # canonical on disk, no _extra_state
    for name in saved_local:
        torch.testing.assert_close(saved_te[name], saved_local[name], msg=name)
    # Under a parent (pipeline chunks in a ModuleList, DeepSpeed's engine) too.
    assert set(torch.nn.ModuleList([te]).state_dict()) == {f"0.{k}" for k in saved_local}


def test_checkpoints_load_across_specs_with_the_same_outputs(both):
    local, te = both
    rows = np.random.default_rng(0).integers(0, VOCAB, size=(2, CFG.seq_length + 1))
    torch.testing.assert_close(_forward(te, rows), _forward(local, rows))  # same math, so the stand-in is fair
    with torch.no_grad():
        for p in local.parameters():
            p.add_(torch.randn_like(p) * 0.01)  # now the two differ
    te.load_state_dict(local.state_dict(), strict=True)  # local -> TE
    torch.testing.assert_close(_forward(te, rows), _forward(local, rows))
    qkv = te.decoder.layers[0].self_attention.linear_qkv
    assert torch.equal(qkv.extra_loaded, qkv.get_extra_state())  # TE's extra state was filled in, not required
    with torch.no_grad():
        for p in te.parameters():
            p.mul_(1.01)
    torch.nn.ModuleList([local]).load_state_dict(torch.nn.ModuleList([te]).state_dict(), strict=True)  # TE -> local
    torch.testing.assert_close(_forward(te, rows), _forward(local, rows))


def test_older_te_named_checkpoints_load_into_local_layers(both):
    """A GPU checkpoint saved before names were canonical: TE's own names and its _extra_state entries."""
    local, te = both
    old = {name: p.detach().clone() for name, p in te.named_parameters()}
    old.update({f"{name}._extra_state": m.get_extra_state() for name, m in te.named_modules()
                if type(m).get_extra_state is not torch.nn.Module.get_extra_state})
    assert any(k.endswith("_extra_state") for k in old)
    local.load_state_dict(old, strict=True)
    rows = np.random.default_rng(1).integers(0, VOCAB, size=(2, CFG.seq_length + 1))
    torch.testing.assert_close(_forward(local, rows), _forward(te, rows))


def test_a_change_of_layer_spec_loads_by_name():
    from pretrain.checkpoint.format import layout_changes

    base = {"tensor": 1, "pipeline": 1, "data": 1, "zero_stage": 1}
    assert layout_changes(base, {**base, "layer_spec": "local"}) == []  # markers from before the key: local
    assert layout_changes({**base, "layer_spec": "transformer_engine"}, {**base, "layer_spec": "local"}) == [
        "layer_spec transformer_engine->local"]
