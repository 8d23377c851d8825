"""Benchmark (not a test): does Transformer-XL's segment memory help? Validation loss with and without it.

    python bench/txl_memory.py [--steps 1000] [--eval-every 250] [--seq-length 32] [--lanes 32]
                               [--dir /tmp/txl-memory-bench] [-- OVERRIDES...]

Trains configs/txl/tiny.yaml twice through the real CLI on the bundled Shakespeare corpus (held-out plays as the
validation split), same seed, same data order, same steps, same dropout (0.1):

* with memory: the config's mem_length 64 in training, eval_mem_length 128 (same_length) in evaluation;
* without memory: mem_length 0 and eval_mem_length 0, a relative-position transformer that sees only the
  current segment (a token at position i of a segment sees i earlier ones; the first sees none).

Then evaluates the with-memory checkpoint once more with its memory switched off (eval_mem_length 0), which
separates "the model learned to use memory" from "memory is present at test time". Prints the validation losses
(whole split) side by side at every evaluation step. Extra arguments after ``--`` go to both training runs.

Defaults: segments of 32 tokens in 32 lanes (the tokens per step of tiny.yaml's 64 x 16), 1000 steps, ~7 min
on 2 CPU cores. Measured (val loss with memory | without | with-memory model evaluated without):
  seq 32, 1000 steps: 3.8093 | 3.8246 | 3.9668 (memory ahead at every evaluation from step 250: +0.010 ... +0.015)
  seq 64, 1000 steps: 3.8495 | 3.8523 | 3.9009 (+0.005, +0.010, -0.001, +0.003 at steps 250 ... 1000)
  seq 64,  300 steps: 4.4787 | 4.4450 | 4.5006 (memory behind after this short schedule)
A model this small and this briefly trained uses little context beyond a few dozen tokens, so the gain comes
mostly from the segments' first tokens, which without memory see nothing before them: shorter segments show it
sooner. The with-memory model leans on its memory (0.16 nats worse without it at seq 32).
"""

from __future__ import annotations

import argparse
import json
import math
import pathlib
import shutil
import subprocess
import sys

REPO = pathlib.Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))  # run from anywhere in the checkout

TXL_TINY = REPO / "configs" / "txl" / "tiny.yaml"
NO_MEMORY = ["--model.mem_length=0", "--model.eval_mem_length=0"]


def prepare_data(out: pathlib.Path) -> dict[str, pathlib.Path]:
    """Tokenizer (BPE 1024) + train/valid shards of the bundled corpus under ``out`` (reused when present): the
    same data as the tests' ``shakespeare`` fixture."""
    from data_pipeline.corpus import extract_bundled
    from data_pipeline.shards import prepare_shards
    from data_pipeline.tokenizer import train_tokenizer

    paths = {"tokenizer": out / "tokenizer.model", "train": out / "train", "valid": out / "valid"}
    if all((paths[s] / "manifest.json").is_file() for s in ("train", "valid")) and paths["tokenizer"].is_file():
        return paths
    splits = extract_bundled(out / "corpus")
    train_tokenizer([str(splits["train"])], str(out / "tokenizer"), vocab_size=1024)
    for split in ("train", "valid"):
        prepare_shards([str(splits[split])], str(paths["tokenizer"]), str(paths[split]), seq_length=128,
                       samples_per_shard=4, sequences_per_sample=64, prefix=split)
    return paths


def train(run_dir: pathlib.Path, data: dict[str, pathlib.Path], steps: int, eval_every: int,
          overrides: list[str]) -> dict[int, dict]:
    """One fresh `pretrain train` run of tiny.yaml; returns {step: metrics record} of its evaluation steps."""
    shutil.rmtree(run_dir, ignore_errors=True)  # never resume an older run of another length
    cmd = [sys.executable, "-m", "pretrain", "train", str(TXL_TINY), f"--run.dir={run_dir}",
           f"--data.train={data['train']}", f"--data.valid={data['valid']}", f"--data.tokenizer={data['tokenizer']}",
           f"--train.steps={steps}", f"--train.eval_every={eval_every}", "--train.eval_batches=0",
           f"--train.log_every={eval_every}", f"--checkpoint.every_steps={steps}", "--checkpoint.keep_last=1",
           *overrides]
    result = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True)
    if result.returncode != 0:
        raise SystemExit(f"training failed ({' '.join(cmd)}):\n{result.stdout[-2000:]}{result.stderr[-2000:]}")
    records = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    return {r["step"]: r for r in records if "val_loss" in r}


def evaluate_without_memory(run_dir: pathlib.Path) -> float:
    """Validation loss of a trained checkpoint with its evaluation memory switched off (eval_mem_length 0),
    read like `pretrain eval` does (the same lanes, the whole split)."""
    import torch

    from pretrain.evaluate import evaluate
    from pretrain.inference.loading import load_model

    loaded = load_model(run_dir)
    cfg = loaded.cfg
    loaded.model.cfg.eval_mem_length = 0  # the model reads its lengths from its ModelConfig at every forward
    cfg.data.train = []
    _, reader = loaded.spec.make_readers(cfg, dict(micro_batch_size=cfg.train.micro_batch_size, seed=cfg.run.seed))
    model, loss_fn = loaded.model, loaded.spec.loss_fn
    result = evaluate(model, lambda batches: torch.stack([loss_fn(model(**b["inputs"]), b) for b in batches]),
                      loaded.spec.make_batch_fn(cfg, reader.manifest), reader, loaded.device)
    return result["loss"]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=1000)
    parser.add_argument("--eval-every", type=int, default=250)
    parser.add_argument("--seq-length", type=int, default=32, help="segment length (tgt_len) of both runs")
    parser.add_argument("--lanes", type=int, default=32, help="lanes per step (train.micro_batch_size)")
    parser.add_argument("--dir", default="/tmp/txl-memory-bench")
    parser.add_argument("overrides", nargs="*", help="extra --section.key=value for both runs (after --)")
    args = parser.parse_args()
    out = pathlib.Path(args.dir)
    data = prepare_data(out)
    shape = [f"--model.seq_length={args.seq_length}", f"--train.micro_batch_size={args.lanes}"]
    args.overrides = [*shape, *args.overrides]
    runs = {"with": train(out / "with_memory", data, args.steps, args.eval_every, args.overrides),
            "without": train(out / "without_memory", data, args.steps, args.eval_every, [*args.overrides,
                                                                                        *NO_MEMORY])}
    print(f"tiny Transformer-XL ({TXL_TINY.relative_to(REPO)}), segments of {args.seq_length} tokens in {args.lanes} "
          f"lanes, {args.steps} steps; validation = held-out plays (whole split)")
    print(f"{'step':>6} | {'val loss, memory':>16} | {'val loss, none':>14} | {'difference':>10} | "
          f"{'ppl, memory':>11} | {'ppl, none':>9}")
    for step in sorted(runs["with"]):
        with_mem, without = runs["with"][step]["val_loss"], runs["without"][step]["val_loss"]
        print(f"{step:>6} | {with_mem:>16.4f} | {without:>14.4f} | {without - with_mem:>+10.4f} | "
              f"{math.exp(with_mem):>11.2f} | {math.exp(without):>9.2f}")
    last = max(runs["with"])
    switched_off = evaluate_without_memory(out / "with_memory")
    print(f"with-memory model at step {last} evaluated without memory (eval_mem_length 0): val loss "
          f"{switched_off:.4f} (ppl {math.exp(switched_off):.2f})")


if __name__ == "__main__":
    main()
