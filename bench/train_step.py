"""Benchmark (not a test): our GPT training step against a minimal plain-PyTorch GPT of the same math.

    python bench/train_step.py [--shapes tiny,small] [--rounds 5] [--steps 5]

Ours: the real `pretrain train` components in this process (one rank, gloo): megatron-core GPTModel with the local
layer spec, DeepSpeed ZeRO-0 engine with torch AdamW, our Trainer.train_step (LR schedule, NaN guard, watchdog
beats, loss all-reduce). Baseline (below, written for this bench): token + learned position embedding, pre-LN blocks
with one qkv Linear and F.scaled_dot_product_attention (causal), GELU MLP, final LayerNorm, head tied to the
embedding, cross entropy, torch AdamW with the same decay groups, gradient clipping at the same norm. Same shapes,
same batch size, same rows of the bundled corpus.

A/B runs alternate in one process after warm-up (--rounds rounds of --steps steps each, each side); the median step
time of each side gives tokens/s and the ratio ours / baseline (time; 1.00 = as fast, > 1 = slower).
"""

from __future__ import annotations

import argparse
import os
import pathlib
import statistics
import sys
import time

import torch
import torch.nn.functional as F

REPO = pathlib.Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "bench"))
from bundled_data import build_data  # noqa: E402

SHAPES = {  # name: (layers, hidden, heads, micro batch); seq 128, vocab 2048 (the bench data)
    "tiny": (4, 192, 4, 16),
    "small": (8, 512, 8, 8),
}


class Block(torch.nn.Module):
    """Pre-LN transformer block: x + Attn(LN(x)), then x + MLP(LN(x))."""

    def __init__(self, d: int, heads: int, fused_attention: bool = True):
        super().__init__()
        self.heads, self.fused_attention = heads, fused_attention
        self.ln1, self.ln2 = torch.nn.LayerNorm(d), torch.nn.LayerNorm(d)
        self.qkv, self.proj = torch.nn.Linear(d, 3 * d), torch.nn.Linear(d, d)
        self.fc1, self.fc2 = torch.nn.Linear(d, 4 * d), torch.nn.Linear(4 * d, d)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, s, d = x.shape
        q, k, v = self.qkv(self.ln1(x)).view(b, s, 3, self.heads, d // self.heads).permute(2, 0, 3, 1, 4)
        if self.fused_attention:
            attn = F.scaled_dot_product_attention(q, k, v, is_causal=True)  # [b, h, s, d/h]
        else:  # as megatron-core's local DotProductAttention: scores, mask, softmax, weighted sum, one op each
            scores = (q @ k.transpose(-1, -2)) / (d // self.heads) ** 0.5  # [b, h, s, s]
            causal = torch.ones(s, s, dtype=torch.bool).triu(1)
            attn = scores.masked_fill(causal, float("-inf")).softmax(-1) @ v
        x = x + self.proj(attn.transpose(1, 2).reshape(b, s, d))
        return x + self.fc2(F.gelu(self.fc1(self.ln2(x))))


class PlainGPT(torch.nn.Module):
    def __init__(self, vocab: int, seq: int, layers: int, d: int, heads: int, fused_attention: bool = True):
        super().__init__()
        self.wte, self.wpe = torch.nn.Embedding(vocab, d), torch.nn.Embedding(seq, d)
        self.blocks = torch.nn.ModuleList(Block(d, heads, fused_attention) for _ in range(layers))
        self.ln_f = torch.nn.LayerNorm(d)
        for p in self.parameters():
            if p.ndim >= 2:
                torch.nn.init.normal_(p, std=0.02)

    def forward(self, tokens: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        x = self.wte(tokens) + self.wpe(torch.arange(tokens.shape[1]))  # [b, s, d]
        for block in self.blocks:
            x = block(x)
        logits = self.ln_f(x) @ self.wte.weight.T  # [b, s, vocab], tied head
        return F.cross_entropy(logits.flatten(0, 1).float(), labels.flatten())


def build_ours(shape: str, data: dict, run_dir: pathlib.Path):
    """The Trainer `pretrain train` builds, for one process."""
    from pretrain import device as device_layer
    from pretrain.config import load
    from pretrain.parallel import ParallelDims
    from pretrain.train import build

    layers, hidden, heads, micro = SHAPES[shape]
    cfg = load(REPO / "configs/debug/gpt_tiny.yaml", [
        f"--data.train={data['train']}", "--data.valid=", f"--data.tokenizer={data['tokenizer']}",
        f"--run.dir={run_dir}", f"--model.num_layers={layers}", f"--model.hidden_size={hidden}",
        f"--model.num_attention_heads={heads}", f"--train.micro_batch_size={micro}", "--train.global_batch_size=0",
        "--train.steps=100000", "--train.log_every=100000", "--metrics.console=false", "--metrics.jsonl=false"])
    return build(cfg, ParallelDims.from_config(cfg, 1), device_layer.detect(0, cfg.train.precision))


def timed(step, n: int) -> list[float]:
    times = []
    for _ in range(n):
        start = time.perf_counter()
        step()
        times.append(time.perf_counter() - start)
    return times


def compare(shape: str, data: dict, rounds: int, steps: int, out: pathlib.Path) -> dict:
    trainer = build_ours(shape, data, out / f"run-{shape}")
    rows = iter(trainer.train_data)
    layers, hidden, heads, micro = SHAPES[shape]
    seq, vocab = trainer.cfg.model.seq_length, trainer.engine.chunks[0].vocab_size
    batches = [torch.from_numpy(next(rows).astype("int64")) for _ in range(4)]  # [b, s+1] each
    steps_of = {"ours": lambda: trainer.train_step(rows),
                "plain": plain_step(PlainGPT(vocab, seq, layers, hidden, heads), batches, trainer.cfg.optim),
                "plain_unfused": plain_step(PlainGPT(vocab, seq, layers, hidden, heads, fused_attention=False),
                                            batches, trainer.cfg.optim)}
    times = {name: [] for name in steps_of}
    for name, step in steps_of.items():
        timed(step, 2)  # warm-up
    for _ in range(rounds):
        for name, step in steps_of.items():
            times[name] += timed(step, steps)
    trainer.watchdog.close()
    tokens = micro * seq
    median = {name: statistics.median(t) for name, t in times.items()}
    return {"shape": f"{shape} ({layers}x{hidden}, {heads} heads, b{micro} x s{seq})",
            "params_m": trainer.engine.chunks[0].embedding.word_embeddings.weight.numel() / 1e6 + sum(
                p.numel() for p in trainer.engine.chunks[0].decoder.parameters()) / 1e6,
            **{f"{name}_tok_s": tokens / t for name, t in median.items()},
            "ratio": median["ours"] / median["plain"], "ratio_unfused": median["ours"] / median["plain_unfused"]}


def plain_step(model: PlainGPT, batches: list[torch.Tensor], cfg):
    """One baseline optimizer step per call, cycling through ``batches``."""
    from pretrain.optim import param_groups

    torch.manual_seed(0)
    optim = torch.optim.AdamW(param_groups(model, cfg.weight_decay), lr=cfg.lr, betas=(cfg.beta1, cfg.beta2),
                              eps=cfg.eps)
    calls = [0]

    def step():
        batch = batches[calls[0] % len(batches)]
        calls[0] += 1
        model(batch[:, :-1], batch[:, 1:]).backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.clip_grad)
        optim.step()
        optim.zero_grad(set_to_none=True)

    return step


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--shapes", default="tiny,small")
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--steps", type=int, default=5)
    parser.add_argument("--dir", default="/tmp/pretrain-bench-train-step")
    args = parser.parse_args()
    out = pathlib.Path(args.dir)
    out.mkdir(parents=True, exist_ok=True)
    data = build_data(out, vocab_size=2048, seq_length=128)
    from pretrain import device as device_layer
    from pretrain.train import init_distributed, shutdown

    device_layer.apply_cpu_shims()
    init_distributed("gloo")
    results = []
    try:
        for shape in args.shapes.split(","):
            results.append(compare(shape, data, args.rounds, args.steps, out))
            from megatron.core import parallel_state

            parallel_state.destroy_model_parallel()
    finally:
        shutdown()
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, fp32, CPU; median of "
          f"{args.rounds} x {args.steps} alternating steps per side")
    print("| shape | params (M) | ours tokens/s | plain (SDPA) tokens/s | ours / plain (time) | "
          "plain, unfused attention tokens/s | ours / plain unfused |\n|---|---:|---:|---:|---:|---:|---:|")
    for r in results:
        print(f"| {r['shape']} | {r['params_m']:.1f} | {r['ours_tok_s']:,.0f} | {r['plain_tok_s']:,.0f} | "
              f"{r['ratio']:.2f} | {r['plain_unfused_tok_s']:,.0f} | {r['ratio_unfused']:.2f} |")


if __name__ == "__main__":
    os.environ.setdefault("DS_ACCELERATOR", "cpu")
    main()
