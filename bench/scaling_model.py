"""Scaling on paper: per-step communication volume per GPU for DP / ZeRO-1/2/3, TP and PP, and a layout table.

    python bench/scaling_model.py            # (a) volumes for 1.3B / 7B / 70B, (b) layouts on 8 / 64 / 512 GPUs

Volumes are the bytes each GPU *sends* per optimizer step under bandwidth-optimal (ring) collectives, from the
payload handed to each collective (X: the full tensor) and the group size n:
all-reduce 2(n-1)/n * X, reduce-scatter (n-1)/n * X (DeepSpeed's rooted reduces, one per owner, add up to one),
all-gather (n-1)/n * X (X = the gathered output), point-to-point X. tests/distributed/test_scaling_model.py counts
the payloads DeepSpeed and megatron-core really hand to torch.distributed and checks them against these formulas
(in fp32, where every element is 4 bytes).

Bytes per element in bf16 runs: gradients are accumulated and reduced in fp32 (pretrain/parallel/grads.py), so
every gradient reduction (all-reduce, reduce-scatter, the tied embedding's all-reduce) sends 4 bytes per element;
parameter all-gathers and TP/PP activations stay bf16, 2 bytes. bf16 ZeRO-1 is DeepSpeed's BF16_Optimizer: a full
fp32 all-reduce of the gradients (use_multi_rank_bucket_allreduce does not apply to it), then a bf16 all-gather
of the updated parameters.

Layout recommendation (assumptions; change them here): H100 80 GB, 8 per node on NVLink at 450 GB/s per direction,
nodes on 8 x 400 Gb/s InfiniBand (one 50 GB/s NIC per GPU); 80% of each link is achieved. Matmul efficiency 50% of
the 989 TFLOP/s dense bf16 peak. Megatron-core's rank order (TP fastest, then DP, then PP): a group of size k with
stride st stays inside a node when st * k <= 8, else it runs at the NIC's rate. Step time = compute x (1 + pipeline
bubble (p-1)/m) + TP and PP traffic (on the critical path) + the DP traffic that the backward cannot hide (ZeRO-0/1:
the gradient reduction overlaps the last micro-batch's backward; ZeRO-2: every micro-batch's backward; the
parameter all-gather after the step is exposed; ZeRO-3: gathers are prefetched under the whole step's compute).
Memory comes from pretrain.parallel.plan (what `pretrain train --dry-run` prints), so a recommended layout is one
our planner accepts. Latency terms are ignored (bandwidth only); at 512 GPUs and small messages they are not zero.
"""

from __future__ import annotations

import argparse
import pathlib
import sys
import warnings
from dataclasses import dataclass, field

REPO = pathlib.Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
from pretrain.metrics.prometheus import peak_flops  # noqa: E402

GPUS_PER_NODE = 8
NVLINK_BYTES_S = 450e9 * 0.8  # per GPU per direction (900 GB/s is both directions), 80% achieved
NIC_BYTES_S = 50e9 * 0.8  # one 400 Gb/s NDR NIC per GPU, 80% achieved
PEAK_FLOPS = peak_flops(0, "NVIDIA H100 80GB HBM3")  # H100 SXM dense bf16, from the MFU metric's table
MATMUL_EFFICIENCY = 0.5
GPU_MEMORY_GIB = 80.0  # plan.py keeps 10% of it in reserve
BASE_CONFIG = REPO / "configs" / "gpt" / "1.3b.yaml"
#: name: (layers, hidden, heads, global batch in sequences of 2048 tokens): 1M, 2M and 4M tokens per step.
MODELS = {"1.3B": (24, 2048, 16, 512), "7B": (32, 4096, 32, 1024), "70B": (80, 8192, 64, 2048)}
VOCAB = 50257  # GPT-2 BPE, padded by the model code as in training
BF16 = 2  # parameters, parameter all-gathers, TP/PP activations
FP32 = 4  # gradient reductions in bf16 runs (fp32 accumulation, pretrain/parallel/grads.py)
#: DeepSpeed's stage3_param_persistence_threshold default: smaller parameters stay whole on every rank.
ZERO3_PERSISTENCE_THRESHOLD = 100_000


# ----------------------------------------------------------------------------------------------------------------
# Communication volume
# ----------------------------------------------------------------------------------------------------------------


@dataclass
class Volume:
    """Payload bytes one GPU hands to each kind of collective per optimizer step, in a group of ``n`` GPUs.

    ``reduce_scatter`` also holds DeepSpeed's rooted reduces (one per partition owner, together a reduce-scatter);
    ``p2p`` is what this GPU sends point to point."""

    n: int
    all_reduce: float = 0.0
    reduce_scatter: float = 0.0
    all_gather: float = 0.0
    p2p: float = 0.0

    def sent(self) -> float:
        """Bytes leaving this GPU under ring collectives (module docstring)."""
        share = (self.n - 1) / self.n
        return 2 * share * self.all_reduce + share * (self.reduce_scatter + self.all_gather) + self.p2p


def dp_volume(params: float, d: int, zero_stage: int, micro_batches: int, bytes_per_elem: float,
              multi_rank_allreduce: bool = True, persistent: float = 0.0, regathered: float | None = None,
              grad_bytes_per_elem: float | None = None) -> Volume:
    """Data-parallel traffic of one step for ``params`` parameters per GPU (Psi / (t p)), DeepSpeed 0.19 ZeRO.

    ``bytes_per_elem`` is what a parameter all-gather sends per element, ``grad_bytes_per_elem`` what a gradient
    reduction sends (default: the same, as in fp32; bf16 runs reduce gradients in fp32, FP32).

    ZeRO-0: all-reduce of the gradients once per step (at the accumulation boundary).
    ZeRO-1/2: the gradients are reduced (ZeRO-1 once per step, ZeRO-2 after every micro-batch's backward, which is
    what lets it drop the full gradient buffer), then every rank all-gathers the updated parameters. DeepSpeed's
    default ``use_multi_rank_bucket_allreduce: true`` reduces with an all-reduce of the whole bucket (2 Psi, so
    fp32 ZeRO-1 sends 1.5x DP); with it off, a reduce per owner (Psi: the textbook ZeRO-1 = DP volume). bf16 ZeRO-1
    is DeepSpeed's BF16_Optimizer, which always all-reduces the whole fp32 gradient (multi_rank_allreduce=True).
    ZeRO-3: per micro-batch, a reduce-scatter of the gradients, an all-gather of the non-persistent parameters
    before their forward, and of ``regathered`` parameters again for their backward (default: all of them, the
    textbook 1.5x DP; DeepSpeed keeps parameters reused within stage3_max_reuse_distance, and persistent ones,
    gathered); persistent parameters (smaller than stage3_param_persistence_threshold) are all-gathered once
    after the step.
    """
    x = params * bytes_per_elem  # the parameters, as all-gathered
    g = params * (bytes_per_elem if grad_bytes_per_elem is None else grad_bytes_per_elem)  # the gradients, reduced
    if zero_stage == 0:
        return Volume(d, all_reduce=g)
    if zero_stage in (1, 2):
        reductions = micro_batches if zero_stage == 2 else 1
        grads = {"all_reduce": reductions * g} if multi_rank_allreduce else {"reduce_scatter": reductions * g}
        return Volume(d, all_gather=x, **grads)
    if zero_stage == 3:
        partitioned = params - persistent
        regathered = partitioned if regathered is None else regathered
        gathered = micro_batches * (partitioned + regathered) + persistent
        return Volume(d, reduce_scatter=micro_batches * g, all_gather=gathered * bytes_per_elem)
    raise ValueError(f"zero_stage: expected 0-3, got {zero_stage}")


def tp_volume(layers: int, hidden: int, seq: int, micro_batch: int, t: int, micro_batches: int,
              bytes_per_elem: float, first_stage: bool = True, last_stage: bool = True) -> Volume:
    """Megatron tensor parallelism, per step: all-reduces of [s, b, h] activations.

    Per layer and micro-batch, forward: after the attention projection and after fc2 (row parallel); backward: the
    input gradients of QKV and fc1 (column parallel): 4 per layer. The first stage adds the vocab-parallel
    embedding's forward all-reduce, the last the output layer's backward one and the vocab-parallel cross entropy's
    three fp32 [s, b] all-reduces (max, target logit, sum of exps). With sequence parallelism each all-reduce is an
    all-gather plus a reduce-scatter of the same tensor: the same bytes sent, so one formula serves both.
    """
    activations = (4 * layers + first_stage + last_stage) * seq * micro_batch * hidden * bytes_per_elem
    cross_entropy = 3 * seq * micro_batch * 4 if last_stage else 0
    return Volume(t, all_reduce=micro_batches * (activations + cross_entropy))


def pp_volume(hidden: int, seq: int, micro_batch: int, micro_batches: int, bytes_per_elem: float, t: int = 1,
              sequence_parallel: bool = False, first_stage: bool = False, last_stage: bool = False,
              tied_embedding_params: float = 0.0, grad_bytes_per_elem: float | None = None) -> Volume:
    """Pipeline parallelism (1F1B), per step on one GPU: per micro-batch the activation [s, b, h] to the next
    stage and its gradient back to the previous one ([s/t, b, h] with sequence parallelism; megatron-core sends
    the whole tensor from every TP rank otherwise), ``bytes_per_elem`` each. First and last stage also all-reduce
    the tied word embedding's gradient (``tied_embedding_params`` on this rank) between them once per step (group
    of 2), ``grad_bytes_per_elem`` each (default: the same; fp32 in bf16 runs, FP32)."""
    tensor = seq * micro_batch * hidden * bytes_per_elem / (t if sequence_parallel else 1)
    sends = (not last_stage) + (not first_stage)
    grad_bytes = bytes_per_elem if grad_bytes_per_elem is None else grad_bytes_per_elem
    tied = tied_embedding_params * grad_bytes if (first_stage or last_stage) else 0.0
    return Volume(2, p2p=micro_batches * sends * tensor, all_reduce=tied)


# ----------------------------------------------------------------------------------------------------------------
# Layouts
# ----------------------------------------------------------------------------------------------------------------


@dataclass
class Layout:
    """One candidate: t x p x d GPUs, ZeRO stage, activation recompute, micro batch; filled in by ``evaluate``."""

    model: str
    gpus: int
    t: int
    p: int
    zero: int
    recompute: str
    micro_batch: int
    d: int = 0
    micro_batches: int = 0
    memory_gib: float = 0.0
    params: int = 0  # per GPU, largest stage, before ZeRO
    gb: dict[str, float] = field(default_factory=dict)  # GB sent per GPU per step, by dimension
    seconds: dict[str, float] = field(default_factory=dict)  # compute, bubble, exposed tp/pp/dp
    model_flops: float = 0.0  # per step, without recompute (what MFU counts)

    @property
    def step_s(self) -> float:
        return sum(self.seconds.values())


def link_bytes_s(stride: int, size: int) -> float:
    """Per-GPU bandwidth of a group of ``size`` ranks ``stride`` apart (NVLink inside a node, else the NIC)."""
    return NVLINK_BYTES_S if stride * size <= GPUS_PER_NODE else NIC_BYTES_S


def config_for(layout: Layout):
    """The project Config of this layout (configs/gpt/1.3b.yaml resized), as the planner and trainer read it."""
    from pretrain.config import load

    layers, hidden, heads, global_batch = MODELS[layout.model]
    return load(BASE_CONFIG, [
        f"--model.num_layers={layers}", f"--model.hidden_size={hidden}", f"--model.num_attention_heads={heads}",
        f"--model.vocab_size={VOCAB}", "--train.precision=bf16", f"--train.global_batch_size={global_batch}",
        f"--train.micro_batch_size={layout.micro_batch}", f"--parallel.tensor={layout.t}",
        f"--parallel.pipeline={layout.p}", f"--parallel.zero_stage={layout.zero}",
        f"--parallel.sequence_parallel={str(layout.t > 1).lower()}",
        f"--parallel.activation_checkpointing={layout.recompute}"])


def evaluate(layout: Layout) -> Layout | None:
    """Memory (pretrain.parallel.plan) and the step-time estimate; None when the layout is invalid or won't fit."""
    from pretrain.errors import ConfigError
    from pretrain.models.gpt import flops_per_token
    from pretrain.parallel import plan

    try:
        cfg = config_for(layout)
        est = plan.estimate(cfg, layout.gpus)
    except ConfigError:
        return None
    layout.d, layout.micro_batches = est.dims.data, est.accumulation
    layout.memory_gib, layout.params = est.worst.total_bytes / plan.GIB, est.worst.params
    if layout.memory_gib > GPU_MEMORY_GIB * (1 - plan.RESERVE) or (layout.p > 1 and layout.micro_batches < layout.p):
        return None
    m, s, h, b, t, p, d = (cfg.model, cfg.model.seq_length, cfg.model.hidden_size, layout.micro_batch, layout.t,
                           layout.p, layout.d)
    layout.model_flops = flops_per_token(m, est.vocab_size) * est.tokens_per_step
    flops = layout.model_flops * (4 / 3 if layout.recompute == "full" else 1)  # full recompute: forward again
    compute = flops / (layout.gpus * PEAK_FLOPS * MATMUL_EFFICIENCY)
    mb = layout.micro_batches
    # The busiest stage: a middle one (sends both ways) when p > 2, else an end stage with the embedding or head.
    tp = tp_volume(m.num_layers // p, h, s, b, t, mb, BF16, first_stage=p == 1, last_stage=True)
    pp = pp_volume(h, s, b, mb, BF16, t, t > 1, first_stage=p == 2, last_stage=False,
                   tied_embedding_params=est.vocab_size * h / t if p == 2 else 0,
                   grad_bytes_per_elem=FP32) if p > 1 else Volume(1)
    dp = dp_volume(layout.params, d, layout.zero, mb, BF16, grad_bytes_per_elem=FP32)
    # What can hide under compute: ZeRO-3's gathers and reductions (prefetched through the step), ZeRO-0/1/2's
    # gradient reduction (under the backward); ZeRO-1/2's parameter all-gather after the step cannot.
    hideable = dp if layout.zero == 3 else Volume(d, all_reduce=dp.all_reduce, reduce_scatter=dp.reduce_scatter)
    window = compute if layout.zero == 3 else compute * 2 / 3 / (1 if layout.zero == 2 else mb)
    dp_bw = link_bytes_s(t, d)
    exposed_dp = max(0.0, hideable.sent() / dp_bw - window) + (dp.sent() - hideable.sent()) / dp_bw
    layout.gb = {"tp": tp.sent() / 1e9, "pp": pp.sent() / 1e9, "dp": dp.sent() / 1e9}
    layout.seconds = {"compute": compute, "bubble": compute * (p - 1) / mb,
                      "tp": tp.sent() / link_bytes_s(1, t), "pp": pp.sent() / link_bytes_s(t * d, p),
                      "dp": exposed_dp}
    return layout


def candidates(model: str, gpus: int):
    """Layouts to try: TP inside a node, PP dividing the layers, ZeRO-2/3 only without PP (our validation)."""
    layers = MODELS[model][0]
    for t in (1, 2, 4, 8):
        for p in (1, 2, 4, 8, 16):
            if gpus % (t * p) or layers % p:
                continue
            for zero in ((1, 2, 3) if p == 1 else (1,)):
                for recompute in ("selective", "full"):
                    for micro_batch in (1, 2, 4):
                        yield Layout(model, gpus, t, p, zero, recompute, micro_batch)


#: Estimates closer than this to the fastest count as a tie: the model is not finer than a few percent.
TIE = 0.02


def recommend(model: str, gpus: int) -> Layout | None:
    """The fitting candidate with the shortest estimated step; among those within TIE of it, the one with the
    fewest model-parallel GPUs, then the lowest ZeRO stage, then the fewest bytes sent (simplest, least fragile)."""
    fitting = [lay for lay in map(evaluate, candidates(model, gpus)) if lay is not None]
    if not fitting:
        return None
    best = min(lay.step_s for lay in fitting)
    close = [lay for lay in fitting if lay.step_s <= best * (1 + TIE)]
    return min(close, key=lambda lay: (lay.t * lay.p, lay.zero, sum(lay.gb.values())))


# ----------------------------------------------------------------------------------------------------------------
# Tables
# ----------------------------------------------------------------------------------------------------------------


def volume_table() -> str:
    """(a) GB sent per GPU per step: DP variants at d = 64 (one micro-batch), TP per micro-batch at t = 8, PP per
    micro-batch at a middle stage; b = 1, s = 2048, bf16 (gradient reductions in fp32, parameter all-gathers and
    activations in bf16). ZeRO-1 is BF16_Optimizer (the whole gradient all-reduced), which at one micro-batch sends
    what ZeRO-2 with DeepSpeed's default multi-rank all-reduce sends; the textbook ZeRO-2 reduces each partition
    to its owner instead (use_multi_rank_bucket_allreduce off; in bf16 only ZeRO-2 has that choice)."""
    from pretrain.parallel import plan

    rows = ["| model | params | DP (ZeRO-0) | ZeRO-1 (BF16_Optimizer) = ZeRO-2 default | ZeRO-2, textbook "
            "| ZeRO-3, textbook | TP t=8, per micro-batch | PP, per micro-batch |",
            "|---|---:|---:|---:|---:|---:|---:|---:|"]
    for name in MODELS:
        cfg = config_for(Layout(name, 1, 1, 1, 0, "full", 1))
        m = cfg.model
        psi = plan.total_params(m, plan.padded_vocab(cfg, 1)[0])
        vols = [dp_volume(psi, 64, 0, 1, BF16, grad_bytes_per_elem=FP32),
                dp_volume(psi, 64, 1, 1, BF16, grad_bytes_per_elem=FP32),
                dp_volume(psi, 64, 2, 1, BF16, multi_rank_allreduce=False, grad_bytes_per_elem=FP32),
                dp_volume(psi, 64, 3, 1, BF16, grad_bytes_per_elem=FP32),
                tp_volume(m.num_layers, m.hidden_size, m.seq_length, 1, 8, 1, BF16),
                pp_volume(m.hidden_size, m.seq_length, 1, 1, BF16)]
        rows.append(f"| {name} | {psi / 1e9:.2f} B | " + " | ".join(f"{v.sent() / 1e9:,.2f}" for v in vols) + " |")
    return "\n".join(rows)


def layout_table(gpu_counts=(8, 64, 512)) -> str:
    """(b) the recommended layout per model and GPU count."""
    rows = ["| model | GPUs | t x p x d | ZeRO | recompute | b x m | GiB/GPU | GB/GPU/step TP, PP, DP "
            "| est. step (s) | est. MFU | compute share |", "|---|---:|---|---:|---|---|---:|---|---:|---:|---:|"]
    for name in MODELS:
        for gpus in gpu_counts:
            lay = recommend(name, gpus)
            if lay is None:
                rows.append(f"| {name} | {gpus} | none fits in {GPU_MEMORY_GIB:g} GiB | | | | | | | | |")
                continue
            mfu = lay.model_flops / lay.step_s / (gpus * PEAK_FLOPS)
            gb = ", ".join(f"{lay.gb[k]:.2f}" for k in ("tp", "pp", "dp"))
            rows.append(f"| {name} | {gpus} | {lay.t} x {lay.p} x {lay.d} | {lay.zero} | {lay.recompute} | "
                        f"{lay.micro_batch} x {lay.micro_batches} | {lay.memory_gib:.1f} | {gb} | {lay.step_s:.2f} | "
                        f"{mfu:.0%} | {lay.seconds['compute'] / lay.step_s:.0%} |")
    return "\n".join(rows)


def main() -> None:
    warnings.filterwarnings("ignore", category=UserWarning)  # megatron-core's "Apex is not installed" on import
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--gpus", default="8,64,512", help="comma-separated GPU counts for the layout table")
    args = parser.parse_args()
    print("(a) GB sent per GPU per optimizer step (bf16, gradients reduced in fp32; DP at d = 64 with one "
          "micro-batch; b = 1, s = 2048)\n")
    print(volume_table())
    print("\n(b) recommended layouts (H100 80 GB, NVLink 450 GB/s/direction in nodes of 8, one 50 GB/s NIC per "
          "GPU, 80% of links and 50% of peak FLOP/s achieved)\n")
    print(layout_table(tuple(int(g) for g in args.gpus.split(","))))


if __name__ == "__main__":
    main()
