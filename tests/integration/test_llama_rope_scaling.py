"""Llama 3.1-style rope scaling (model.rope_scaling_factor & co.) against the real Hugging Face implementation.

The dev environment pins transformers 4.37.2 (TransfoXL parity needs it), which predates ``rope_type: llama3``
(added in 4.43). This test installs transformers 4.46.3 once into the repository's ignored ``.cache/`` with
``pip install --target`` and runs the comparison in a subprocess with that directory first on PYTHONPATH: our
GPTModel with scaled rotary frequencies (megatron-core's RotaryEmbedding), exported by pretrain/hf/llama.py into
config.json + tensors, against LlamaForCausalLM built from that config.json; and HF's own config.json read back by
``pretrain import hf``'s config check.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from tests.conftest import REPO, cli_env

#: transformers with ``rope_type: llama3`` (>= 4.43) whose requirements the dev environment meets but for tokenizers
#: (4.46 needs 0.20.x; the pinned 4.37.2 keeps 0.15); both go into the cache directory, nothing else.
PACKAGES = ("transformers==4.46.3", "tokenizers==0.20.3")
CACHE = REPO / ".cache" / "transformers-4.46.3"
LLAMA_CONFIG = REPO / "configs" / "llama" / "tiny.yaml"
#: Llama 3.1's factor and frequency factors, but an original context of 64 tokens so that a 128-token test window
#: has all three bands: wavelengths under 16 tokens kept, 16..64 interpolated, over 64 stretched 8x (head size 48,
#: base 5e5: 2 kept, 3 interpolated, 19 stretched).
SCALING = {"rope_scaling_factor": 8.0, "rope_low_freq_factor": 1.0, "rope_high_freq_factor": 4.0,
           "rope_original_max_position_embeddings": 64}
REL_TOL = 1e-5


@pytest.fixture(scope="session")
def newer_transformers() -> Path:
    """A directory holding transformers 4.46.3 (+ its tokenizers), installed once per checkout (file-locked for
    pytest-xdist workers; a partial install is never left under the final name). Skips only if pip fails."""
    from filelock import FileLock

    CACHE.parent.mkdir(exist_ok=True)
    with FileLock(str(CACHE) + ".lock"):
        if not (CACHE / "transformers" / "__init__.py").is_file():
            partial = CACHE.with_name(CACHE.name + ".partial")
            shutil.rmtree(partial, ignore_errors=True)
            pip = subprocess.run([sys.executable, "-m", "pip", "install", "--quiet", "--disable-pip-version-check",
                                  "--no-deps", "--target", str(partial), *PACKAGES],
                                 capture_output=True, text=True, timeout=600)
            if pip.returncode != 0:
                shutil.rmtree(partial, ignore_errors=True)
                last = (pip.stderr.strip().splitlines() or ["no output"])[-1]
                pytest.skip(f"pip could not install {' '.join(PACKAGES)} into {CACHE}: {last}")
            shutil.rmtree(CACHE, ignore_errors=True)
            os.rename(partial, CACHE)
    return CACHE


def test_llama3_rope_scaling_matches_transformers_llama(newer_transformers, tmp_path):
    env = cli_env()
    env["PYTHONPATH"] = os.pathsep.join([str(newer_transformers), env["PYTHONPATH"]])
    run = subprocess.run([sys.executable, "-m", "tests.integration.test_llama_rope_scaling", str(tmp_path)],
                         capture_output=True, text=True, cwd=REPO, env=env, timeout=300)
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-3000:]
    result = json.loads(run.stdout.strip().splitlines()[-1])
    assert result["transformers"] == "4.46.3"
    assert result["rope_scaling"] == {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0,
                                      "high_freq_factor": 4.0, "original_max_position_embeddings": 64}
    # HF computed its frequencies from config.json: 2 kept, 3 interpolated, 19 stretched by the factor.
    assert result["bands"] == {"kept": 2, "interpolated": 3, "stretched": 19}, result["bands"]
    assert result["inv_freq_max_rel_diff"] <= 1e-6, result
    assert result["logits_rel_err"] <= REL_TOL, result
    # The scaling matters in this window: HF without rope_scaling is far off (else the check above proves little).
    assert result["unscaled_logits_rel_err"] > 100 * REL_TOL, result
    # Import reads HF's config.json back: accepted with our values, refused in one line with another factor, and
    # a scaling type our rotary embedding does not compute is refused naming it.
    assert result["import_same"] == "ok"
    assert result["import_other_factor"].startswith("model.rope_scaling_factor: 32.0 in the config, but "), result
    assert result["import_yarn"].startswith("rope_scaling.rope_type='yarn' in config.json: "), result


def overrides(model: dict) -> list[str]:
    return [f"--model.{key}={value}" for key, value in model.items()]


def compare(out: Path) -> dict:
    """Our scaled-RoPE Llama (configs/llama/tiny.yaml + SCALING, weights drawn with std 0.2 so that attention
    depends strongly on position) vs LlamaForCausalLM from the exported config.json and tensors, on 128 random
    token ids; run under the newer transformers (see the fixture)."""
    import torch
    import torch.distributed as dist
    import transformers
    from megatron.core import parallel_state, tensor_parallel

    from pretrain import config as config_io, device
    from pretrain.errors import ConfigError
    from pretrain.hf import hf_import, llama
    from pretrain.hf.common import OurTensors
    from pretrain.models import gpt
    from pretrain.parallel.env import free_port

    device.apply_cpu_shims()
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{free_port()}", rank=0, world_size=1)
    parallel_state.initialize_model_parallel(1, 1)
    tensor_parallel.model_parallel_cuda_manual_seed(0)
    torch.manual_seed(0)
    cfg = config_io.load(LLAMA_CONFIG, overrides({**SCALING, "init_method_std": 0.2}))
    vocab, s = 256, cfg.model.seq_length
    model = gpt.build(cfg.model, cfg.parallel, torch.float32, vocab).eval()
    ids = type("Ids", (), {"bos_id": 1, "eos_id": 2, "pad_id": 0})()
    config = llama.llama_config(cfg, model.config, vocab, ids, torch.float32)
    (out / "config.json").write_text(json.dumps(config))
    hf_config = transformers.AutoConfig.from_pretrained(out)
    hf = transformers.LlamaForCausalLM(hf_config).eval()
    state = model.state_dict()
    ours = OurTensors(state, state.__getitem__, "LlamaForCausalLM")
    tensors = dict(llama.llama_tensors(ours, cfg.model.num_layers, cfg.model.num_attention_heads,
                                       cfg.model.num_query_groups, vocab, cfg.model.tie_embeddings))
    hf.load_state_dict(tensors, strict=True)
    tokens = torch.randint(0, vocab, (2, s), generator=torch.Generator().manual_seed(0))  # [2, s]
    with torch.no_grad():
        ours = model(input_ids=tokens, position_ids=torch.arange(s)[None], attention_mask=None)  # [2, s, V]
        theirs = hf(tokens).logits
        unscaled = transformers.LlamaForCausalLM(transformers.LlamaConfig(**{**config, "rope_scaling": None}))
        unscaled.load_state_dict(tensors, strict=True)
        plain = unscaled.eval()(tokens).logits

    def rel(a: torch.Tensor) -> float:
        return ((ours - a).abs().max() / ours.abs().max()).item()

    hf_freq = hf.model.rotary_emb.inv_freq  # [d/2]
    base = unscaled.model.rotary_emb.inv_freq
    ratio = base / hf_freq
    result = {"transformers": transformers.__version__, "rope_scaling": hf.config.rope_scaling,
              "bands": {"kept": int((ratio == 1).sum()), "stretched": int((ratio - 8).abs().lt(1e-4).sum()),
                        "interpolated": int(((ratio > 1) & (ratio - 8).abs().ge(1e-4)).sum())},
              "inv_freq_max_rel_diff": ((model.rotary_pos_emb.inv_freq - hf_freq).abs() / hf_freq).max().item(),
              "logits_rel_err": rel(theirs), "unscaled_logits_rel_err": rel(plain)}
    hf.config.save_pretrained(out)  # config.json as transformers writes it
    saved = hf_import.read_hf_config(out)
    yarn = {**saved, "rope_scaling": {"rope_type": "yarn", "factor": 8.0}}
    for name, hf_dict, change in [("import_same", saved, {}), ("import_yarn", yarn, {}),
                                  ("import_other_factor", saved, {"rope_scaling_factor": 32.0})]:
        try:
            hf_import.check_config(config_io.load(LLAMA_CONFIG, overrides({**SCALING, **change})), hf_dict, out)
            result[name] = "ok"
        except ConfigError as e:
            result[name] = str(e)
    dist.destroy_process_group()
    return result


if __name__ == "__main__":
    print(json.dumps(compare(Path(sys.argv[1]))))
