"""Our model vs its `pretrain export hf` as transformers' GPT2LMHeadModel, both on this process's device.

    python -m tests.gpu.export_parity CHECKPOINT EXPORT_DIR CORPUS_JSONL   # prints one JSON line

Run in its own process (load_model sets up a process group). The checkpoint was trained in bf16, so its weights
are bf16 values; the export stores them as they are. Figures, each the largest |difference| over real vocabulary
entries and positions of two windows of held-out text, divided by the largest |logit| of ours in fp32:
``rel_err_fp32``: ours in fp32 vs HF in fp32 (the same weight values; only kernels' rounding differs);
``rel_err_bf16``: ours as trained (bf16 weights and compute) vs HF in fp32; ``top1_bf16``: the share of positions
whose most likely next token is the same in both.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path


def parity(checkpoint: Path, export_dir: Path, corpus_jsonl: Path) -> dict:
    import torch
    import transformers

    from data_pipeline.batches import causal_mask
    from pretrain.inference.loading import load_model, tokenizer_for

    torch.set_float32_matmul_precision("highest")  # no TF32: fp32 means fp32 on both sides
    loaded = load_model(checkpoint)
    device, model = loaded.device, loaded.model
    loaded_dtypes = sorted({str(p.dtype) for p in model.parameters()})
    # As trained: DeepSpeed's bf16 engine runs every parameter in bf16 (megatron-core's linear layers are built in
    # params_dtype; torch LayerNorm and position embedding come up fp32 and hold bf16 values after the load).
    trained_dtype = model.config.params_dtype
    model.to(trained_dtype)
    tokenizer = tokenizer_for(loaded)
    text = json.loads(corpus_jsonl.read_text().splitlines()[0])["text"]
    ids = tokenizer.encode(text[20000:40000])
    s, vocab = loaded.cfg.model.seq_length, tokenizer.vocab_size
    tokens = torch.tensor([ids[:s], ids[s:2 * s]], device=device)  # [2, s]
    inputs = {"input_ids": tokens, "position_ids": torch.arange(s, device=device)[None],
              "attention_mask": torch.from_numpy(causal_mask(s).copy()).to(device)}
    hf = transformers.GPT2LMHeadModel.from_pretrained(export_dir)
    stored_dtype = next(hf.parameters()).dtype  # transformers 4.x loads fp32, 5.x the file's dtype
    hf = hf.to(device=device, dtype=torch.float32).eval()
    with torch.no_grad():
        native = model(**inputs)[..., :vocab].float()  # [2, s, V], bf16 compute as trained
        ours = model.float()(**inputs)[..., :vocab]  # [2, s, V], the same weights in fp32
        theirs = hf(tokens).logits  # [2, s, V]
    scale = ours.abs().max()
    return {"device": str(device), "trained_dtype": str(trained_dtype), "hf_loaded_dtype": str(stored_dtype),
            "load_model_dtypes": loaded_dtypes,
            "transformers": transformers.__version__,
            "exported_dtype": json.loads((export_dir / "config.json").read_text()).get("torch_dtype"),
            "rel_err_fp32": ((ours - theirs).abs().max() / scale).item(),
            "rel_err_bf16": ((native - theirs).abs().max() / scale).item(),
            "top1_bf16": (native.argmax(-1) == theirs.argmax(-1)).float().mean().item(),
            "logit_scale": scale.item()}


if __name__ == "__main__":
    print(json.dumps(parity(*(Path(a) for a in sys.argv[1:4]))))
