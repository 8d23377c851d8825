"""Dry-run planner: parameter counts against real megatron-core models, memory formulas, CLI exit codes."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import pytest

from pretrain.config import Config, ModelConfig, ParallelConfig, load
from pretrain.errors import ConfigError
from pretrain.parallel import plan

REPO = Path(__file__).resolve().parents[2]
TINY = REPO / "configs" / "debug" / "gpt_tiny.yaml"  # 4 layers, hidden 192, 4 heads, seq 128, micro 16
G13B = REPO / "configs" / "gpt" / "1.3b.yaml"  # 24 layers, hidden 2048, TP 2, ZeRO-1, full recompute
NO_DATA = "--data.train=/nonexistent/shards"  # a dry run never reads data

VARIANTS = {  # tiny shapes covering each term of the formula
    "gelu_tied": dict(),
    "gelu_untied": dict(tie_embeddings=False),
    "swiglu_rope_untied": dict(activation="swiglu", position_embedding="rope", tie_embeddings=False),
    "swiglu_tied_ffn": dict(activation="swiglu", ffn_hidden_size=200),
}


def tiny_model(**changes) -> ModelConfig:
    return dataclasses.replace(ModelConfig(num_layers=4, hidden_size=64, num_attention_heads=4, seq_length=32),
                               **changes)


def build_stage(m: ModelConfig, vocab: int, pre_process: bool, post_process: bool):
    """The project's GPTModel holding one pipeline stage's layers (``m.num_layers`` of them), built in a world of
    one: megatron-core's pipeline groups are size 1, so the stage is chosen by pre/post_process alone."""
    import torch

    from pretrain.models import gpt

    return gpt.build(m, ParallelConfig(), torch.float32, vocab, pre_process=pre_process, post_process=post_process)


def numel(model) -> int:
    return sum(p.numel() for p in model.parameters())  # parameters() yields a tied weight once


# ---------------------------------------------------------------------------------------------------------------
# Parameters
# ---------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("variant", sorted(VARIANTS))
def test_parameter_formula_matches_megatron_core(mcore_world1, variant):
    m = tiny_model(**VARIANTS[variant])
    model = build_stage(m, 256, pre_process=True, post_process=True)
    assert plan.total_params(m, 256) == numel(model)
    assert plan.stage_params(m, 256, tensor=1, pipeline=1, stage=0) == numel(model)


@pytest.mark.parametrize("variant", sorted(VARIANTS))
@pytest.mark.parametrize("pipeline", [2, 4])
def test_stage_formula_matches_megatron_core_stages(mcore_world1, variant, pipeline):
    m = tiny_model(**VARIANTS[variant])
    stage_model = dataclasses.replace(m, num_layers=m.num_layers // pipeline)
    for stage in range(pipeline):
        model = build_stage(stage_model, 256, pre_process=stage == 0, post_process=stage == pipeline - 1)
        # A tied last stage without the embedding allocates its own output weight, as the formula says.
        assert plan.stage_params(m, 256, 1, pipeline, stage) == numel(model), (stage, pipeline)


@pytest.mark.parametrize("variant", sorted(VARIANTS))
@pytest.mark.parametrize("pipeline", [1, 2, 4])
def test_stages_sum_to_the_total(variant, pipeline):
    m = tiny_model(**VARIANTS[variant])
    stages = sum(plan.stage_params(m, 256, 1, pipeline, s) for s in range(pipeline))
    duplicate = 256 * m.hidden_size if m.tie_embeddings and pipeline > 1 else 0
    assert stages - duplicate == plan.total_params(m, 256)


def test_tensor_parallel_shards_matrices_and_replicates_norms_and_row_biases():
    m = tiny_model()
    h = m.hidden_size
    replicated = 4 * h + 2 * h  # two LayerNorms, proj and fc2 biases
    for t in (2, 4):
        assert (plan.layer_params(m, t) - replicated) * t == plan.layer_params(m, 1) - replicated
    # Word embeddings shard over TP; learned positions are replicated on the first stage.
    first = plan.stage_params(m, 256, tensor=2, pipeline=2, stage=0)
    assert first == 2 * plan.layer_params(m, 2) + 256 * h // 2 + m.seq_length * h


def test_1_3b_has_about_1_3_billion_parameters():
    cfg = load(G13B)
    vocab, note = plan.padded_vocab(cfg, tensor=2)
    assert vocab == 50432 and "assumed 50257" in note and "model.vocab_size" in note
    assert 1.30e9 < plan.total_params(cfg.model, vocab) < 1.33e9
    vocab, note = plan.padded_vocab(load(G13B, ["--model.vocab_size=32000"]), tensor=2)
    assert vocab == 32000 and "assumed" not in note


# ---------------------------------------------------------------------------------------------------------------
# Memory
# ---------------------------------------------------------------------------------------------------------------


def test_layer_activations_follow_korthikanti():
    cfg = load(G13B, ["--parallel.activation_checkpointing=none", "--train.micro_batch_size=1"])
    s, h, a = 2048, 2048, 16
    sbh, scores = s * h, 5 * a * s / h
    assert plan.layer_activation_bytes(cfg) == pytest.approx(sbh * (10 + 24 / 2 + scores / 2))  # TP 2 only
    sp = dataclasses.replace(cfg, parallel=dataclasses.replace(cfg.parallel, sequence_parallel=True))
    assert plan.layer_activation_bytes(sp) == pytest.approx(sbh * (34 + scores) / 2)
    assert plan.layer_activation_bytes(sp, "selective") == pytest.approx(sbh * 34 / 2)
    assert plan.layer_activation_bytes(sp, "full") == pytest.approx(2 * sbh / 2)
    tp1 = dataclasses.replace(cfg, parallel=dataclasses.replace(cfg.parallel, tensor=1))
    assert plan.layer_activation_bytes(tp1) == pytest.approx(sbh * (34 + scores))
    assert plan.layer_activation_bytes(tp1, "full") == pytest.approx(2 * sbh)


def test_recompute_lowers_activations_in_order():
    totals = {}
    for mode in ("none", "selective", "full"):
        est = plan.estimate(load(G13B, [f"--parallel.activation_checkpointing={mode}"]), 64)
        totals[mode] = est.worst.activation_bytes
    assert totals["none"] > totals["selective"] > totals["full"] > 0


def test_memory_falls_with_each_zero_stage():
    worst = {z: plan.estimate(load(G13B, [f"--parallel.zero_stage={z}"]), 64).worst for z in (0, 1, 2, 3)}
    totals = [worst[z].total_bytes for z in (0, 1, 2, 3)]
    assert totals == sorted(totals, reverse=True) and len(set(totals)) == 4
    dp, n = 32, worst[0].params
    assert worst[0].optimizer_bytes == 12 * n and worst[1].optimizer_bytes == pytest.approx(12 * n / dp)
    assert worst[1].grad_bytes == 4 * n and worst[2].grad_bytes == pytest.approx(4 * n / dp)  # fp32 grads
    assert worst[2].param_bytes == 2 * n and worst[3].param_bytes == pytest.approx(2 * n / dp)
    assert all(w.activation_bytes == worst[0].activation_bytes for w in worst.values())


def test_fp32_precision_has_no_master_copy():
    est = plan.estimate(load(G13B, ["--train.precision=fp32", "--parallel.zero_stage=0"]), 64).worst
    assert (est.param_bytes, est.grad_bytes, est.optimizer_bytes) == (4 * est.params, 4 * est.params,
                                                                      8 * est.params)


@pytest.mark.parametrize("pipeline, virtual, micro_batches, expected", [
    (1, 1, 8, [1]),
    (4, 1, 8, [4, 3, 2, 1]),
    (4, 1, 2, [2, 2, 2, 1]),  # fewer micro-batches than stages: all of them, at most
    # Interleaved: megatron-core's warmup 2(PP-i-1) + (VPP-1)PP chunks + 1; the first stage is the paper's
    # PP * (1 + (PP-1)/(PP*VPP)) = 4 * (1 + 3/8) = 5.5 micro-batches of its layers.
    (4, 2, 8, [5.5, 4.5, 3.5, 2.5]),
    (4, 2, 4, [4.0, 4.0, 3.5, 2.5]),  # capped at all chunks of all micro-batches
])
def test_micro_batches_in_flight(pipeline, virtual, micro_batches, expected):
    got = [plan.micro_batches_in_flight(s, pipeline, virtual, micro_batches) for s in range(pipeline)]
    assert got == pytest.approx(expected)
    paper = pipeline * (1 + (pipeline - 1) / (pipeline * virtual)) if virtual > 1 else pipeline
    assert got[0] == pytest.approx(min(paper, micro_batches))


def test_first_stage_or_last_is_the_worst_with_pipelines():
    est = plan.estimate(load(G13B, ["--parallel.pipeline=4", "--train.micro_batch_size=1"]), 64)
    assert len(est.stages) == 4 and est.worst.stage in (0, 3)
    assert est.worst.total_bytes == max(s.total_bytes for s in est.stages)


# ---------------------------------------------------------------------------------------------------------------
# The command: exit codes and one-line errors
# ---------------------------------------------------------------------------------------------------------------


def run_main(capsys, *argv: str) -> tuple[int, str, str]:
    from pretrain.cli import main

    code = main(list(argv))
    out, err = capsys.readouterr()
    return code, out, err


def test_fits_prints_the_table_and_exits_0(capsys):
    code, out, err = run_main(capsys, "train", str(G13B), "--dry-run", "--world-size", "64", NO_DATA)
    assert code == 0 and err == ""
    for row in ("world size", "data parallel (DP)", "ZeRO stage", "accumulation steps", "tokens per step",
                "per rank, largest stage", "optimizer", "activations", "GPU budget"):
        assert row in out, row
    assert "fits" in out and "1,048,576" in out


def test_layout_that_does_not_fit_exits_2_after_the_table(capsys):
    code, out, err = run_main(capsys, "train", str(G13B), "--dry-run", "--world-size", "64",
                              "--parallel.activation_checkpointing=none", "--train.micro_batch_size=16",
                              "--train.global_batch_size=1024", NO_DATA)
    assert code == 2 and "DOES NOT FIT" in out
    assert err.count("\n") == 1 and err.startswith("error: --gpu-memory-gib 80: the estimate")
    assert "parallel.activation_checkpointing=selective" in err and "train.micro_batch_size=8" in err


def test_small_gpu_budget_is_refused(capsys):
    code, out, err = run_main(capsys, "train", str(G13B), "--dry-run", "--world-size", "64",
                              "--gpu-memory-gib", "4", NO_DATA)
    assert code == 2 and err.count("\n") == 1 and "usable 3.6 GiB" in err


@pytest.mark.parametrize("argv, start", [
    (["--world-size", "6", "--parallel.tensor=4"], "error: parallel.tensor (4) x parallel.pipeline (1) = 4"),
    (["--world-size", "512"], "error: train.global_batch_size (512) is not divisible"),
    (["--world-size", "80", "--parallel.pipeline=5"], "error: model.num_layers (24) is not divisible"),
    (["--world-size", "0"], "error: world size must be >= 1"),
    ([], "error: --world-size: required with --dry-run"),
    (["--world-size", "64", "--gpu-memory-gib", "0"], "error: --gpu-memory-gib: must be > 0"),
])
def test_invalid_layout_is_a_one_line_error_before_any_output(capsys, argv, start):
    config = str(TINY) if "--parallel.tensor=4" in argv else str(G13B)
    code, out, err = run_main(capsys, "train", config, "--dry-run", *argv, NO_DATA)
    assert code == 2 and out == "", out
    assert err.startswith(start) and err.count("\n") == 1, err


@pytest.mark.parametrize("flag, value", [("--world-size", "8"), ("--gpu-memory-gib", "40")])
def test_planning_flags_need_dry_run(capsys, flag, value):
    code, out, err = run_main(capsys, "train", str(G13B), flag, value, NO_DATA)
    assert code == 2 and err == f"error: {flag}: only with --dry-run\n"


def test_estimate_raises_config_error_for_bad_layout():
    with pytest.raises(ConfigError, match=r"world size 6"):
        plan.estimate(load(TINY, ["--parallel.tensor=4"]), 6)
    assert isinstance(plan.estimate(Config(data=load(TINY).data), 1), plan.Plan)
