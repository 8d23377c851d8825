"""``pretrain demo``: the whole system end to end on the bundled Shakespeare corpus, on CPU, in a few minutes.

1. extract the bundled corpus (train / held-out plays), 2. train a sentencepiece BPE tokenizer, 3. write WebDataset
shards, 4. train the tiny GPT of configs/debug/gpt_tiny.yaml (checkpoints in the run directory), 5. report
validation perplexity of the saved checkpoint and print a generated continuation; then the run's goodput summary
and its report page (``pretrain report``).
Re-running reuses finished steps (tokenizer, shards) and resumes training from the newest checkpoint.
"""

from __future__ import annotations

import time
from pathlib import Path

import yaml

DEMO_CONFIG = Path(__file__).resolve().parents[1] / "configs" / "debug" / "gpt_tiny.yaml"
VOCAB_SIZE = 2048
PROMPT = "ROMEO.\nBut soft, what light"


def _stage(n: int, title: str) -> float:
    print(f"\n== [{n}/5] {title}", flush=True)
    return time.perf_counter()


def run_demo(out_dir: str = "runs/demo", steps: int = 300, overrides: list[str] = ()) -> int:
    """Run the demo into ``out_dir``; returns the exit code of training (0 when it finished)."""
    from data_pipeline.corpus import extract_bundled
    from data_pipeline.shards import prepare_shards
    from data_pipeline.tokenizer import train_tokenizer
    from pretrain import config
    from pretrain.inference.evaluation import evaluate_checkpoint
    from pretrain.inference.generation import generate_from_checkpoint
    from pretrain.train import main as train_main

    out = Path(out_dir)
    start = _stage(1, f"bundled corpus → {out / 'corpus'}")
    splits = extract_bundled(out / "corpus")

    t = _stage(2, f"sentencepiece BPE tokenizer, vocab {VOCAB_SIZE}")
    tokenizer = out / "tokenizer.model"
    if not tokenizer.is_file():
        train_tokenizer([str(splits["train"])], str(out / "tokenizer"), vocab_size=VOCAB_SIZE)
    print(f"tokenizer: {tokenizer} ({time.perf_counter() - t:.1f} s)")

    raw = yaml.safe_load(DEMO_CONFIG.read_text())
    seq_length = raw["model"]["seq_length"]
    _stage(3, f"WebDataset shards of {seq_length + 1}-token sequences")
    for split in ("train", "valid"):
        data_dir = out / "data" / split
        if not (data_dir / "manifest.json").is_file():
            prepare_shards([str(splits[split])], str(tokenizer), str(data_dir), seq_length=seq_length,
                           samples_per_shard=4, sequences_per_sample=64, prefix=split)
        else:
            print(f"{data_dir}: already prepared")

    _stage(4, f"training the tiny GPT for {steps} steps ({DEMO_CONFIG.relative_to(DEMO_CONFIG.parents[2])})")
    run_dir = out / "run"
    cfg = config.load(DEMO_CONFIG, [
        f"--run.dir={run_dir}", f"--data.train={out / 'data' / 'train'}", f"--data.valid={out / 'data' / 'valid'}",
        f"--data.tokenizer={tokenizer}", f"--train.steps={steps}", *overrides])
    code = train_main(cfg)
    if code != 0:
        print(f"training stopped early (exit code {code}); re-run the demo to resume")
        return code

    _stage(5, "validation perplexity and a sample from the saved checkpoint")
    result = evaluate_checkpoint(run_dir)
    print(f"validation (held-out plays): loss {result['loss']:.3f} | perplexity {result['ppl']:.1f} | "
          f"{result['tokens']} tokens")
    print(f"prompt: {PROMPT!r}\n--- continuation ---")
    print(PROMPT, end="")
    generate_from_checkpoint(run_dir, PROMPT, max_new_tokens=80, temperature=0.8, top_k=40, seed=0)
    print(f"--- done in {time.perf_counter() - start:.0f} s; everything is under {out}")
    from pretrain.metrics import goodput
    from pretrain.metrics.report import report

    page = report(run_dir)
    print(goodput.summary(goodput.read(run_dir / goodput.FILE_NAME)))
    print(f"report: {page} (open it in a browser; plots in {page.with_name('report.png')})")
    return 0
