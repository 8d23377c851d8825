"""Benchmark (not a test): our GPT training step against a minimal plain-PyTorch GPT of the same math.

    python bench/train_step.py [--shapes tiny,small] [--rounds 5] [--steps 5]       # CPU (default without CUDA)
    python bench/train_step.py [--shapes 125m,350m,1.3b] [--rounds 3] [--steps 5]  # one GPU (default with CUDA)
    python bench/train_step.py ... --json results.json [--peak-tflops 989]  # figures as JSON (scripts/gpu_check.sh)

Ours: the real `pretrain train` components in this process (one rank, gloo): megatron-core GPTModel with the local
layer spec, DeepSpeed ZeRO-0 engine with torch AdamW, our Trainer.train_step (LR schedule, NaN guard, watchdog
beats, loss all-reduce). Baseline (below, written for this bench): token + learned position embedding, pre-LN blocks
with one qkv Linear and F.scaled_dot_product_attention (causal), GELU MLP, final LayerNorm, head tied to the
embedding, cross entropy, torch AdamW with the same decay groups, gradient clipping at the same norm. Same shapes,
same batch size, same rows of the bundled corpus.

A/B runs alternate in one process after warm-up (--rounds rounds of --steps steps each, each side); the median step
time of each side gives tokens/s and the ratio ours / baseline (time; 1.00 = as fast, > 1 = slower).

On a GPU: GPT-3 shapes at seq 2048 with GPT-2's vocabulary (50257, padded to 50304), bf16 (ours: the training
engine's bf16 path, fp32 master weights and gradients; baseline: fp32 weights under bf16 autocast), and model
TFLOP/s and MFU from `pretrain.models.gpt.flops_per_token` (Megatron's formula, attention scores included, not
halved for causality) against the device's dense bf16 peak (`pretrain.metrics.prometheus.PEAK_FLOPS`). The
unfused-attention baseline is a CPU diagnostic and is left out there (its [b, n, s, s] scores at s = 2048 would
dominate memory).

``--json`` writes every figure (tokens/s, model TFLOP/s, MFU per side) for scripts/gpu_check.sh to check;
``--peak-tflops`` overrides the device's peak (as metrics.peak_tflops does), which also gives MFU on a CPU.
"""

from __future__ import annotations

import argparse
import json
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

SHAPES = {  # name: (layers, hidden, heads, micro batch); CPU: seq 128, vocab 2048 (the bench data)
    "nano": (2, 64, 2, 8),  # scripts/gpu_check.sh --cpu-dry-run: the bench's whole path in seconds
    "tiny": (4, 192, 4, 16),
    "small": (8, 512, 8, 8),
    # GPU (GPT-3 paper shapes; 1.3B with 16 heads of 128 as Megatron-LM): seq 2048, vocab 50257
    "125m": (12, 768, 12, 8),
    "350m": (24, 1024, 16, 8),
    "1.3b": (24, 2048, 16, 4),
}
GPU_SEQ, GPU_VOCAB = 2048, 50257


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
        x = self.wte(tokens) + self.wpe(torch.arange(tokens.shape[1], device=tokens.device))  # [b, s, d]
        for block in self.blocks:
            x = block(x)
        logits = self.ln_f(x) @ self.wte.weight.T  # [b, s, vocab], tied head
        return F.cross_entropy(logits.flatten(0, 1).float(), labels.flatten())


def build_ours(shape: str, data: dict, run_dir: pathlib.Path, cuda: bool = False):
    """The Trainer `pretrain train` builds, for one process (bf16 at seq 2048 and GPT-2's vocabulary on CUDA)."""
    from pretrain import device as device_layer
    from pretrain.config import load
    from pretrain.parallel.dims import ParallelDims
    from pretrain.train import build

    layers, hidden, heads, micro = SHAPES[shape]
    cfg = load(REPO / "configs/debug/gpt_tiny.yaml", [
        f"--data.train={data['train']}", "--data.valid=", f"--data.tokenizer={data['tokenizer']}",
        f"--run.dir={run_dir}", f"--model.num_layers={layers}", f"--model.hidden_size={hidden}",
        f"--model.num_attention_heads={heads}", f"--train.micro_batch_size={micro}", "--train.global_batch_size=0",
        "--train.steps=100000", "--train.log_every=100000", "--metrics.console=false", "--metrics.jsonl=false",
        *([f"--model.seq_length={GPU_SEQ}", f"--model.vocab_size={GPU_VOCAB}", "--train.precision=bf16"] if cuda
          else [])])
    return build(cfg, ParallelDims.from_config(cfg, 1), device_layer.detect(0, cfg.train.precision))


def timed(step, n: int) -> list[float]:
    times = []
    for _ in range(n):
        start = time.perf_counter()
        step()
        if torch.cuda.is_available():
            torch.cuda.synchronize()  # the step's kernels, not just their launches
        times.append(time.perf_counter() - start)
    return times


def compare(shape: str, data: dict, rounds: int, steps: int, out: pathlib.Path, peak_tflops: float = 0) -> dict:
    cuda = torch.cuda.is_available()
    trainer = build_ours(shape, data, out / f"run-{shape}", cuda)
    rows = iter(trainer.train_data)
    layers, hidden, heads, micro = SHAPES[shape]
    seq, vocab = trainer.cfg.model.seq_length, trainer.engine.chunks[0].vocab_size
    device = trainer.device
    batches = [torch.from_numpy(next(rows).astype("int64")).to(device) for _ in range(4)]  # [b, s+1] each
    steps_of = {"ours": lambda: trainer.train_step(rows),
                "plain": plain_step(PlainGPT(vocab, seq, layers, hidden, heads).to(device), batches,
                                    trainer.cfg.optim)}
    if not cuda:  # diagnostics: where a gap between ours and plain comes from
        steps_of["plain_unfused"] = plain_step(PlainGPT(vocab, seq, layers, hidden, heads, fused_attention=False),
                                               batches, trainer.cfg.optim)
        steps_of["mcore_bare"] = bare_megatron_step(trainer.cfg, vocab, batches)
    times = {name: [] for name in steps_of}
    for name, step in steps_of.items():
        timed(step, 2)  # warm-up
    for _ in range(rounds):
        for name, step in steps_of.items():
            times[name] += timed(step, steps)
    trainer.watchdog.close()
    tokens = micro * seq
    median = {name: statistics.median(t) for name, t in times.items()}
    result = {"shape": f"{shape} ({layers}x{hidden}, {heads} heads, b{micro} x s{seq})",
              "params_m": trainer.engine.chunks[0].embedding.word_embeddings.weight.numel() / 1e6 + sum(
                  p.numel() for p in trainer.engine.chunks[0].decoder.parameters()) / 1e6,
              **{f"{name}_tok_s": tokens / t for name, t in median.items()},
              "ratio": median["ours"] / median["plain"]}
    if "plain_unfused" in median:
        result["ratio_unfused"] = median["ours"] / median["plain_unfused"]
        result["ratio_bare"] = median["mcore_bare"] / median["plain"]
    # Model FLOP/s of every side by one formula (the same model), and MFU against the device's peak (NaN where
    # none is known: CPUs, unless --peak-tflops gives one).
    from pretrain.metrics.prometheus import peak_flops
    from pretrain.models.gpt import flops_per_token

    per_token = flops_per_token(trainer.cfg.model, vocab)
    peak = peak_flops(peak_tflops, torch.cuda.get_device_name() if cuda else None)
    result["peak_tflops"] = peak / 1e12 if peak else float("nan")
    for name in median:
        result[f"{name}_tflops"] = result[f"{name}_tok_s"] * per_token / 1e12
        result[f"{name}_mfu"] = result[f"{name}_tok_s"] * per_token / peak if peak else float("nan")
    return result


def bare_megatron_step(cfg, vocab: int, batches: list[torch.Tensor]):
    """Our model alone: megatron-core's GPTModel as `pretrain train` builds it, stepped by the baseline's loop (torch
    AdamW, clipping) without DeepSpeed or our Trainer; between ours and plain, it splits a gap into model and
    engine/trainer."""
    from pretrain.models import gpt

    torch.manual_seed(0)
    model = gpt.build(cfg.model, cfg.parallel, torch.float32, vocab)
    inputs = [gpt.batch_fn(b.numpy(), b.device) for b in batches]
    return optimizer_loop(model, cfg.optim, inputs, lambda batch: gpt.loss_fn(model(**batch["inputs"]), batch))


def plain_step(model: PlainGPT, batches: list[torch.Tensor], cfg):
    """One baseline optimizer step per call, cycling through ``batches``."""
    autocast = torch.autocast("cuda", torch.bfloat16, enabled=batches[0].is_cuda)  # bf16 compute, fp32 weights

    def loss_of(batch: torch.Tensor) -> torch.Tensor:
        with autocast:
            return model(batch[:, :-1], batch[:, 1:])

    torch.manual_seed(0)
    return optimizer_loop(model, cfg, batches, loss_of)


def optimizer_loop(model: torch.nn.Module, cfg, batches: list, loss_of):
    """The baseline's training step: one call = loss_of(next batch, cycling through ``batches``), backward,
    clipping at ``cfg.clip_grad`` and a torch AdamW step with our decay groups (``cfg``: the optim section)."""
    from pretrain.optim import param_groups

    optim = torch.optim.AdamW(param_groups(model, cfg.weight_decay), lr=cfg.lr, betas=(cfg.beta1, cfg.beta2),
                              eps=cfg.eps)
    calls = [0]

    def step():
        batch = batches[calls[0] % len(batches)]
        calls[0] += 1
        loss_of(batch).backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.clip_grad)
        optim.step()
        optim.zero_grad(set_to_none=True)

    return step


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--shapes", default="125m,350m,1.3b" if torch.cuda.is_available() else "tiny,small")
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--steps", type=int, default=5)
    parser.add_argument("--dir", default="/tmp/pretrain-bench-train-step")
    parser.add_argument("--json", help="also write the figures to this file (JSON)")
    parser.add_argument("--peak-tflops", type=float, default=0,
                        help="peak FLOP/s for MFU (default: the device's dense bf16 peak; none on CPU)")
    args = parser.parse_args()
    out = pathlib.Path(args.dir)
    out.mkdir(parents=True, exist_ok=True)
    cuda = torch.cuda.is_available()
    data = build_data(out / ("gpu" if cuda else ""), vocab_size=2048, seq_length=GPU_SEQ if cuda else 128)
    from pretrain import device as device_layer
    from pretrain.parallel.env import init_distributed, shutdown

    device_layer.apply_cpu_shims()  # no-op on CUDA
    init_distributed("nccl" if cuda else "gloo")
    results = []
    try:
        for shape in args.shapes.split(","):
            results.append(compare(shape, data, args.rounds, args.steps, out, args.peak_tflops))
            from megatron.core import parallel_state

            parallel_state.destroy_model_parallel()
            if cuda:
                torch.cuda.empty_cache()  # the next shape's models get the memory back
    finally:
        shutdown()
    if args.json:
        pathlib.Path(args.json).write_text(json.dumps({
            "device": torch.cuda.get_device_name() if cuda else "cpu", "torch": torch.__version__,
            "dtype": "bf16" if cuda else "fp32", "rounds": args.rounds, "steps": args.steps,
            "results": {shape: r for shape, r in zip(args.shapes.split(","), results)}}, indent=2) + "\n")
    if cuda:
        print(f"torch {torch.__version__}, {torch.cuda.get_device_name()}, bf16; median of {args.rounds} x "
              f"{args.steps} alternating steps per side")
        print("| shape | params (M) | ours tokens/s | ours TFLOP/s | ours MFU | plain (SDPA) tokens/s | plain TFLOP/s "
              "| plain MFU | ours / plain (time) |\n|---|---:|---:|---:|---:|---:|---:|---:|---:|")
        for r in results:
            print(f"| {r['shape']} | {r['params_m']:.0f} | {r['ours_tok_s']:,.0f} | {r['ours_tflops']:.0f} | "
                  f"{r['ours_mfu']:.1%} | {r['plain_tok_s']:,.0f} | {r['plain_tflops']:.0f} | {r['plain_mfu']:.1%} | "
                  f"{r['ratio']:.2f} |")
        return
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, fp32, CPU; median of "
          f"{args.rounds} x {args.steps} alternating steps per side")
    print("| shape | params (M) | ours tokens/s | plain (SDPA) tokens/s | ours / plain (time) | "
          "plain, unfused attention tokens/s | ours / plain unfused | megatron-core model alone tokens/s | "
          "model alone / plain |\n|---|---:|---:|---:|---:|---:|---:|---:|---:|")
    for r in results:
        print(f"| {r['shape']} | {r['params_m']:.1f} | {r['ours_tok_s']:,.0f} | {r['plain_tok_s']:,.0f} | "
              f"{r['ratio']:.2f} | {r['plain_unfused_tok_s']:,.0f} | {r['ratio_unfused']:.2f} | "
              f"{r['mcore_bare_tok_s']:,.0f} | {r['ratio_bare']:.2f} |")


if __name__ == "__main__":
    main()
