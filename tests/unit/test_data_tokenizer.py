"""Tokenizer special symbols, sampling and CLI flags (basic round trip and reproducibility: test_data_pipeline.py)."""

import argparse

import numpy as np
import pytest

from data_pipeline import DataError
from data_pipeline.cli import register
from data_pipeline.testing import write_corpus_slice
from data_pipeline.tokenizer import Tokenizer, sample_lines, train_tokenizer

VOCAB = 400


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    return str(write_corpus_slice(tmp_path_factory.mktemp("corpus") / "c.jsonl", num_docs=4, chars_per_doc=6000))


@pytest.fixture(scope="module")
def default_tok(corpus, tmp_path_factory):
    return Tokenizer(train_tokenizer([corpus], str(tmp_path_factory.mktemp("tok") / "tok"), VOCAB))


def _parse(argv):
    parser = argparse.ArgumentParser(prog="pretrain")
    register(parser.add_subparsers(dest="command"))
    return parser.parse_args(argv)


def test_default_has_bert_symbols_as_control_pieces(default_tok):
    tok = default_tok
    assert (tok.pad_id, tok.unk_id, tok.bos_id, tok.eos_id) == (0, 1, 2, 3)
    assert (tok.cls_id, tok.sep_id, tok.mask_id) == (4, 5, 6)
    assert tok.special_ids == frozenset(range(7)) and tok.vocab_size == VOCAB
    assert [tok.id_to_piece(i) for i in (4, 5, 6)] == ["[CLS]", "[SEP]", "[MASK]"]
    # Control symbols are never produced from text: a corpus containing "[MASK]" cannot inject mask tokens.
    text = "Say [CLS] and [MASK], then [SEP]."
    ids = tok.encode(text)
    assert not set(ids) & tok.special_ids and tok.decode(ids) == text
    assert tok.decode([4] + ids + [5, 6]) == text  # and they decode to nothing
    assert tok.piece_id("[NOPE]") is None and tok.piece_id("<unk>") == 1


def test_custom_and_no_special_symbols(corpus, tmp_path, default_tok):
    none = Tokenizer(train_tokenizer([corpus], str(tmp_path / "none"), VOCAB, special_symbols=()))
    assert (none.cls_id, none.sep_id, none.mask_id) == (None, None, None)
    assert none.special_ids == frozenset(range(4)) and none.sha256 != default_tok.sha256
    custom = Tokenizer(train_tokenizer([corpus], str(tmp_path / "custom"), VOCAB,
                                       special_symbols=("[MASK]", "<sep>"), user_defined_symbols=("<|code|>",)))
    assert (custom.mask_id, custom.piece_id("<sep>"), custom.cls_id, custom.sep_id) == (4, 5, None, None)
    code = custom.piece_id("<|code|>")
    assert code == 6 and custom.special_ids == frozenset(range(6))  # user-defined pieces are text, not special
    ids = custom.encode("a <|code|> b")
    assert code in ids and custom.decode(ids) == "a <|code|> b"


@pytest.mark.parametrize("kwargs,match", [
    ({"special_symbols": ("[CLS]", "[CLS]")}, "given twice"),
    ({"special_symbols": ("[CLS]",), "user_defined_symbols": ("[CLS]",)}, "given twice"),
    ({"special_symbols": ("</s>",)}, "reserved"),
    ({"special_symbols": ("",)}, "non-empty"),
    ({"user_defined_symbols": ("a b",)}, "whitespace"),
    ({"model_type": "word"}, "bpe or unigram"),
])
def test_bad_symbols_and_options(corpus, tmp_path, kwargs, match):
    with pytest.raises(DataError, match=match):
        train_tokenizer([corpus], str(tmp_path / "t"), VOCAB, **kwargs)


def test_sentence_sampling_is_seeded_and_shuffle_matters(corpus, tmp_path, default_tok):
    def sha(name, **kw):
        return Tokenizer(train_tokenizer([corpus], str(tmp_path / name), VOCAB, input_sentence_size=150, **kw)).sha256

    first = sha("a")
    assert sha("b") == first  # sampled lines are drawn from a fixed seed: reproducible
    assert first != default_tok.sha256  # 150 of ~700 lines: a different model than training on all
    assert sha("c", shuffle_input_sentence=False) != first  # the first 150 lines, not a random 150


def test_byte_fallback_off_gives_unk(corpus, tmp_path, default_tok):
    tok = Tokenizer(train_tokenizer([corpus], str(tmp_path / "nb"), VOCAB, byte_fallback=False))
    assert tok.unk_id in tok.encode("✓")
    assert tok.unk_id not in default_tok.encode("✓")


def test_progress_lines_and_verbose_log(corpus, tmp_path, capfd, caplog):
    with caplog.at_level("INFO", logger="data_pipeline.tokenizer"):
        train_tokenizer([corpus], str(tmp_path / "q"), VOCAB)
    lines = [r.getMessage() for r in caplog.records if r.name == "data_pipeline.tokenizer"]
    assert len(lines) == 2 and "special: [CLS] [SEP] [MASK]" in lines[0] and lines[1].startswith("tokenizer: done in")
    assert "trainer_interface" not in capfd.readouterr().err  # sentencepiece's own log only with verbose
    train_tokenizer([corpus], str(tmp_path / "v"), VOCAB, verbose=True)
    assert "trainer_interface" in capfd.readouterr().err


def test_cli_symbol_and_sampling_flags(corpus, tmp_path, capsys):
    args = _parse(["tokenizer", "train", "--input", corpus, "--output", str(tmp_path / "t"), "--vocab-size", "400",
                   "--special-symbols", "", "--user-defined-symbols", "<a>,<b>", "--no-byte-fallback",
                   "--input-sentence-size", "150", "--no-shuffle-input-sentence"])
    assert (args.byte_fallback, args.shuffle_input_sentence) == (False, False)
    assert args.func(args, []) == 0
    tok = Tokenizer(tmp_path / "t.model")
    assert tok.cls_id is None and (tok.piece_id("<a>"), tok.piece_id("<b>")) == (4, 5)
    expected = train_tokenizer([corpus], str(tmp_path / "api"), VOCAB, special_symbols=(),
                               user_defined_symbols=("<a>", "<b>"), byte_fallback=False, input_sentence_size=150,
                               shuffle_input_sentence=False)
    assert tok.sha256 == Tokenizer(expected).sha256
    args = _parse(["tokenizer", "train", "--input", corpus, "--output", "x"])
    assert (args.special_symbols, args.byte_fallback, args.shuffle_input_sentence) == ("[CLS],[SEP],[MASK]", True,
                                                                                        True)


def test_default_sample_is_bounded_seeded_and_progress_is_quiet_off_a_terminal(corpus, tmp_path, capfd,
                                                                                 default_tok):
    from data_pipeline.tokenizer import DEFAULT_INPUT_SENTENCES

    assert _parse(["tokenizer", "train", "--input", corpus, "--output", "x"]).input_sentence_size \
        == DEFAULT_INPUT_SENTENCES == 10_000_000  # bounded by default, the CLI as the API
    a = train_tokenizer([corpus], str(tmp_path / "a"), VOCAB, input_sentence_size=150, seed=1, verbose=True)
    err = capfd.readouterr().err
    assert "Loaded all 150 sentences" in err  # sentencepiece holds the sample only: memory bounded by it
    assert "tokenizer: reading" not in err  # tqdm only on a terminal (pytest's stderr is not one)
    b = train_tokenizer([corpus], str(tmp_path / "b"), VOCAB, input_sentence_size=150, seed=2)
    c = train_tokenizer([corpus], str(tmp_path / "c"), VOCAB, input_sentence_size=150, seed=1)
    assert Tokenizer(a).sha256 == Tokenizer(c).sha256 != Tokenizer(b).sha256  # the seed picks the sample
    # The sample is uniform over all lines: every line equally likely (chi-square of 10,000 picks, 250 per line;
    # fixed seeds: the same numbers every run).
    counts = np.zeros(40, dtype=np.int64)
    for seed in range(2500):
        counts[[int(x) for x in sample_lines((str(i) for i in range(40)), 4, seed)]] += 1
    assert ((counts - 250) ** 2 / 250).sum() < 80  # 39 degrees of freedom: p ~ 1e-4 at 80
    assert sample_lines(iter(["a", "b"]), 4, 0) == ["a", "b"] and sample_lines(iter("abcdef"), 2, 0, False) == ["a", "b"]
