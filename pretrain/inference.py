"""Using a checkpoint outside training: load the model in one process, evaluate it, generate text.

Loads checkpoints saved with tensor = pipeline = 1 (any ZeRO stage and data-parallel size). Checkpoints of
other layouts are refused with a one-line error until resharding lands (fault-tolerance issue).
"""

from __future__ import annotations

import os
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import TextIO

import torch
import yaml

from pretrain import config as config_mod
from pretrain import device as device_layer
from pretrain import models
from pretrain.checkpoint import CheckpointError, CheckpointManager, read_marker
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
        if (root / "COMMITTED").is_file():
            return root
        latest = CheckpointManager(root).latest() if root.is_dir() else None
        if latest:
            return latest
    raise CheckpointError(f"{path}: no complete checkpoint here (looked for COMMITTED in it and in step_* below)")


def load_model(path: str | Path) -> LoadedModel:
    """Build the model from the checkpoint's own config.yaml and load its weights (fp32 gathered under ZeRO-3)."""
    path = resolve_checkpoint(path)
    layout = read_marker(path)["layout"]
    if layout["tensor"] != 1 or layout["pipeline"] != 1:
        raise CheckpointError(f"{path}: saved with tensor={layout['tensor']} pipeline={layout['pipeline']}; "
                              "inference loads tensor=1 pipeline=1 checkpoints until resharding lands")
    cfg = config_mod.from_dict(yaml.safe_load((path / "config.yaml").read_text()))
    cfg.parallel = config_mod.ParallelConfig()  # inference runs unsharded in one process
    _init_single_process(cfg)
    info = device_layer.detect(0, cfg.train.precision)
    state = _model_state_dict(path, layout["zero_stage"])
    spec = models.get(cfg.model.family)
    vocab_size = state["embedding.word_embeddings.weight"].shape[0]
    model = spec.build(cfg.model, cfg.parallel, info.dtype, vocab_size).to(info.device)
    model.load_state_dict(state, strict=False)  # strict=False: megatron's `_extra_state` entries are optional
    missing = [k for k in model.state_dict() if k not in state and not k.endswith("_extra_state")]
    if missing:
        raise CheckpointError(f"{path}: checkpoint lacks {len(missing)} model tensors, e.g. {missing[0]}")
    model.eval()
    return LoadedModel(model=model, cfg=cfg, spec=spec, device=info.device, path=path)


def _init_single_process(cfg: Config) -> None:
    import torch.distributed as dist

    from pretrain.parallel import ParallelDims, init_process_groups
    from pretrain.train import init_distributed

    device_layer.apply_cpu_shims()
    if not dist.is_initialized():
        for key in ("RANK", "LOCAL_RANK", "WORLD_SIZE"):  # a one-process group even inside a launcher's env
            os.environ.pop(key, None)
        init_distributed(device_layer.detect(0).backend)
        init_process_groups(ParallelDims(world_size=1), cfg.run.seed)


def _model_state_dict(path: Path, zero_stage: int) -> dict[str, torch.Tensor]:
    if zero_stage == 3:  # parameters are partitioned across ranks; DeepSpeed reassembles the fp32 weights
        from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint

        return get_fp32_state_dict_from_zero_checkpoint(str(path.parent), tag=path.name)
    files = sorted(path.glob("mp_rank_*_model_states.pt"))
    if not files:
        raise CheckpointError(f"{path}: no mp_rank_*_model_states.pt model file")
    return torch.load(files[0], map_location="cpu", weights_only=False)["module"]


def tokenizer_for(loaded: LoadedModel):
    """The run's tokenizer: the copy in the run directory, else data.tokenizer from the config."""
    from data_pipeline.tokenizer import Tokenizer

    run_copy = loaded.path.parent.parent / "tokenizer.model"
    path = run_copy if run_copy.is_file() else Path(loaded.cfg.data.tokenizer)
    if not path.is_file():
        raise CheckpointError(f"{loaded.path}: tokenizer not found (looked at {run_copy} and data.tokenizer)")
    return Tokenizer(str(path))


def evaluate_checkpoint(path: str | Path, data_dir: str | None = None, max_batches: int = 0) -> dict:
    """Validation loss/perplexity of a checkpoint on ``data_dir`` (default: the run's data.valid)."""
    from data_pipeline.reader import ShardReader
    from pretrain.evaluate import evaluate

    loaded = load_model(path)
    data_dir = data_dir or loaded.cfg.data.valid
    if not data_dir:
        raise CheckpointError(f"{loaded.path}: the run has no data.valid; pass --data")
    reader = ShardReader(data_dir, micro_batch_size=loaded.cfg.train.micro_batch_size, shuffle=False, loop=False)
    batch_fn = loaded.spec.make_batch_fn(loaded.cfg, reader.manifest)
    model, loss_fn = loaded.model, loaded.spec.loss_fn
    return evaluate(model, lambda batches: torch.stack([loss_fn(model(**b["inputs"]), b) for b in batches]),
                    batch_fn, reader, loaded.device, max_batches)


@torch.no_grad()
def generate(loaded: LoadedModel, tokenizer, prompt: str, max_new_tokens: int = 60, temperature: float = 0.8,
             top_k: int = 40, seed: int = 0, stream: TextIO | None = None) -> str:
    """Sample a continuation token by token (full recompute per token; a KV cache comes with the models issue).

    ``temperature`` 0 is greedy. Streams the new text to ``stream`` as it is produced. Returns the continuation.
    """
    if loaded.cfg.model.family != "gpt":
        raise CheckpointError(f"{loaded.path}: generation supports gpt checkpoints (this is "
                              f"{loaded.cfg.model.family})")
    generator = torch.Generator().manual_seed(seed)
    prompt_ids = tokenizer.encode(prompt)
    ids = list(prompt_ids)
    seq_length = loaded.cfg.model.seq_length
    # Never sample pad/unk/bos or the BERT control symbols; EOS stays allowed and ends the continuation.
    banned = torch.tensor(sorted(set(tokenizer.special_ids) - {tokenizer.eos_id}), dtype=torch.long,
                          device=loaded.device)
    printed = ""
    for _ in range(max_new_tokens):
        context = torch.tensor([ids[-seq_length:]], device=loaded.device)  # [1, s]
        s = context.shape[1]
        logits = loaded.model(input_ids=context, position_ids=torch.arange(s, device=loaded.device)[None],
                              attention_mask=models.gpt._causal_mask(s, loaded.device))  # [1, s, V_padded]
        logits = logits[0, -1, : tokenizer.vocab_size].float()  # padding rows are never real tokens
        logits[banned] = float("-inf")
        if temperature <= 0:
            next_id = int(logits.argmax())
        else:
            if top_k > 0:
                kth = torch.topk(logits, min(top_k, logits.numel())).values[-1]
                logits = logits.masked_fill(logits < kth, float("-inf"))
            probs = torch.softmax(logits / temperature, dim=-1).cpu()
            next_id = int(torch.multinomial(probs, 1, generator=generator))
        if next_id == tokenizer.eos_id:
            break
        ids.append(next_id)
        text = tokenizer.decode(ids[len(prompt_ids):])
        if stream is not None:
            stream.write(text[len(printed):])
            stream.flush()
        printed = text
    if stream is not None:
        stream.write("\n")
    return printed


def generate_from_checkpoint(path, prompt: str, stream: TextIO | None = sys.stdout, **kwargs) -> str:
    """Load a checkpoint and its tokenizer, then :func:`generate`."""
    loaded = load_model(path)
    return generate(loaded, tokenizer_for(loaded), prompt, stream=stream, **kwargs)
