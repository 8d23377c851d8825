"""Shared by the export and fine-tune tests: one short GPT pretraining run per session, labelled datasets made
from the bundled corpus, and our model against its Hugging Face export."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Callable, Iterator

from tests.conftest import TINY_CONFIG, built_once, data_overrides, run_cli

PRETRAIN_STEPS = 60
# The tokenizer has 1024 pieces; padding the embedding to a multiple of 100 gives 1100 rows, so the export must
# drop the 76 padding rows (the default multiple, 128, would divide 1024 and hide that).
PADDED_VOCAB = "--model.make_vocab_size_divisible_by=100"


def train_gpt(shakespeare: dict[str, Path], run_dir: Path, *overrides: str, steps: int = PRETRAIN_STEPS,
              torchrun_nproc: int = 0) -> Path:
    """gpt_tiny trained through the CLI on the session's shards (once per run_dir); returns the run directory."""
    if not (run_dir / "checkpoints" / "latest").is_file():
        result = run_cli("train", str(TINY_CONFIG), f"--train.steps={steps}", f"--checkpoint.every_steps={steps}",
                         "--train.log_every=10", "--train.eval_batches=2", PADDED_VOCAB, *overrides,
                         *data_overrides(shakespeare, run_dir), torchrun_nproc=torchrun_nproc)
        assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    return run_dir


def pretrained_gpt(shakespeare: dict[str, Path], tmp_path_factory) -> Path:
    """The session's pretrained gpt_tiny (60 steps), trained once per run and shared by test modules (and
    pytest-xdist workers)."""
    with built_once(tmp_path_factory, "downstream_gpt") as run_dir:
        return train_gpt(shakespeare, run_dir)


def examples_file(tmp_path_factory, name: str, make: Callable[[Path], list[dict]]) -> Path:
    """``name``.jsonl in a fresh directory: the examples ``make(corpus_dir)`` builds from the bundled corpus."""
    out = tmp_path_factory.mktemp(name)
    path = out / f"{name}.jsonl"
    path.write_text("".join(json.dumps(e) + "\n" for e in make(out / "corpus")))
    return path


def held_out_plays(out_dir: Path) -> Iterator[tuple[str, list[str]]]:
    """(title, non-empty lines after the title and cast list) of each held-out play of the bundled corpus (never
    seen in pretraining)."""
    from data_pipeline.corpus import extract_bundled

    for line in extract_bundled(out_dir)["valid"].read_text().splitlines():
        play = json.loads(line)
        yield play["title"], [l for l in play["text"].splitlines() if l.strip()][100:]


def which_play_examples(out_dir: Path, plays: tuple[str, ...] = ("Hamlet", "The Tempest"),
                        lines_per_passage: int = 8, per_play: int = 120) -> list[dict]:
    """Passages of ``lines_per_passage`` consecutive non-empty lines from held-out plays, labelled with the play's
    title: speakers, names and spelling tell them apart."""
    examples = []
    for title, lines in held_out_plays(out_dir):
        if title not in plays:
            continue
        for start in range(0, per_play * lines_per_passage, lines_per_passage):
            examples.append({"text": "\n".join(lines[start:start + lines_per_passage]), "label": title})
    return examples


def word_order_examples(out_dir: Path, lines_per_passage: int = 4, per_play: int = 200, seed: int = 0) -> list[dict]:
    """Passages of ``lines_per_passage`` consecutive non-empty lines from each held-out play, whitespace joined to
    single spaces: every other one as written (label ``original``), the rest with their words shuffled
    (``shuffled``). Both classes have the same words, so a bag of words is at chance; telling them apart takes
    what masked-LM pretraining teaches (which word fits where). Seeded, in shuffled order."""
    import random

    rng, examples = random.Random(seed), []
    for _, lines in held_out_plays(out_dir):
        starts = range(0, len(lines) - lines_per_passage, lines_per_passage)
        for k, start in enumerate(list(starts)[:per_play]):
            words = " ".join(lines[start:start + lines_per_passage]).split()
            if k % 2:
                rng.shuffle(words)
            examples.append({"text": " ".join(words), "label": "shuffled" if k % 2 else "original"})
    rng.shuffle(examples)
    return examples


def our_vs_hf(checkpoint: Path, export_dir: Path, corpus_jsonl: Path) -> dict:
    """Our model and the Hugging Face export on the same real token ids (fp32): the relative error of the
    logits (max |ours - hf| / max |ours|, over real vocabulary entries and real positions), whether the HF
    tokenizer encodes like ours, and what transformers loaded. Run in its own process, as load_model sets up a
    process group: ``python -m tests.integration.downstream_support hf CHECKPOINT EXPORT_DIR CORPUS_JSONL``."""
    import torch
    import transformers

    from pretrain.inference.loading import load_model, tokenizer_for
    from data_pipeline.batches import causal_mask

    loaded = load_model(checkpoint)
    tokenizer = tokenizer_for(loaded)
    text = json.loads(corpus_jsonl.read_text().splitlines()[0])["text"]
    ids = tokenizer.encode(text[20000:40000])
    s, vocab = loaded.cfg.model.seq_length, tokenizer.vocab_size
    ours_ids = tokenizer.encode(text[20000:22000])
    # The slow LlamaTokenizer (sentencepiece itself) and AutoTokenizer's default, the fast one converted from it.
    result = {"tokenizer_equal": all(
        transformers.AutoTokenizer.from_pretrained(export_dir, use_fast=fast)(text[20000:22000])["input_ids"]
        == ours_ids for fast in (False, True))}
    if loaded.cfg.model.family == "gpt":  # GPT2LMHeadModel or LlamaForCausalLM
        architecture = json.loads((export_dir / "config.json").read_text())["architectures"][0]
        hf = getattr(transformers, architecture).from_pretrained(export_dir).eval()
        tokens = torch.tensor([ids[:s], ids[s:2 * s]])  # [2, s], two windows of a held-out play
        with torch.no_grad():
            ours = loaded.model(input_ids=tokens, position_ids=torch.arange(s)[None],
                                attention_mask=torch.from_numpy(causal_mask(s).copy()))[..., :vocab]  # [2, s, V]
            theirs = hf(tokens).logits  # [2, s, V]
        result["logits_rel_err"] = ((ours - theirs).abs().max() / ours.abs().max()).item()
        result["lm_head_tied"] = hf.get_output_embeddings().weight.data_ptr() == \
            hf.get_input_embeddings().weight.data_ptr()
        result.update(greedy_both(loaded, hf, ids[:16], vocab, new_tokens=24))
    else:  # BERT: [CLS] A [SEP] B [SEP], the second row padded, token types 0/1
        half = s // 2 - 2
        rows = [[tokenizer.cls_id, *ids[:half], tokenizer.sep_id, *ids[half:2 * half], tokenizer.sep_id],
                [tokenizer.cls_id, *ids[2 * half:2 * half + 20], tokenizer.sep_id, *ids[:10], tokenizer.sep_id]]
        types = [[0] * (half + 2) + [1] * (half + 1), [0] * 22 + [1] * 11]
        length = len(rows[0])
        tokens = torch.tensor([r + [tokenizer.pad_id] * (length - len(r)) for r in rows])  # [2, s']
        token_types = torch.tensor([t + [0] * (length - len(t)) for t in types])
        real = torch.tensor([[1] * len(r) + [0] * (length - len(r)) for r in rows])  # [2, s'], 1 = real token
        architecture = json.loads((export_dir / "config.json").read_text())["architectures"][0]
        hf = getattr(transformers, architecture).from_pretrained(export_dir).eval()
        with torch.no_grad():
            ours_lm, ours_nsp = loaded.model(input_ids=tokens, attention_mask=real, tokentype_ids=token_types)
            out = hf(input_ids=tokens, attention_mask=real, token_type_ids=token_types)
        keep = real.bool()  # padded positions: megatron masks them as queries too, HF only as keys
        theirs_lm = out.prediction_logits if architecture == "BertForPreTraining" else out.logits  # [2, s', V]
        ours_lm, theirs_lm = ours_lm[..., :vocab][keep], theirs_lm[keep]  # [real tokens, V]
        result["logits_rel_err"] = ((ours_lm - theirs_lm).abs().max() / ours_lm.abs().max()).item()
        if ours_nsp is not None:
            theirs_nsp = out.seq_relationship_logits
            result["nsp_rel_err"] = ((ours_nsp - theirs_nsp).abs().max() / ours_nsp.abs().max()).item()
    result["hf_config"] = hf.config.to_dict()
    return result


def greedy_both(loaded, hf, prompt: list[int], vocab: int, new_tokens: int) -> dict:
    """Greedy continuations of ``prompt`` by our key/value-cached decoder (what `pretrain generate` runs) and by
    transformers' ``generate`` (its own cache), ``new_tokens`` each, never stopping early; and the largest relative
    difference of the logits the two caches give at any step (an undertrained model may repeat one token, so
    equal tokens alone would say little about the cached positions)."""
    import torch

    decoder = loaded.spec.decoder(loaded.model, loaded.cfg.model, loaded.device)
    ours, steps, logits = [], [], decoder.prefill(list(prompt))
    with torch.no_grad():
        for _ in range(new_tokens):
            steps.append(logits[:vocab].float())
            ours.append(int(steps[-1].argmax()))
            logits = decoder.step(ours[-1])
        out = hf.generate(torch.tensor([prompt]), max_new_tokens=new_tokens, min_new_tokens=new_tokens,
                          do_sample=False, eos_token_id=None, pad_token_id=0, output_scores=True,
                          return_dict_in_generate=True)
    theirs = torch.stack([score[0] for score in out.scores])  # [new_tokens, V]: no logits processor for greedy
    mine = torch.stack(steps)  # [new_tokens, V]
    return {"greedy_ours": ours, "greedy_hf": out.sequences[0, len(prompt):].tolist(),
            "cached_logits_rel_err": ((mine - theirs).abs().max() / mine.abs().max()).item()}


def reloaded_accuracy(output: Path) -> float:
    """Held-out accuracy of a fine-tuned classifier reloaded from its output directory (pretrain.finetune's
    load_classifier), on the split finetune.json records. Run in its own process, as :func:`our_vs_hf`."""
    from data_pipeline.tokenizer import Tokenizer
    from pretrain.finetune import classifier, data

    model, record = classifier.load_classifier(output)
    texts, labels = data.read_examples(record["data"], record["text_key"], record["label_key"])
    _, targets = data.class_ids(labels, record["data"], record["label_key"])
    _, valid = data.split_indices(len(texts), record["valid_fraction"], record["seed"])
    tokenizer = Tokenizer(output / "tokenizer.model")  # saved with the classifier
    rows = classifier.encode([texts[i] for i in valid], tokenizer, record["family"], record["max_length"])
    device = next(model.parameters()).device
    return classifier.accuracy(model, rows, [targets[i] for i in valid], tokenizer.pad_id, device)


if __name__ == "__main__":
    import sys

    if sys.argv[1] == "hf":  # hf CHECKPOINT EXPORT_DIR CORPUS_JSONL
        print(json.dumps(our_vs_hf(*(Path(a) for a in sys.argv[2:5]))))
    else:  # finetuned OUTPUT_DIR
        print(json.dumps({"accuracy": reloaded_accuracy(Path(sys.argv[2]))}))
