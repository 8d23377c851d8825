"""Model-aware batches: reader rows -> model inputs, as numpy arrays.

Pure numpy and deterministic; pretrain's `ModelSpec.batch_fn`s wrap these and move the arrays to torch. Inputs
are what the readers yield: packed rows `[b, s+1]` of int64 token ids in which each document is followed by
`eos_id` (documents run across row boundaries), or, for Transformer-XL, ordered stream segments.

- `gpt_batch`: causal LM, optionally with Megatron's per-document resets (positions, attention, loss at EOS).
- `bert_batch`: BERT pretraining pairs `[CLS] A [SEP] B [SEP]` with NSP labels and 80/10/10 MLM masking,
  deterministic per (seed, global sample index).
- `txl_batch`: Transformer-XL inputs/targets of one stream segment.
"""

from __future__ import annotations

import functools
from typing import Iterable

import numpy as np

from data_pipeline.errors import DataError


def _rows(rows: np.ndarray, min_width: int = 2) -> np.ndarray:
    rows = np.asarray(rows)
    if rows.ndim != 2 or rows.shape[1] < min_width or not np.issubdtype(rows.dtype, np.integer):
        raise ValueError(f"expected integer token rows [b, >={min_width}], got {rows.dtype} {rows.shape}")
    return rows.astype(np.int64, copy=False)


@functools.lru_cache(maxsize=8)
def causal_mask(s: int) -> np.ndarray:
    """[1, 1, s, s] bool, True where attention is NOT allowed (key after query): megatron-core's convention.

    Built once per length (4 MB at s = 2048, otherwise rebuilt every step) and read-only, since it is shared.
    """
    mask = np.triu(np.ones((s, s), dtype=bool), 1)[None, None]
    mask.flags.writeable = False
    return mask


# ----- GPT -----

def gpt_batch(rows: np.ndarray, eos_id: int | None = None, reset_at_eos: bool = False) -> dict[str, np.ndarray]:
    """Packed causal-LM batch from rows [b, s+1]: token t predicts token t+1.

    Returns `tokens`, `labels` (int64 [b, s]), `loss_mask` (float32 [b, s]), `position_ids` (int64 [b, s]) and
    `attention_mask` (bool, True = masked). By default documents share the context window as packed (what
    pretrain/models/gpt.py has always done): positions 0..s-1, one causal mask [1, 1, s, s] for the batch,
    loss on every token.

    `reset_at_eos=True` is Megatron-LM's `reset_position_ids + reset_attention_mask + eod_mask_loss`
    (`get_ltor_masks_and_position_ids`), with the EOS token belonging to the document it ends:
    - position ids restart at 0 on the token after each EOS;
    - `attention_mask` becomes per sample, [b, 1, s, s]: a token attends only to earlier tokens of its own
      document (a row starting mid-document treats that tail as a document);
    - loss is masked where the INPUT token is EOS: that position would predict the next document's first token
      from a context it may not see. Positions whose TARGET is EOS keep their loss, so the model still learns
      to end documents.
    """
    rows = _rows(rows)
    tokens = np.ascontiguousarray(rows[:, :-1])  # [b, s]
    labels = np.ascontiguousarray(rows[:, 1:])  # [b, s]
    b, s = tokens.shape
    positions = np.arange(s, dtype=np.int64)  # [s]
    if not reset_at_eos:
        return {"tokens": tokens, "labels": labels, "loss_mask": np.ones((b, s), dtype=np.float32),
                "position_ids": np.tile(positions, (b, 1)), "attention_mask": causal_mask(s)}
    if eos_id is None:
        raise ValueError("gpt_batch: reset_at_eos=True needs eos_id")
    is_eos = tokens == eos_id  # [b, s]
    # Document index of each token: EOS tokens counted strictly before it (an EOS ends, so belongs to, its doc).
    doc = np.cumsum(is_eos, axis=1) - is_eos  # [b, s]
    # First position of each token's document: one past the latest EOS strictly before it.
    after_eos = np.where(is_eos, positions + 1, 0)  # [b, s]
    starts = np.maximum.accumulate(np.concatenate([np.zeros((b, 1), np.int64), after_eos[:, :-1]], axis=1), axis=1)
    future = positions[None, :] > positions[:, None]  # [s, s] key after query
    other_doc = doc[:, :, None] != doc[:, None, :]  # [b, s, s]
    return {"tokens": tokens, "labels": labels, "loss_mask": (~is_eos).astype(np.float32),
            "position_ids": positions[None, :] - starts, "attention_mask": (future[None] | other_doc)[:, None]}


# ----- BERT -----

def bert_token_ids(manifest: dict) -> dict:
    """The id keyword arguments of `bert_batch` from a shard manifest (those `data prepare` writes).

    Raises DataError when the shards' tokenizer has no [CLS]/[SEP]/[MASK] (trained with other special symbols,
    or shards written before the manifest recorded them).
    """
    missing = [k for k in ("cls_id", "sep_id", "mask_id") if manifest.get(k) is None]
    if missing:
        raise DataError(f"shards lack BERT special ids ({', '.join(missing)}): rebuild them with a tokenizer "
                        "trained with the default special symbols [CLS],[SEP],[MASK]")
    return {"cls_id": manifest["cls_id"], "sep_id": manifest["sep_id"], "mask_id": manifest["mask_id"],
            "pad_id": manifest["pad_id"], "eos_id": manifest["eos_id"], "vocab_size": manifest["vocab_size"],
            "special_ids": frozenset(manifest["special_ids"])}


def truncate_seq_pair(a: np.ndarray, b: np.ndarray, max_num_tokens: int,
                      rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    """Google BERT's `truncate_seq_pair`: drop one token at a time from the longer segment, from its front or
    back with equal chance (to avoid biasing toward either end), until `len(a) + len(b) <= max_num_tokens`."""
    while len(a) + len(b) > max_num_tokens:
        longer = a if len(a) > len(b) else b
        cut = longer[1:] if rng.random() < 0.5 else longer[:-1]
        a, b = (cut, b) if longer is a else (a, cut)
    return a, b


def _documents(row: np.ndarray, eos_id: int | None) -> list[np.ndarray]:
    """The non-empty document pieces of a packed row, EOS tokens dropped."""
    if eos_id is None:
        return [row] if len(row) else []
    bounds = np.concatenate([[-1], np.flatnonzero(row == eos_id), [len(row)]])
    return [row[lo + 1:hi] for lo, hi in zip(bounds[:-1], bounds[1:]) if hi > lo + 1]


def _pick(pieces: list[np.ndarray], rng: np.random.Generator) -> int:
    """Index of a piece chosen with probability proportional to its length (every token equally likely)."""
    lengths = np.array([len(p) for p in pieces], dtype=np.float64)
    return int(rng.choice(len(pieces), p=lengths / lengths.sum()))


def _mask_segment(seg: np.ndarray, count: int, rng: np.random.Generator, is_special: np.ndarray, mask_id: int,
                  replacements: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Mask `count` random non-special tokens of `seg` (80% [MASK], 10% random non-special token, 10% kept).

    Returns (masked segment, selected positions). The draws depend only on `rng`, `count` and `seg`.
    """
    eligible = np.flatnonzero(~is_special[seg])
    chosen = eligible[rng.permutation(len(eligible))[:count]]
    action = rng.random(len(chosen))
    random_tokens = replacements[rng.integers(0, len(replacements), len(chosen))]
    out = seg.copy()
    out[chosen[action < 0.8]] = mask_id
    swap = (action >= 0.8) & (action < 0.9)
    out[chosen[swap]] = random_tokens[swap]
    return out, chosen


def bert_batch(rows: np.ndarray, indices: Iterable[int], *, seed: int, seq_length: int, cls_id: int, sep_id: int,
               mask_id: int, pad_id: int, eos_id: int | None, vocab_size: int, special_ids: Iterable[int],
               mask_prob: float = 0.15, short_seq_prob: float = 0.1,
               max_predictions: int | None = None) -> dict[str, np.ndarray]:
    """BERT pretraining samples (Devlin et al. 2019; Google's create_pretraining_data.py) from packed rows.

    For row i (global sample index `indices[i]`), `[CLS] A [SEP] B [SEP]` padded with `pad_id` to `seq_length`:
    - The row is split into documents at `eos_id` (EOS tokens dropped; None = the row is one document). One
      document piece of >= 2 tokens is chosen (probability proportional to its length), and a window of
      `target` tokens from it: `seq_length - 3`, or with probability `short_seq_prob` a random length in
      [2, seq_length - 3] (fewer long/short mismatches with fine-tuning, as in the paper).
    - A = the window up to a random cut point (>= 1 token); with probability 0.5 B = the rest of the window,
      the actual continuation in the same document (is_random_next=0). Otherwise (is_random_next=1) B is
      `target - len(A)` tokens from a document piece of ANOTHER ROW OF THIS MICRO BATCH (row and start drawn
      at random): negatives come from within the micro batch, not the whole corpus. With a batch of one
      row, another document of the same row serves; if there is none the sample stays a positive.
      Pieces are never merged across EOS, so a positive pair never spans two documents. (Two rows of one
      batch can hold parts of one long document; such a negative is then a same-document pair: rare noise.)
    - `truncate_seq_pair` keeps A + B <= seq_length - 3 (a guard: the construction above already fits).
    - MLM: per segment, round(mask_prob * eligible) of its tokens not in `special_ids` are selected (at least
      1 in A; capped at `max_predictions` in total, B yielding first); of those 80% become `mask_id`, 10% a
      random token outside `special_ids`, 10% stay. Labels are the original tokens there, loss_mask 1.

    Determinism: all draws come from `SeedSequence([seed, index])`, spawned into independent streams for the
    pair (target, piece, window, cut, coin), the negative (row, piece, start), A's masking and B's masking.
    So a sample is a pure function of (seed, index, its row) when is_random_next=0, and of those plus the batch
    otherwise, where A and A's masking still do not depend on the batch (only B does).

    Returns int64 `tokens`, `token_types` (0: [CLS] A [SEP] and padding, 1: B [SEP]), `padding_mask`
    (1 = real token; the model builds its [b, 1, s, s] mask from it), `lm_labels` (`pad_id` where not
    selected), all [b, seq_length]; float32 `loss_mask` [b, seq_length]; int64 `is_random_next` [b].
    """
    rows = _rows(rows, min_width=1)
    indices = [int(i) for i in indices]
    b = len(rows)
    if len(indices) != b:
        raise ValueError(f"bert_batch: {b} rows but {len(indices)} indices")
    max_num_tokens = seq_length - 3
    if max_num_tokens < 2:
        raise ValueError(f"bert_batch: seq_length must be >= 5 for [CLS] A [SEP] B [SEP], got {seq_length}")
    is_special = np.zeros(vocab_size, dtype=bool)  # [V]
    is_special[[i for i in special_ids if 0 <= i < vocab_size]] = True
    replacements = np.flatnonzero(~is_special)  # ids a selected token may be swapped for
    cap = max_predictions if max_predictions is not None else seq_length

    tokens = np.full((b, seq_length), pad_id, dtype=np.int64)
    token_types = np.zeros((b, seq_length), dtype=np.int64)
    padding_mask = np.zeros((b, seq_length), dtype=np.int64)
    lm_labels = np.full((b, seq_length), pad_id, dtype=np.int64)
    loss_mask = np.zeros((b, seq_length), dtype=np.float32)
    is_random_next = np.zeros(b, dtype=np.int64)
    pieces = [_documents(row, eos_id) for row in rows]

    for i in range(b):
        pair_rng, neg_rng, mask_a_rng, mask_b_rng = (
            np.random.default_rng(s) for s in np.random.SeedSequence([seed, indices[i]]).spawn(4))
        # --- A and the true continuation, from one document of this row ---
        short = pair_rng.random() < short_seq_prob
        target = int(pair_rng.integers(2, max_num_tokens + 1)) if short else max_num_tokens
        cands = [p for p in pieces[i] if len(p) >= 2]
        if not cands:  # only 0/1-token documents in this row (e.g. a corpus of empty lines): degenerate sample
            flat = np.concatenate(pieces[i]) if pieces[i] else rows[i][:0]
            a, b_seg, random_next = flat[:max_num_tokens], flat[:0], False
        else:
            doc = cands[_pick(cands, pair_rng)]
            start = int(pair_rng.integers(0, len(doc) - min(len(doc), target) + 1))
            window = doc[start:start + target]
            cut = int(pair_rng.integers(1, len(window)))  # A gets 1 .. len-1 tokens
            a, b_seg = window[:cut], window[cut:]
            random_next = pair_rng.random() < 0.5
        if random_next:
            if b > 1:
                j = int(neg_rng.integers(0, b - 1))
                j += j >= i  # any row but this one
                others = pieces[j]
            else:
                others = [p for p in pieces[i] if p is not doc]
            if others:
                other = others[_pick(others, neg_rng)]
                want = target - len(a)  # >= 1: the cut leaves B at least one token
                start = int(neg_rng.integers(0, max(1, len(other) - want + 1)))
                b_seg = other[start:start + want]
            else:
                random_next = False  # nothing to draw a negative from
        a, b_seg = truncate_seq_pair(a, b_seg, max_num_tokens, pair_rng)

        # --- MLM, each segment from its own stream (A's masking never depends on B) ---
        eligible_a = int(np.count_nonzero(~is_special[a]))
        eligible_b = int(np.count_nonzero(~is_special[b_seg]))
        count_a = int(round(mask_prob * eligible_a))
        count_b = int(round(mask_prob * eligible_b))
        if eligible_a:
            count_a = max(1, count_a)
        elif eligible_b:
            count_b = max(1, count_b)  # "at least one prediction" falls to B only when A has no candidate
        count_a = min(count_a, cap)
        count_b = min(count_b, cap - count_a)
        masked_a, chosen_a = _mask_segment(a, count_a, mask_a_rng, is_special, mask_id, replacements)
        masked_b, chosen_b = _mask_segment(b_seg, count_b, mask_b_rng, is_special, mask_id, replacements)

        # --- assemble [CLS] A [SEP] B [SEP] pad... ---
        la, lb = len(a), len(b_seg)
        b_start = la + 2
        n = la + lb + 3
        tokens[i, :n] = np.concatenate([[cls_id], masked_a, [sep_id], masked_b, [sep_id]])
        token_types[i, b_start:n] = 1
        padding_mask[i, :n] = 1
        for chosen, seg, offset in ((chosen_a, a, 1), (chosen_b, b_seg, b_start)):
            lm_labels[i, chosen + offset] = seg[chosen]
            loss_mask[i, chosen + offset] = 1.0
        is_random_next[i] = int(random_next)
    return {"tokens": tokens, "token_types": token_types, "padding_mask": padding_mask, "lm_labels": lm_labels,
            "loss_mask": loss_mask, "is_random_next": is_random_next}


# ----- Transformer-XL -----

def txl_batch(segment: np.ndarray) -> dict[str, np.ndarray]:
    """Inputs and next-token targets of one ordered-stream segment [b, tgt_len + 1].

    Returns `inputs` and `targets`, int64 [b, tgt_len], batch first like every other batch here; the reference
    `LMOrderedIterator` yields [tgt_len, b], so the Transformer-XL model transposes (`inputs.t()`). Row r of
    consecutive segments continues one stream: the reader repeats the last token of segment k as the first of
    segment k+1, so the inputs of consecutive segments are contiguous, as in the reference.
    """
    segment = _rows(segment)
    return {"inputs": np.ascontiguousarray(segment[:, :-1]), "targets": np.ascontiguousarray(segment[:, 1:])}
