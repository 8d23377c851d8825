"""`pretrain export hf` streams: its peak memory stays well under the weights' size (one tensor at a time), and the
safetensors files it writes tensor by tensor are the bytes safetensors' own writer gives."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest
import torch

from tests.conftest import TINY_CONFIG, run_cli
from tests.integration.test_export_hf import export
from tests.integration.test_import_hf import import_hf, save_hf

#: A GPT-2 of 43M parameters: 174 MB of fp32 weights, well above the few MB a process's RSS moves by itself.
BIG = {"n_embd": 768, "n_layer": 6, "n_head": 12}
BIG_OVERRIDES = ("--model.hidden_size=768", "--model.num_layers=6", "--model.num_attention_heads=12",
                 "--model.ffn_hidden_size=3072")
MEMORY = re.compile(r"peak RSS (\d+) MB, (\d+) MB above its start, for (\d+) MB of weights")


@pytest.mark.slow
def test_export_peak_memory_is_well_under_the_weights(shakespeare, tmp_path):
    import transformers

    torch.manual_seed(0)
    model = transformers.GPT2LMHeadModel(transformers.GPT2Config(
        vocab_size=1024, n_positions=128, activation_function="gelu", **BIG))
    hf_dir = save_hf(model.eval(), shakespeare["tokenizer"], tmp_path / "hf")
    del model
    run_dir = import_hf(hf_dir, TINY_CONFIG, tmp_path / "run", shakespeare, *BIG_OVERRIDES)
    result = run_cli("export", "hf", "--checkpoint", str(run_dir), "--output", str(tmp_path / "out"))
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    peak, above, weights = map(int, MEMORY.search(result.stdout).groups())
    assert weights == 174, result.stdout  # the weights exported: 43.4M fp32 parameters
    # Holding the model once (what the export did before streaming) would be >= 174 MB above the start.
    assert above < 0.5 * weights, result.stdout
    # HF -> ours -> HF loses nothing, and the bytes written one tensor at a time are transformers' own file's.
    assert (tmp_path / "out" / "model.safetensors").read_bytes() == (hf_dir / "model.safetensors").read_bytes()


def test_streamed_safetensors_equal_safetensors_save_file(tmp_path):
    from safetensors.torch import save_file

    from pretrain.hf.stream import ShardedSafetensorsWriter

    torch.manual_seed(0)
    tensors = {"b.weight": torch.randn(4, 6), "a.weight": torch.randn(3, 5).bfloat16(), "count": torch.tensor([7]),
               "half": torch.randn(5).half(), "scalar": torch.tensor(1.5), "empty": torch.zeros(0, 4),
               "mask": torch.tensor([True, False]), "z.bias": torch.randn(40)}
    specs = {name: (t.dtype, tuple(t.shape)) for name, t in tensors.items()}
    for limit, files in ((10**9, 1), (100, 3)):
        out = tmp_path / str(limit)
        out.mkdir()
        writer = ShardedSafetensorsWriter(specs, out, limit)
        for name in reversed(list(tensors)):  # any order: each tensor lands at its offset
            writer.write(name, tensors[name])
        assert writer.close() == files
        if files == 1:
            save_file(tensors, str(tmp_path / "ref.safetensors"), metadata={"format": "pt"})
            assert (out / "model.safetensors").read_bytes() == (tmp_path / "ref.safetensors").read_bytes()
            continue
        index = json.loads((out / "model.safetensors.index.json").read_text())
        assert list(index["weight_map"]) == list(tensors)  # in the tensors' order, as save_pretrained's
        assert index["metadata"]["total_size"] == sum(t.numel() * t.element_size() for t in tensors.values())
        for file in sorted(set(index["weight_map"].values())):  # shards of <= 100 bytes unless one tensor is more
            shard = {name: tensors[name] for name, f in index["weight_map"].items() if f == file}
            save_file(shard, str(tmp_path / file), metadata={"format": "pt"})
            assert (out / file).read_bytes() == (tmp_path / file).read_bytes(), file


def test_writer_refuses_a_wrong_shape_and_a_missing_tensor(tmp_path):
    from pretrain.hf.stream import ShardedSafetensorsWriter

    writer = ShardedSafetensorsWriter({"a": (torch.float32, (2,)), "b": (torch.float32, (3,))}, tmp_path, 10**9)
    with pytest.raises(ValueError, match=r"^tensor a: torch.float32 \(3,\), announced as"):
        writer.write("a", torch.zeros(3))
    writer.write("a", torch.zeros(2))
    with pytest.raises(ValueError, match="^tensor b never written"):
        writer.close()


def rss_file() -> int:
    """Resident bytes of file-backed mappings in this process (Linux)."""
    line = next(line for line in Path("/proc/self/status").read_text().splitlines() if line.startswith("RssFile:"))
    return int(line.split()[1]) * 1024


def test_read_tensors_leave_no_mapped_pages_resident(tmp_path):
    """A tensor read through ConsolidatedTensors leaves none of the checkpoint file's pages in the resident set
    (they would add up to the whole file over an export), and a later read of it still gives the saved values."""
    from pretrain.checkpoint.consolidate import ConsolidatedTensors

    step = tmp_path / "step_1"
    step.mkdir()
    generator = torch.Generator().manual_seed(0)
    state = {f"decoder.layers.{i}.mlp.linear_fc1.weight": torch.randn(1000, 2500, generator=generator)
             for i in range(5)}  # 10 MB each
    torch.save({"module": state}, step / "mp_rank_00_model_states.pt")
    shapes = {name: tuple(t.shape) for name, t in state.items()}
    first = state["decoder.layers.0.mlp.linear_fc1.weight"].clone()
    del state
    reader = ConsolidatedTensors(step, {"tensor": 1, "pipeline": 1}, shapes, num_layers=5)
    before = rss_file()
    for name in shapes:
        assert tuple(reader.get(name).shape) == shapes[name]
    assert rss_file() - before < 5e6, (before, rss_file())  # without dropping the pages: +50 MB
    assert torch.equal(reader.get("decoder.layers.0.mlp.linear_fc1.weight"), first)  # faulted in from the file again


@pytest.mark.slow
def test_bf16_zero1_export_is_bf16_with_the_saved_values(shakespeare, tmp_path):
    """A bf16 run (ZeRO-1) exports every tensor in bf16, the precision DeepSpeed trained and saved all of them in
    (learned positions and torch LayerNorms too; upcasting them would only widen bf16 values), equal to the saved
    module weights."""
    from safetensors.torch import load_file

    from tests.integration.downstream_support import train_gpt

    run_dir = train_gpt(shakespeare, tmp_path / "run", "--train.precision=bf16", "--parallel.zero_stage=1",
                        "--train.eval_batches=0", steps=1)
    out = export(run_dir, tmp_path / "hf")
    tensors = load_file(out / "model.safetensors")
    assert {name: t.dtype for name, t in tensors.items() if t.dtype != torch.bfloat16} == {}
    saved = torch.load(run_dir / "checkpoints" / "step_1" / "mp_rank_00_model_states.pt", weights_only=False)
    module = saved["module"]
    assert torch.equal(tensors["transformer.wte.weight"], module["embedding.word_embeddings.weight"][:1024])
    assert torch.equal(tensors["transformer.wpe.weight"], module["embedding.position_embeddings.weight"])
    assert torch.equal(tensors["transformer.h.0.ln_1.weight"], module["decoder.layers.0.input_layernorm.weight"])
    assert json.loads((out / "config.json").read_text())["torch_dtype"] == "bfloat16"
