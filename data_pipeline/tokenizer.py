"""Sentencepiece tokenizer: training from streamed documents, and a small wrapper used everywhere else.

Special ids are fixed for every model this project trains: pad=0, unk=1, bos=2, eos=3. The shard writer appends
`eos_id` after each document; models and the loss can rely on `pad_id == 0`.
"""

from __future__ import annotations

import hashlib
import io
import os
import pathlib
import time
from typing import Iterator, Sequence

import sentencepiece as spm

from data_pipeline.corpus import expand_inputs, read_documents
from data_pipeline.errors import DataError

PAD_ID, UNK_ID, BOS_ID, EOS_ID = 0, 1, 2, 3

# sentencepiece skips "sentences" longer than this many bytes (its default is 4192); lines of prose rarely are.
MAX_SENTENCE_LENGTH = 16384


def _sentences(files: Sequence[pathlib.Path], text_key: str) -> Iterator[str]:
    """Yield the non-empty lines of every document: sentencepiece trains on "sentences", not whole documents."""
    for path in files:
        for doc in read_documents(path, text_key=text_key):
            for line in doc.splitlines():
                if line.strip():
                    yield line


def train_tokenizer(
    inputs: list[str],
    output_prefix: str,
    vocab_size: int,
    model_type: str = "bpe",
    character_coverage: float = 1.0,
    byte_fallback: bool = True,
    input_sentence_size: int = 0,
    num_threads: int = 2,
    text_key: str = "text",
    verbose: bool = False,
) -> pathlib.Path:
    """Train a sentencepiece model on documents streamed from `inputs` (paths or globs); return the `.model` path.

    Writes `output_prefix.model` and `output_prefix.vocab`. `input_sentence_size > 0` makes sentencepiece sample
    that many lines (bounded memory on large corpora); 0 uses every line. The model bytes, hence `sha256`,
    depend only on the inputs and these settings (num_threads included: sentencepiece records it), not on paths.

    The normalizer is lossless on purpose (identity rules, whitespace kept, byte fallback for unseen characters
    and newlines), so `decode(encode(text)) == text`: generated text keeps line breaks, and no document is altered
    before it becomes training tokens. Sentencepiece's default (nmt_nfkc, collapsed whitespace) is not.

    Progress: a line before and after (with timing); `verbose=True` adds sentencepiece's own INFO log, which is
    useful on long runs (unigram on 100 MB takes minutes) but lists every one of the 256 byte pieces.
    """
    if model_type not in ("bpe", "unigram"):
        raise DataError(f"unsupported tokenizer model_type {model_type!r} (use bpe or unigram)")
    files = expand_inputs(inputs)
    prefix = pathlib.Path(output_prefix)
    prefix.parent.mkdir(parents=True, exist_ok=True)
    print(f"tokenizer: training {model_type} vocab={vocab_size} on {len(files)} file(s) -> {prefix}.model", flush=True)
    start = time.perf_counter()
    # Sentence sampling (input_sentence_size > 0) and shuffling otherwise draw from a random seed: fix it so the
    # same inputs give the same model, hence the same sha256 in every manifest built from it.
    spm.set_random_generator_seed(0)
    # model_writer instead of model_prefix: the model then records no output path, so the same corpus and
    # settings give byte-identical models (and sha256) wherever they are written. We write both files ourselves.
    model_bytes = io.BytesIO()
    try:
        spm.SentencePieceTrainer.train(
            sentence_iterator=_sentences(files, text_key),
            model_writer=model_bytes,
            vocab_size=vocab_size,
            model_type=model_type,
            character_coverage=character_coverage,
            byte_fallback=byte_fallback,
            input_sentence_size=input_sentence_size,
            shuffle_input_sentence=True,
            num_threads=num_threads,
            pad_id=PAD_ID,
            unk_id=UNK_ID,
            bos_id=BOS_ID,
            eos_id=EOS_ID,
            normalization_rule_name="identity",
            remove_extra_whitespaces=False,
            max_sentence_length=MAX_SENTENCE_LENGTH,
            minloglevel=0 if verbose else 1,
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
    print(
        f"tokenizer: done in {time.perf_counter() - start:.1f}s, vocab={tok.vocab_size}, sha256={tok.sha256[:16]}…",
        flush=True,
    )
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
        self._sp = spm.SentencePieceProcessor()
        try:
            # Load from the bytes already hashed, so sha256 describes exactly the model in use.
            self._sp.LoadFromSerializedProto(data)
        except RuntimeError as exc:
            raise DataError(f"not a sentencepiece model: {self.model_path} ({exc})") from None

    def encode(self, text: str) -> list[int]:
        """Token ids of `text`, without bos/eos (the shard writer adds eos between documents)."""
        return self._sp.encode(text, out_type=int)

    def decode(self, ids: Sequence[int]) -> str:
        """Text of `ids`; control ids (pad/bos/eos) decode to nothing."""
        return self._sp.decode([int(i) for i in ids])

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
    def sha256(self) -> str:
        """Hex sha256 of the model file's bytes: the tokenizer's identity in manifests and checkpoints."""
        return self._sha256

    def __repr__(self) -> str:
        return f"Tokenizer({str(self.model_path)!r}, vocab_size={self.vocab_size}, sha256={self.sha256[:12]})"
