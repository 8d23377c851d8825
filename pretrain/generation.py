"""``pretrain generate``: continue a prompt token by token with a cache, streaming the text.

GPT keeps megatron-core's key/value cache (StaticInferenceContext): the prompt is encoded once, then each new
token costs one position. Transformer-XL uses its segment memory as the cache, the paper's fast-evaluation
point: the prompt is one segment, then each new token is a segment of length 1 attending to the memory.
"""

from __future__ import annotations

from typing import TextIO

import torch

from pretrain.checkpoint import CheckpointError


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


class GPTDecoder:
    """Incremental GPT forward with megatron-core's key/value cache.

    Learned absolute positions end at ``seq_length``: when the cache is full, the newest half of the context is
    encoded again as a fresh prompt (a sliding window, as full recomputation would see it).
    """

    def __init__(self, model: torch.nn.Module, seq_length: int, device: torch.device):
        self.model, self.seq_length, self.device = model, seq_length, device
        self.context = None

    def prefill(self, ids: list[int]) -> torch.Tensor:
        """Encode ``ids`` (the last seq_length of them) from an empty cache; logits [V] of the next token."""
        from megatron.core.inference.contexts import StaticInferenceContext

        ids = ids[-self.seq_length:]
        self.context = StaticInferenceContext(max_batch_size=1, max_sequence_length=self.seq_length)
        s = len(ids)
        # No mask tensor: a fresh cache keeps the layers' causal mask type, so the prompt attends causally.
        logits = self._forward(torch.tensor([ids], device=self.device),
                               torch.arange(s, device=self.device)[None], None)
        self.context.sequence_len_offset = s
        self.context.enable_decode_mode()
        self.history = list(ids)
        return logits

    def step(self, token: int) -> torch.Tensor:
        """Append ``token``; logits [V] of the one after it."""
        self.history.append(token)
        if self.context.sequence_len_offset >= self.seq_length:  # no position left: re-encode the newer half
            return self.prefill(self.history[-(self.seq_length // 2):])
        position = self.context.sequence_len_offset
        logits = self._forward(torch.tensor([[token]], device=self.device),
                               torch.tensor([[position]], device=self.device), None)
        self.context.sequence_len_offset += 1
        return logits

    def _forward(self, input_ids, position_ids, attention_mask) -> torch.Tensor:
        out = self.model(input_ids=input_ids, position_ids=position_ids, attention_mask=attention_mask,
                         inference_context=self.context, runtime_gather_output=True)  # [1, 1, V]: last position
        return out[0, -1]


class MemoryDecoder:
    """Incremental Transformer-XL forward: the segment memory (evaluation mem_length) is the cache.

    A model evaluated without memory (mem_length 0) has no cache to extend: each step then encodes the newest
    ``seq_length`` tokens again, as a full recomputation would.
    """

    def __init__(self, model: torch.nn.Module, seq_length: int, device: torch.device):
        self.model, self.device, self.mems = model, device, None
        self.window = seq_length if model.lengths[0] == 0 else 0  # 0: extend the memory

    def prefill(self, ids: list[int]) -> torch.Tensor:
        """Encode ``ids`` as one segment from empty memory; logits [V] of the next token."""
        self.mems, self.history = None, list(ids)
        return self._forward(ids[-self.window:] if self.window else ids)

    def step(self, token: int) -> torch.Tensor:
        """Append ``token`` (a segment of one); logits [V] of the one after it."""
        if self.window:
            return self.prefill(self.history + [token])
        return self._forward([token])

    def _forward(self, ids: list[int]) -> torch.Tensor:
        logits, self.mems = self.model.forward_segment(torch.tensor([ids], device=self.device), self.mems)
        return logits[0, -1]  # [V]


def decoder_for(loaded):
    """The incremental decoder of a loaded checkpoint's family; a one-line error for families that do not
    generate (BERT is bidirectional)."""
    family = loaded.cfg.model.family
    if family == "gpt":
        return GPTDecoder(loaded.model, loaded.cfg.model.seq_length, loaded.device)
    if family == "transformer_xl":
        return MemoryDecoder(loaded.model, loaded.cfg.model.seq_length, loaded.device)
    raise CheckpointError(f"{loaded.path}: {family} checkpoints do not generate text (gpt and transformer_xl do)")


@torch.no_grad()
def generate(loaded, tokenizer, prompt: str, max_new_tokens: int = 60, temperature: float = 0.8, top_k: int = 40,
             top_p: float = 1.0, seed: int = 0, stream: TextIO | None = None) -> str:
    """Sample up to ``max_new_tokens`` after ``prompt`` (``temperature`` 0: greedy), stopping at EOS; the text is
    written to ``stream`` as it grows. Returns the continuation."""
    decoder = decoder_for(loaded)
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
