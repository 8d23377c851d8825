"""``pretrain generate``: continue a prompt token by token with the family's incremental decoder (its ModelSpec's
``decoder``), streaming the text.

GPT keeps megatron-core's key/value cache (pretrain/models/gpt.py, GPTDecoder): the prompt is encoded once, then
each new token costs one position. Transformer-XL uses its segment memory as the cache (MemoryDecoder), the
paper's fast-evaluation point: the prompt is one segment, then each new token a segment of length 1.
"""

from __future__ import annotations

import sys
from typing import TextIO

import torch

from pretrain.errors import CheckpointError
from pretrain.inference.loading import load_model, tokenizer_for


def sample_next(logits: torch.Tensor, temperature: float = 0.0, top_k: int = 0, top_p: float = 1.0,
                generator: torch.Generator | None = None) -> int:
    """The next token id from ``logits`` [V]: argmax when ``temperature`` <= 0, else a draw from the softmax at
    ``temperature`` restricted to the ``top_k`` most likely tokens (0: all) and to the smallest set whose
    probability reaches ``top_p`` (nucleus sampling; 1: all)."""
    if temperature <= 0:
        return int(logits.argmax())
    logits = logits.float() / temperature
    if top_k > 0:
        kth = torch.topk(logits, min(top_k, logits.numel())).values[-1]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if top_p < 1.0:
        sorted_logits, order = torch.sort(logits, descending=True)
        probs = torch.softmax(sorted_logits, dim=-1)
        outside = probs.cumsum(-1) - probs >= top_p  # tokens after the nucleus is already full
        logits[order[outside]] = float("-inf")
    probs = torch.softmax(logits, dim=-1).cpu()
    return int(torch.multinomial(probs, 1, generator=generator))


@torch.no_grad()
def generate(loaded, tokenizer, prompt: str, max_new_tokens: int = 60, temperature: float = 0.8, top_k: int = 40,
             top_p: float = 1.0, seed: int = 0, stream: TextIO | None = None) -> str:
    """Sample up to ``max_new_tokens`` after ``prompt`` (``temperature`` 0: greedy), stopping at EOS; the text is
    written to ``stream`` as it grows. Returns the continuation."""
    if loaded.spec.decoder is None:
        raise CheckpointError(f"{loaded.path}: {loaded.spec.name} checkpoints do not generate text (a bidirectional "
                              "model has no next token to predict)")
    decoder = loaded.spec.decoder(loaded.model, loaded.cfg.model, loaded.device)
    generator = torch.Generator().manual_seed(seed)
    prompt_ids = tokenizer.encode(prompt) or [tokenizer.eos_id]  # an empty prompt starts a new document
    # Never sample pad/unk/bos or the BERT control symbols, nor the padding rows of the vocabulary.
    banned = sorted(set(tokenizer.special_ids) - {tokenizer.eos_id})
    new: list[int] = []
    printed = ""
    logits = decoder.prefill(list(prompt_ids))
    for _ in range(max_new_tokens):
        logits = logits[: tokenizer.vocab_size].float()
        logits[banned] = float("-inf")
        token = sample_next(logits, temperature, top_k, top_p, generator)
        if token == tokenizer.eos_id:
            break
        new.append(token)
        text = tokenizer.decode(new)
        if stream is not None:
            stream.write(text[len(printed):])
            stream.flush()
        printed = text
        logits = decoder.step(token)
    if stream is not None:
        stream.write("\n")
    return printed


def generate_from_checkpoint(path, prompt: str, stream: TextIO | None = sys.stdout, **kwargs) -> str:
    """Load a checkpoint and its tokenizer, then :func:`generate`."""
    loaded = load_model(path)
    return generate(loaded, tokenizer_for(loaded), prompt, stream=stream, **kwargs)
