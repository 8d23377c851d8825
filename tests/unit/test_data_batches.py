"""Model-aware batches: GPT (packed, and Megatron's reset at EOS), BERT (pairs, NSP, MLM), Transformer-XL."""

import tarfile

import numpy as np
import pytest

from data_pipeline import DataError
from data_pipeline.batches import bert_batch, bert_token_ids, gpt_batch, truncate_seq_pair, txl_batch
from data_pipeline.testing import build_tiny_dataset

SEQ = 128  # BERT sequence length; rows hold SEQ + 1 tokens
EOS = 3


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    """Real tokenizer (with [CLS] [SEP] [MASK]) and shard rows, read with plain tarfile (reader-independent)."""
    tiny = build_tiny_dataset(tmp_path_factory.mktemp("bert"), seq_length=SEQ, samples_per_shard=4)
    m = tiny["manifest"]
    blocks = []
    for shard in m["shards"]:
        with tarfile.open(tiny["shards"] / shard["name"]) as tar:
            blocks += [np.frombuffer(tar.extractfile(mem).read(), "<u2") for mem in tar.getmembers()]
    rows = np.concatenate(blocks).astype(np.int64).reshape(-1, SEQ + 1)
    return {"rows": rows, "ids": bert_token_ids(m), "manifest": m}


def bert(data, rows, indices, seed=1, **kw):
    return bert_batch(rows, indices, seed=seed, seq_length=SEQ, **data["ids"], **kw)


def windows_contain(haystack, needle):
    """True if `needle` occurs contiguously in `haystack`."""
    if len(needle) == 0:
        return True
    if len(needle) > len(haystack):
        return False
    view = np.lib.stride_tricks.sliding_window_view(haystack, len(needle))
    return bool((view == needle).all(axis=1).any())


def documents(row):
    """The row's document pieces, EOS dropped (written independently of batches._documents)."""
    pieces = np.split(row, np.flatnonzero(row == EOS))
    return [p[p != EOS] for p in pieces if len(p[p != EOS])]


def segments(out, i):
    """(A, B) original token ids of sample i: masked tokens restored from the labels."""
    orig = out["tokens"][i].copy()
    sel = out["loss_mask"][i] == 1
    orig[sel] = out["lm_labels"][i][sel]
    seps = np.flatnonzero(out["tokens"][i] == 5)
    return orig[1:seps[0]], orig[seps[0] + 1:seps[1]]


# ----- GPT -----

def test_gpt_default_equals_model_batch_fn(data):
    torch = pytest.importorskip("torch")
    from pretrain.models.gpt import batch_fn

    rows = data["rows"][:4]
    ours = gpt_batch(rows)
    theirs = batch_fn(rows, torch.device("cpu"))
    inputs = theirs["inputs"]
    pairs = {"tokens": inputs["input_ids"], "labels": inputs["labels"], "position_ids": inputs["position_ids"],
             "loss_mask": theirs["loss_mask"]}
    # Plain packing hands the model no mask tensor: its layers are causal by mask type (pretrain/models/attention.py).
    assert inputs["attention_mask"] is None
    for key, expected in pairs.items():
        got = torch.from_numpy(np.ascontiguousarray(ours[key]))
        assert got.dtype == expected.dtype and got.shape == expected.shape, key
        assert torch.equal(got, expected), key
    assert ours["attention_mask"].shape == (1, 1, SEQ, SEQ)


def _megatron_ltor(tokens, eod):
    """Transcription of Megatron-LM's get_ltor_masks_and_position_ids (all three reset flags), loops included.
    Megatron's mask is True = may attend; returned here inverted to megatron-core's True = masked."""
    b, s = tokens.shape
    allowed = np.tril(np.ones((b, 1, s, s), dtype=bool))
    loss_mask = np.ones((b, s), dtype=np.float32)
    loss_mask[tokens == eod] = 0.0
    position_ids = np.tile(np.arange(s), (b, 1))
    for bi in range(b):
        eod_index = np.flatnonzero(tokens[bi] == eod)
        prev_index = 0
        for i in eod_index:
            allowed[bi, 0, i + 1:, :i + 1] = False
            position_ids[bi, i + 1:] -= i + 1 - prev_index
            prev_index = i + 1
    return ~allowed, position_ids, loss_mask


def test_gpt_reset_at_eos_handcrafted():
    row = np.array([[10, 11, EOS, 12, 13, 14, EOS, 15, 16]])
    out = gpt_batch(row, eos_id=EOS, reset_at_eos=True)
    assert out["tokens"].tolist() == [[10, 11, EOS, 12, 13, 14, EOS, 15]]
    assert out["labels"].tolist() == [[11, EOS, 12, 13, 14, EOS, 15, 16]]
    assert out["position_ids"].tolist() == [[0, 1, 2, 0, 1, 2, 3, 0]]
    # Input EOS (which would predict the next document's first token) is not a target; predicting EOS is.
    assert out["loss_mask"].tolist() == [[1, 1, 0, 1, 1, 1, 0, 1]]
    doc = [0, 0, 0, 1, 1, 1, 1, 2]
    expected = [[not (k <= q and doc[k] == doc[q]) for k in range(8)] for q in range(8)]
    assert out["attention_mask"].shape == (1, 1, 8, 8) and out["attention_mask"][0, 0].tolist() == expected
    with pytest.raises(ValueError, match="eos_id"):
        gpt_batch(row, reset_at_eos=True)


def test_gpt_reset_at_eos_matches_megatron_on_random_rows():
    rng = np.random.default_rng(0)
    rows = rng.integers(4, 9, size=(6, 41))
    rows[rng.random(rows.shape) < 0.15] = EOS
    rows[0, 0] = rows[1, -2] = rows[2, -1] = EOS  # EOS as first input, last input, last label
    out = gpt_batch(rows, eos_id=EOS, reset_at_eos=True)
    mask, pos, loss = _megatron_ltor(rows[:, :-1], EOS)
    assert np.array_equal(out["attention_mask"], mask) and np.array_equal(out["position_ids"], pos)
    assert np.array_equal(out["loss_mask"], loss) and out["loss_mask"].dtype == np.float32
    plain = gpt_batch(rows, eos_id=EOS)  # reset off: EOS is just a token
    assert plain["loss_mask"].all() and plain["attention_mask"].shape == (1, 1, 40, 40)


# ----- Transformer-XL -----

def test_txl_inputs_and_shifted_targets():
    stream = np.arange(100)
    seg = np.stack([stream[0:11], stream[50:61]])  # [b=2, tgt_len+1=11]
    out = txl_batch(seg)
    assert out["inputs"].shape == out["targets"].shape == (2, 10) and out["inputs"].dtype == np.int64
    assert np.array_equal(out["targets"][:, :-1], out["inputs"][:, 1:])
    assert out["inputs"][1].tolist() == list(range(50, 60)) and out["targets"][1].tolist() == list(range(51, 61))
    nxt = txl_batch(np.stack([stream[10:21], stream[60:71]]))  # next segment repeats the last token
    assert np.array_equal(np.concatenate([out["inputs"], nxt["inputs"]], 1)[0], stream[:20])
    with pytest.raises(ValueError):
        txl_batch(np.zeros((2, 1), np.int64))


# ----- BERT -----

@pytest.fixture(scope="module")
def many(data):
    """4096 samples: batches of 16 rows cycling through the dataset, global indices 0..4095."""
    rows, outs, batch_rows = data["rows"], [], []
    for k in range(256):
        pick = np.arange(k * 16, k * 16 + 16) % len(rows)
        batch_rows.append(rows[pick])
        outs.append(bert(data, rows[pick], range(k * 16, k * 16 + 16)))
    return {key: np.concatenate([o[key] for o in outs]) for key in outs[0]}, batch_rows


def test_bert_structure(data, many):
    out, batch_rows = many
    ids, special = data["ids"], np.array(sorted(data["ids"]["special_ids"]))
    tokens, types, pad = out["tokens"], out["token_types"], out["padding_mask"]
    assert tokens.shape == (4096, SEQ) and out["is_random_next"].shape == (4096,)
    assert out["loss_mask"].dtype == np.float32 and tokens.dtype == types.dtype == np.int64
    sel = out["loss_mask"] == 1
    for i in range(len(tokens)):
        n = int(pad[i].sum())
        seps = np.flatnonzero(tokens[i] == ids["sep_id"])
        assert tokens[i, 0] == ids["cls_id"] and (tokens[i] == ids["cls_id"]).sum() == 1
        assert len(seps) == 2 and seps[1] == n - 1 and n <= SEQ
        assert pad[i].tolist() == [1] * n + [0] * (SEQ - n) and (tokens[i, n:] == ids["pad_id"]).all()
        assert types[i].tolist() == [0] * (seps[0] + 1) + [1] * (n - seps[0] - 1) + [0] * (SEQ - n)
        assert seps[0] >= 2 and n - seps[0] >= 3  # A and B non-empty
        # Content: a positive pair is one contiguous window of one document of its row; a negative's A comes
        # from its row and B from another row of the same batch.
        a, b = segments(out, i)
        batch = batch_rows[i // 16]
        own = documents(batch[i % 16])
        if out["is_random_next"][i]:
            assert any(windows_contain(d, a) for d in own)
            others = [d for j, r in enumerate(batch) if j != i % 16 for d in documents(r)]
            assert any(windows_contain(d, b) for d in others)
        else:
            assert any(windows_contain(d, np.concatenate([a, b])) for d in own)
    # Never selected: specials, padding; labels are real tokens; [MASK] appears only where selected.
    assert not np.isin(out["lm_labels"][sel], special).any()
    assert not sel[~pad.astype(bool)].any() and not sel[:, 0].any()
    assert (tokens[~sel] != ids["mask_id"]).all()
    assert (out["lm_labels"][~sel] == ids["pad_id"]).all()
    replaced = sel & (tokens != ids["mask_id"]) & (tokens != out["lm_labels"])
    assert replaced.sum() > 0 and not np.isin(tokens[replaced], special).any()
    assert (tokens[replaced] < ids["vocab_size"]).all()
    assert (sel.sum(1) >= 1).all()  # at least one prediction per sample


def test_bert_statistics(data, many):
    out, _ = many
    ids = data["ids"]
    sel = out["loss_mask"] == 1
    eligible = out["padding_mask"].sum() - 3 * len(out["tokens"])  # every A/B token here is non-special
    rate = sel.sum() / eligible
    assert abs(rate - 0.15) < 0.01, rate
    chosen, labels = out["tokens"][sel], out["lm_labels"][sel]
    masked, kept = np.mean(chosen == ids["mask_id"]), np.mean(chosen == labels)
    assert abs(masked - 0.8) < 0.02 and abs(kept - 0.1) < 0.02 and abs(1 - masked - kept - 0.1) < 0.02
    assert abs(out["is_random_next"].mean() - 0.5) < 0.03
    short = np.mean(out["padding_mask"].sum(1) < SEQ)  # short_seq_prob=0.1, plus the rare short document
    assert 0.07 < short < 0.15, short


def test_bert_deterministic_per_seed_and_index(data):
    rows = data["rows"]
    batch, idx = rows[:16], list(range(100, 116))
    first = bert(data, batch, idx)
    again = bert(data, batch.copy(), idx)
    assert all(np.array_equal(first[k], again[k]) for k in first)
    assert not np.array_equal(bert(data, batch, idx, seed=2)["tokens"], first["tokens"])
    assert not np.array_equal(bert(data, batch, range(200, 216))["tokens"], first["tokens"])
    # The same (row, index) in another batch, at another position: positives are identical; for negatives,
    # is_random_next, A and A's masking are identical and only B (drawn from the batch) differs. The other row
    # holds 9-token documents, so a negative's B (and its share of the masking budget) really changes.
    short_docs = rows[40].copy()
    short_docs[::10] = EOS
    compared_negatives = shorter_b = 0
    for k in range(16):
        second = bert(data, np.stack([short_docs, batch[k]]), [999, idx[k]])
        assert second["is_random_next"][1] == first["is_random_next"][k]
        if not first["is_random_next"][k]:
            assert all(np.array_equal(first[key][k], second[key][1]) for key in first if key != "is_random_next")
        else:
            la = int(np.flatnonzero(first["tokens"][k] == 5)[0]) + 1  # [CLS] A [SEP]
            for key in ("tokens", "lm_labels", "loss_mask", "token_types"):
                assert np.array_equal(first[key][k, :la], second[key][1, :la]), key
            len_b = second["padding_mask"][1].sum() - la - 1
            assert 1 <= len_b <= 9  # B: from a short document of the other row
            shorter_b += len_b < first["padding_mask"][k].sum() - la - 1
            compared_negatives += 1
    assert 0 < compared_negatives < 16 and shorter_b  # both kinds were compared, and B really changed


def test_bert_single_row_batches_and_degenerate_rows(data):
    one_doc = data["rows"][5:6]
    assert (one_doc[0] != EOS).all()
    outs = [bert(data, one_doc, [i]) for i in range(40)]
    assert not any(o["is_random_next"][0] for o in outs)  # nothing else to draw a negative from
    two_docs = np.concatenate([one_doc[:, :60], [[EOS]], data["rows"][9:10, :68]], axis=1)
    outs = [bert(data, two_docs, [i]) for i in range(60)]
    flags = [int(o["is_random_next"][0]) for o in outs]
    assert 10 < sum(flags) < 50  # negatives from the row's other document
    for o in outs:  # a pair never spans the EOS
        a, b = segments(o, 0)
        ab = a if o["is_random_next"][0] else np.concatenate([a, b])
        assert windows_contain(two_docs[0, :60], ab) or windows_contain(two_docs[0, 61:], ab)
    degenerate = np.array([[EOS] * 20, [EOS, 9, EOS, 10] * 5])
    out = bert(data, degenerate, [0, 1])
    assert out["tokens"][0, :4].tolist() == [4, 5, 5, 0] and out["loss_mask"][0].sum() == 0
    assert out["padding_mask"].sum(1).tolist() == [3, 13] and out["loss_mask"][1].sum() >= 1


def test_bert_never_selects_special_tokens_inside_documents(data):
    rows = data["rows"][:16].copy()
    rows[:, 1::2] = np.where(np.arange(16)[:, None] % 2, 1, 2)  # unk / bos inside documents (not boundaries)
    out = bert(data, rows, range(16))
    sel = out["loss_mask"] == 1
    body = out["padding_mask"].astype(bool) & (out["tokens"] != 4) & (out["tokens"] != 5)
    assert np.isin(out["tokens"][body], [1, 2]).mean() > 0.4  # the specials are in the pairs, kept as they are
    assert sel.any() and not np.isin(out["lm_labels"][sel], [1, 2]).any()
    assert not np.isin(out["tokens"][sel], [1, 2]).any()


def test_bert_max_predictions_and_argument_checks(data):
    out = bert(data, data["rows"][:16], range(16), max_predictions=5)
    per_sample = out["loss_mask"].sum(1)
    assert per_sample.max() == 5 and per_sample.min() >= 1
    with pytest.raises(ValueError, match="indices"):
        bert(data, data["rows"][:2], [0])
    with pytest.raises(ValueError, match="seq_length must be >= 5"):
        bert_batch(data["rows"][:2], [0, 1], seed=0, seq_length=4, **data["ids"])
    with pytest.raises(DataError, match="cls_id"):
        bert_token_ids({**data["manifest"], "cls_id": None})


def test_truncate_seq_pair_trims_longer_side_from_both_ends():
    rng = np.random.default_rng(0)
    a, b = truncate_seq_pair(np.arange(10), np.arange(100, 104), 8, rng)
    assert len(a) + len(b) == 8 and len(b) == 4 and len(a) == 4
    assert windows_contain(np.arange(10), a) and a[0] > 0 and a[-1] < 9  # both ends were cut
    a, b = truncate_seq_pair(np.arange(6), np.arange(100, 106), 8, rng)
    assert (len(a), len(b)) == (4, 4)
    a, b = truncate_seq_pair(np.arange(3), np.arange(2), 8, rng)
    assert (len(a), len(b)) == (3, 2)


def test_module_is_pure_numpy():
    import pathlib
    import subprocess
    import sys

    code = "import sys, data_pipeline.batches; assert 'torch' not in sys.modules, 'torch imported'"
    subprocess.run([sys.executable, "-c", code], check=True, cwd=pathlib.Path(__file__).resolve().parents[2])
