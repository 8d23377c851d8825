"""Sentencepiece tokenizer: training from streamed documents, and a small wrapper used everywhere else.

Special ids are fixed for every model this project trains: pad=0, unk=1, bos=2, eos=3. The shard writer appends
`eos_id` after each document; models and the loss can rely on `pad_id == 0`. After them come the special
symbols, by default `[CLS]`=4, `[SEP]`=5, `[MASK]`=6, so one tokenizer (and one set of shards) serves GPT and BERT.

Special symbols are sentencepiece *control* symbols, not user-defined ones, on purpose: `encode` never produces
them from text, so a corpus that happens to contain the string "[MASK]" cannot inject mask tokens into the
training data; the batch builders insert them by id. Pieces that should always stay one token when they appear
in text (e.g. "<|code|>") are `user_defined_symbols`, which sentencepiece does match in the input.
"""

from __future__ import annotations

import hashlib
import io
import logging
import math
import os
import pathlib
import signal
import time
from typing import Iterator, Sequence

import numpy as np
import sentencepiece as spm

from tqdm import tqdm

from data_pipeline.corpus import expand_inputs, read_documents
from data_pipeline.errors import DataError

logger = logging.getLogger(__name__)

PAD_ID, UNK_ID, BOS_ID, EOS_ID = 0, 1, 2, 3
_RESERVED_PIECES = ("<pad>", "<unk>", "<s>", "</s>")
BERT_SYMBOLS = ("[CLS]", "[SEP]", "[MASK]")

# sentencepiece skips "sentences" longer than this many bytes (its default is 4192); lines of prose rarely are.
MAX_SENTENCE_LENGTH = 16384
# Lines the tokenizer trains on by default: a seeded reservoir sample (`sample_lines`), uniform over every line of
# every input, so memory is bounded whatever the corpus size: at most DEFAULT_INPUT_SENTENCES lines of at most
# MAX_SENTENCE_LENGTH bytes (longer ones are skipped): 164 GB in the worst case, ~1 GB for prose lines of ~100
# bytes, plus sentencepiece's working set on that sample (BPE 32k on 100 MB: ~12 s; unigram ~1.7 GB RSS,
# STACK_NOTES.md). 10M lines is the size sentencepiece's authors suggest for large corpora; 0: every line.
# Ours, not sentencepiece's input_sentence_size: its reservoir ignores set_random_generator_seed (measured with
# 0.2.x: every seed gave the same model), and a corpus under the bound then trains exactly as without one.
DEFAULT_INPUT_SENTENCES = 10_000_000


def _sentences(files: Sequence[pathlib.Path], text_key: str) -> Iterator[str]:
    """Yield the non-empty lines of every document: sentencepiece trains on "sentences", not whole documents.
    Lines over MAX_SENTENCE_LENGTH bytes, which sentencepiece would skip, are skipped here (the sample's bound)."""
    for path in files:
        for doc in read_documents(path, text_key=text_key):
            for line in doc.splitlines():
                if line.strip() and (4 * len(line) <= MAX_SENTENCE_LENGTH
                                     or len(line.encode("utf-8")) <= MAX_SENTENCE_LENGTH):
                    yield line


def sample_lines(lines: Iterator[str], size: int, seed: int, shuffle: bool = True) -> list[str]:
    """A uniform random sample of `size` lines of the stream (all of them, in order, if there are no more),
    drawn with `seed` (reservoir sampling, Li's algorithm L: one random draw per line kept, not per line read);
    `shuffle=False`: the first `size` lines. Memory: the sample only."""
    rng = np.random.default_rng(seed)
    it = iter(lines)
    sample = [line for _, line in zip(range(size), it)]
    if len(sample) < size or not shuffle:
        return sample

    def draw() -> float:  # in (0, 1]: never log(0)
        return 1.0 - rng.random()

    w = math.exp(math.log(draw()) / size)
    take = size + int(math.log(draw()) / math.log1p(-w)) if w < 1 else size  # index of the next line kept
    for i, line in enumerate(it, start=size):
        if i == take:
            sample[int(rng.integers(size))] = line
            w *= math.exp(math.log(draw()) / size)
            take = i + 1 + (int(math.log(draw()) / math.log1p(-w)) if w < 1 else 0)
    return sample


def _check_symbols(special: Sequence[str], user_defined: Sequence[str]) -> None:
    """Reject symbol lists sentencepiece would accept but that make ids ambiguous (duplicates, blanks)."""
    seen: set[str] = set()
    for sym in (*special, *user_defined):
        if not sym or sym != sym.strip() or " " in sym:
            raise DataError(f"tokenizer symbol {sym!r} must be non-empty and contain no whitespace")
        if sym in _RESERVED_PIECES:
            raise DataError(f"tokenizer symbol {sym!r} is reserved (pad/unk/bos/eos have fixed ids 0-3)")
        if sym in seen:
            raise DataError(f"tokenizer symbol {sym!r} given twice")
        seen.add(sym)


def train_tokenizer(
    inputs: list[str],
    output_prefix: str,
    vocab_size: int,
    model_type: str = "bpe",
    character_coverage: float = 1.0,
    byte_fallback: bool = True,
    input_sentence_size: int = DEFAULT_INPUT_SENTENCES,
    shuffle_input_sentence: bool = True,
    num_threads: int = 2,
    text_key: str = "text",
    special_symbols: Sequence[str] = BERT_SYMBOLS,
    user_defined_symbols: Sequence[str] = (),
    verbose: bool = False,
    seed: int = 0,
) -> pathlib.Path:
    """Train a sentencepiece model on documents streamed from `inputs` (paths or globs); return the `.model` path.

    Writes `output_prefix.model` and `output_prefix.vocab`. sentencepiece keeps `input_sentence_size` lines
    (default DEFAULT_INPUT_SENTENCES: memory bounded on any corpus, see there), a reservoir sample uniform over
    all lines of all inputs drawn with `seed` (`shuffle_input_sentence=False`: the first N instead); 0 uses every
    line. The model bytes, hence `sha256`, depend only on the inputs and these settings (num_threads included:
    sentencepiece records it), not on paths.

    `special_symbols` become control pieces with ids 4, 5, ... in the order given (default `[CLS] [SEP] [MASK]`
    for BERT; `()` for none); `user_defined_symbols` follow them. Each takes one slot of `vocab_size`.

    The normalizer is lossless on purpose (identity rules, whitespace kept, byte fallback for unseen characters
    and newlines), so `decode(encode(text)) == text`: generated text keeps line breaks, and no document is altered
    before it becomes training tokens. Sentencepiece's default (nmt_nfkc, collapsed whitespace) is not.

    Progress: a line before and after (with timing), and a tqdm bar of the lines read (on a terminal only);
    `verbose=True` adds sentencepiece's own INFO log, which is
    useful on long runs (unigram on 100 MB takes minutes) but lists every one of the 256 byte pieces.
    """
    if model_type not in ("bpe", "unigram"):
        raise DataError(f"unsupported tokenizer model_type {model_type!r} (use bpe or unigram)")
    special_symbols, user_defined_symbols = list(special_symbols), list(user_defined_symbols)
    _check_symbols(special_symbols, user_defined_symbols)
    files = expand_inputs(inputs)
    prefix = pathlib.Path(output_prefix)
    prefix.parent.mkdir(parents=True, exist_ok=True)
    symbols = " ".join(special_symbols) or "none"
    sampling = f", a seeded sample of at most {input_sentence_size} lines" if input_sentence_size else ""
    logger.info("tokenizer: training %s vocab=%d (special: %s%s) on %d file(s) -> %s.model", model_type, vocab_size,
                symbols, sampling, len(files), prefix)
    start = time.perf_counter()
    # Sentence sampling (input_sentence_size > 0) and shuffling otherwise draw from a random seed: fix it so the
    # same inputs give the same model, hence the same sha256 in every manifest built from it.
    spm.set_random_generator_seed(0)
    # model_writer instead of model_prefix: the model then records no output path, so the same corpus and
    # settings give byte-identical models (and sha256) wherever they are written. We write both files ourselves.
    model_bytes = io.BytesIO()
    lines = tqdm(_sentences(files, text_key), desc="tokenizer: reading", unit=" lines", mininterval=1.0,
                 disable=None)  # disable=None: a bar on a terminal only
    sentences = sample_lines(lines, input_sentence_size, seed, shuffle_input_sentence) if input_sentence_size \
        else lines
    extra = {}
    # Passed only when non-empty: sentencepiece treats an empty list differently from an absent flag on some
    # versions, and the default model then stays byte-identical to one trained without the option.
    if special_symbols:
        extra["control_symbols"] = special_symbols
    if user_defined_symbols:
        extra["user_defined_symbols"] = user_defined_symbols
    try:
        spm.SentencePieceTrainer.train(
            sentence_iterator=iter(sentences),
            model_writer=model_bytes,
            vocab_size=vocab_size,
            model_type=model_type,
            character_coverage=character_coverage,
            byte_fallback=byte_fallback,
            shuffle_input_sentence=shuffle_input_sentence,
            num_threads=num_threads,
            pad_id=PAD_ID,
            unk_id=UNK_ID,
            bos_id=BOS_ID,
            eos_id=EOS_ID,
            normalization_rule_name="identity",
            remove_extra_whitespaces=False,
            max_sentence_length=MAX_SENTENCE_LENGTH,
            minloglevel=0 if verbose else 1,
            **extra,
        )
    except RuntimeError as exc:
        # e.g. "Vocabulary size too high" on a small corpus: one line, naming the output.
        raise DataError(f"tokenizer training for {prefix}.model failed: {exc}") from None
    model_path = pathlib.Path(f"{prefix}.model")
    model_path.write_bytes(model_bytes.getvalue())
    tok = Tokenizer(model_path)
    sp = tok._sp
    vocab = "".join(f"{sp.id_to_piece(i)}\t{sp.get_score(i):g}\n" for i in range(sp.get_piece_size()))
    pathlib.Path(f"{prefix}.vocab").write_text(vocab, encoding="utf-8")
    logger.info("tokenizer: done in %.1fs, vocab=%d, sha256=%s…", time.perf_counter() - start, tok.vocab_size,
                tok.sha256[:16])
    return model_path


class Tokenizer:
    """A loaded sentencepiece model plus the identity (sha256) that shard manifests and checkpoints record."""

    def __init__(self, model_path: str | os.PathLike):
        """Load `model_path` (a sentencepiece `.model` file); a missing or invalid file raises DataError."""
        self.model_path = pathlib.Path(model_path)
        try:
            data = self.model_path.read_bytes()
        except OSError as exc:
            raise DataError(f"tokenizer model not readable: {self.model_path} ({exc.strerror})") from None
        self._sha256 = hashlib.sha256(data).hexdigest()
        self._sp = _load_processor(data, self.model_path)
        self._special_ids: frozenset[int] | None = None

    def encode(self, text: str) -> list[int]:
        """Token ids of `text`, without bos/eos (the shard writer adds eos between documents)."""
        return self._sp.encode(text, out_type=int)

    def decode(self, ids: Sequence[int]) -> str:
        """Text of `ids`; control ids (pad/bos/eos and the special symbols) decode to nothing."""
        return self._sp.decode([int(i) for i in ids])

    def piece_id(self, piece: str) -> int | None:
        """Id of the piece spelled `piece` (e.g. "[MASK]"), or None when the vocabulary lacks it."""
        i = self._sp.piece_to_id(piece)
        # piece_to_id answers unk_id for unknown pieces; only "<unk>" itself really is that id.
        return None if i == self._sp.unk_id() and piece != self._sp.id_to_piece(i) else i

    def id_to_piece(self, i: int) -> str:
        """The vocabulary piece of id `i` (shows control symbols, which `decode` drops): for debugging samples."""
        return self._sp.id_to_piece(int(i))

    @property
    def vocab_size(self) -> int:
        """Number of ids (pieces incl. special and byte-fallback pieces)."""
        return self._sp.get_piece_size()

    @property
    def bos_id(self) -> int:
        """Beginning-of-sequence id."""
        return self._sp.bos_id()

    @property
    def eos_id(self) -> int:
        """End-of-document id, appended after every document in the shards."""
        return self._sp.eos_id()

    @property
    def pad_id(self) -> int:
        """Padding id (0 for models trained here)."""
        return self._sp.pad_id()

    @property
    def unk_id(self) -> int:
        """Unknown-piece id (1; rare with byte fallback)."""
        return self._sp.unk_id()

    @property
    def cls_id(self) -> int | None:
        """BERT's `[CLS]` id (4 by default), None if the model was trained without it."""
        return self.piece_id("[CLS]")

    @property
    def sep_id(self) -> int | None:
        """BERT's `[SEP]` id (5 by default), None if absent."""
        return self.piece_id("[SEP]")

    @property
    def mask_id(self) -> int | None:
        """BERT's `[MASK]` id (6 by default), None if absent."""
        return self.piece_id("[MASK]")

    @property
    def special_ids(self) -> frozenset[int]:
        """Ids that are never text: unk and every control piece (pad, bos, eos, [CLS], [SEP], [MASK], ...).

        BERT masking never selects these nor uses them as random replacements. User-defined symbols are text
        (encode produces them) and are not included.
        """
        if self._special_ids is None:
            sp = self._sp
            self._special_ids = frozenset(
                i for i in range(sp.get_piece_size()) if sp.is_control(i) or sp.is_unknown(i))
        return self._special_ids

    def model_proto(self) -> bytes:
        """The loaded model, serialized: what the shard writer's worker processes load (no second file read)."""
        return self._sp.serialized_model_proto()

    @property
    def sha256(self) -> str:
        """Hex sha256 of the model file's bytes: the tokenizer's identity in manifests and checkpoints."""
        return self._sha256

    def __repr__(self) -> str:
        return f"Tokenizer({str(self.model_path)!r}, vocab_size={self.vocab_size}, sha256={self.sha256[:12]})"


def _load_processor(data: bytes, path: pathlib.Path) -> spm.SentencePieceProcessor:
    sp = spm.SentencePieceProcessor()
    try:
        # Load from the bytes already hashed, so sha256 describes exactly the model in use.
        sp.LoadFromSerializedProto(data)
    except RuntimeError as exc:
        raise DataError(f"not a sentencepiece model: {path} ({exc})") from None
    return sp


# ----- encoding for the shard writer's worker processes -----
# These live here, not in shards.py, because a spawned worker imports the module of the function it runs:
# this one costs ~0.1 s (sentencepiece), shards.py ~1 s (webdataset imports torch).

_WORKER_SP: spm.SentencePieceProcessor | None = None


def init_encode_worker(model_bytes: bytes) -> None:
    """Pool initializer: load the sentencepiece model once per worker process (from bytes: no path races)."""
    global _WORKER_SP
    # Ctrl-C reaches the whole process group: let the parent alone handle it (it terminates the pool), instead
    # of every worker printing its own KeyboardInterrupt traceback.
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    _WORKER_SP = _load_processor(model_bytes, pathlib.Path("<worker>"))


def encode_documents(docs: Sequence[str], tokenizer: Tokenizer | None = None) -> tuple[int, np.ndarray]:
    """Encode a chunk of documents into one int32 stream `doc0 eos doc1 eos ...`; return (text bytes, stream).

    Uses `tokenizer`, else the model this worker loaded in `init_encode_worker`. The result depends only on
    `docs`, so the shard bytes are the same for any number of workers or chunk size.
    """
    sp = tokenizer._sp if tokenizer is not None else _WORKER_SP
    assert sp is not None, "init_encode_worker() not called"
    eos = sp.eos_id()
    # num_threads=1: parallelism comes from the worker processes; sentencepiece's own threads would oversubscribe.
    flat: list[int] = []
    for ids in sp.encode(list(docs), out_type=int, num_threads=1):
        flat.extend(ids)
        flat.append(eos)
    text_bytes = sum(len(d.encode("utf-8")) for d in docs)
    return text_bytes, np.array(flat, dtype=np.int32)  # int32: half the pickling cost of int64 back to the parent
