"""BERT family: batch fn, loss at init, FLOPs and parameter counts against the real model, TP=2 equals TP=1."""

from __future__ import annotations

import dataclasses
import math

import numpy as np
import pytest
import torch

from data_pipeline import DataError
from data_pipeline.batches import bert_batch, bert_token_ids
from pretrain import models
from pretrain.config import Config, ModelConfig, ParallelConfig, RunConfig
from pretrain.models import gpt
from pretrain.models.bert import model as bert
from pretrain.testing import run_distributed

CPU = torch.device("cpu")
VOCAB = 256  # padded vocabulary of the test models
SEQ = 64
#: A shard manifest's id fields as `data prepare` writes them (the tokenizer's specials are ids 0..6).
MANIFEST = {"cls_id": 4, "sep_id": 5, "mask_id": 6, "pad_id": 0, "eos_id": 3, "bos_id": 2, "unk_id": 1,
            "vocab_size": 250, "special_ids": list(range(7))}


def tiny_config(**changes) -> ModelConfig:
    return dataclasses.replace(ModelConfig(family="bert", num_layers=2, hidden_size=32, num_attention_heads=4,
                                           seq_length=SEQ), **changes)


def rows_with_documents(b: int, seed: int = 0) -> np.ndarray:
    """Reader-like rows [b, SEQ + 1] of ordinary tokens, with a document end (EOS) in every other row."""
    rows = np.random.default_rng(seed).integers(7, MANIFEST["vocab_size"], size=(b, SEQ + 1), dtype=np.int64)
    rows[::2, SEQ // 3] = MANIFEST["eos_id"]
    return rows


def make_batch(b: int = 8, indices=None, **run) -> dict:
    cfg = Config(run=RunConfig(seed=run.pop("seed", 7)), model=tiny_config(**run))
    indices = np.arange(100, 100 + b) if indices is None else indices
    return bert.make_batch_fn(cfg, MANIFEST)(rows_with_documents(b), indices, CPU)


# ---------------------------------------------------------------------------------------------------------------
# Registry, batch fn, loss fn
# ---------------------------------------------------------------------------------------------------------------


def test_registered_as_bert():
    spec = models.get("bert")
    assert spec is bert.SPEC and spec.build is bert.build and spec.loss_fn is bert.loss_fn
    assert spec.make_readers is models.get("gpt").make_readers  # shuffled shard readers, as GPT
    assert spec.hf_export == "bert" and spec.decoder is None  # exported as BertForPreTraining; generates nothing


def test_batch_fn_shapes_dtypes_and_keys():
    batch = make_batch(b=8)
    inputs = batch["inputs"]
    assert set(inputs) == {"input_ids", "attention_mask", "tokentype_ids", "lm_labels"}
    for name, tensor in inputs.items():
        assert tensor.shape == (8, SEQ) and tensor.dtype == torch.int64, name
    assert batch["loss_mask"].shape == (8, SEQ) and batch["loss_mask"].dtype == torch.float32
    assert batch["nsp_labels"].shape == (8,) and batch["nsp_labels"].dtype == torch.int64
    assert batch["num_tokens"] == 8 * SEQ


def test_batch_fn_values_are_bert_batch_with_the_run_options():
    indices = np.arange(40, 48)
    batch = make_batch(b=8, indices=indices, seed=11, mask_prob=0.3, short_seq_prob=0.5)
    expected = bert_batch(rows_with_documents(8), indices, seed=11, seq_length=SEQ, mask_prob=0.3,
                          short_seq_prob=0.5, **bert_token_ids(MANIFEST))
    pairs = {"input_ids": "tokens", "attention_mask": "padding_mask", "tokentype_ids": "token_types",
             "lm_labels": "lm_labels"}
    for ours, theirs in pairs.items():
        assert np.array_equal(batch["inputs"][ours].numpy(), expected[theirs]), ours
    assert np.array_equal(batch["loss_mask"].numpy(), expected["loss_mask"])
    assert np.array_equal(batch["nsp_labels"].numpy(), expected["is_random_next"])
    # The options change the batch the way they should: twice the masking selects about twice the tokens, more
    # short samples leave more padding.
    half_masked = make_batch(b=8, indices=indices, seed=11, mask_prob=0.15, short_seq_prob=0.5)
    assert batch["loss_mask"].sum() > 1.6 * half_masked["loss_mask"].sum()
    never_short = make_batch(b=8, indices=indices, seed=11, mask_prob=0.3, short_seq_prob=0.0)
    assert never_short["inputs"]["attention_mask"].sum() > batch["inputs"]["attention_mask"].sum()


def test_batch_fn_structure():
    batch = make_batch(b=16)
    tokens, types, real = (batch["inputs"][k] for k in ("input_ids", "tokentype_ids", "attention_mask"))
    for i in range(16):
        n = int(real[i].sum())
        assert bool(real[i, :n].all()) and not bool(real[i, n:].any())  # real tokens first, then padding
        assert tokens[i, 0] == MANIFEST["cls_id"] and tokens[i, n - 1] == MANIFEST["sep_id"]
        assert bool((tokens[i, n:] == MANIFEST["pad_id"]).all())
        first_sep = int((tokens[i] == MANIFEST["sep_id"]).nonzero()[0])
        assert bool((types[i, :first_sep + 1] == 0).all()) and bool((types[i, first_sep + 1:n] == 1).all())
        assert not bool(types[i, n:].any())
    selected = batch["loss_mask"] == 1
    labels = batch["inputs"]["lm_labels"]
    assert bool((labels[selected] >= 7).all())  # only ordinary tokens are predicted
    assert bool((labels[~selected] == MANIFEST["pad_id"]).all())
    assert set(batch["nsp_labels"].tolist()) == {0, 1}  # both pair kinds in 16 samples


def test_batch_fn_is_deterministic_per_global_index():
    a, b = make_batch(indices=np.arange(8)), make_batch(indices=np.arange(8))
    c = make_batch(indices=np.arange(8, 16))
    assert torch.equal(a["inputs"]["input_ids"], b["inputs"]["input_ids"])
    assert not torch.equal(a["inputs"]["input_ids"], c["inputs"]["input_ids"])


def test_make_batch_fn_needs_bert_special_ids():
    with pytest.raises(DataError, match="cls_id"):
        bert.make_batch_fn(Config(model=tiny_config()), {**MANIFEST, "cls_id": None})


def test_loss_fn_is_masked_lm_mean_plus_nsp_cross_entropy():
    per_token = torch.tensor([[1.0, 2.0, 3.0], [4.0, 5.0, 6.0]])
    nsp_logits = torch.tensor([[2.0, 0.0], [0.0, 1.0]])
    batch = {"loss_mask": torch.tensor([[1.0, 0.0, 1.0], [0.0, 1.0, 0.0]]), "nsp_labels": torch.tensor([0, 0])}
    nsp = (math.log(1 + math.exp(-2.0)) + math.log(1 + math.exp(1.0))) / 2  # -log softmax of label 0
    assert bert.loss_fn((per_token, nsp_logits), batch).item() == pytest.approx((1 + 3 + 5) / 3 + nsp)
    assert bert.loss_fn((per_token, None), batch).item() == pytest.approx(3.0)  # model.nsp false: MLM only
    batch["loss_mask"] = torch.zeros(2, 3)  # nothing selected: NSP alone, not NaN
    assert bert.loss_fn((per_token, nsp_logits), batch).item() == pytest.approx(nsp)


# ---------------------------------------------------------------------------------------------------------------
# The model in one process
# ---------------------------------------------------------------------------------------------------------------


def initialised(cfg: ModelConfig, parallel: ParallelConfig = ParallelConfig(), **stage) -> torch.nn.Module:
    from pretrain.models.init import init_weights

    model = bert.build(cfg, parallel, torch.float32, VOCAB, **stage)
    init_weights([model], seed=5, std=cfg.init_method_std, num_layers=cfg.num_layers)
    return model


def test_whole_model_parameters_and_forward_without_labels(mcore_world1):
    model = bert.build(tiny_config(), ParallelConfig(), torch.float32, VOCAB)  # default kwargs: the whole model
    names = {name for name, _ in model.named_parameters()}
    extras = {"embedding.tokentype_embeddings.weight", "lm_head.dense.weight", "lm_head.layer_norm.weight",
              "output_layer.bias", "pooler.dense.weight", "binary_head.weight", "embedding.layernorm.weight",
              "encoder.layers.1.self_attention.linear_qkv.weight", "encoder.layers.1.post_attention_layernorm.weight",
              "encoder.layers.1.post_mlp_layernorm.weight"}
    assert extras <= names and "output_layer.weight" not in names  # tied: the word embedding is the output layer
    # post-LN (the paper's): no pre-norms in the layers and no final norm after the encoder
    assert not {n for n in names if "input_layernorm" in n or "pre_mlp_layernorm" in n or "final_layernorm" in n}
    inputs = make_batch(b=3)["inputs"]
    with torch.no_grad():
        logits, nsp_logits = model(**{k: v for k, v in inputs.items() if k != "lm_labels"})
    assert logits.shape == (3, SEQ, VOCAB) and nsp_logits.shape == (3, 2)
    assert "pooler.dense.weight" not in dict(bert.build(tiny_config(nsp=False), ParallelConfig(), torch.float32,
                                                        VOCAB).named_parameters())


def test_loss_at_init_is_about_ln_vocab_plus_ln_2(mcore_world1):
    model = initialised(tiny_config()).eval()
    batch = make_batch(b=16)
    with torch.no_grad():
        lm_loss, nsp_logits = model(**batch["inputs"])
    assert lm_loss.shape == (16, SEQ)
    mlm = bert.loss_fn((lm_loss, None), batch).item()
    nsp = torch.nn.functional.cross_entropy(nsp_logits, batch["nsp_labels"]).item()
    # Near-uniform predictions: logits ~ N(0, h * std^2) add about half their variance (0.0064) to ln V.
    assert abs(mlm - math.log(VOCAB)) < 0.05, mlm
    assert abs(nsp - math.log(2)) < 0.02, nsp
    assert bert.loss_fn((lm_loss, nsp_logits), batch).item() == pytest.approx(mlm + nsp, rel=1e-6)


def test_every_parameter_learns_a_repeated_batch(mcore_world1):
    """AdamW steps on one batch lower both losses, and every parameter (heads included) gets a gradient."""
    model = initialised(tiny_config())
    batch = make_batch(b=8)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    losses = []
    for _ in range(8):
        opt.zero_grad(set_to_none=True)
        lm_loss, nsp_logits = model(**batch["inputs"])
        mlm, nsp = bert.loss_fn((lm_loss, None), batch), torch.nn.functional.cross_entropy(nsp_logits,
                                                                                          batch["nsp_labels"])
        (mlm + nsp).backward()
        missing = [n for n, p in model.named_parameters() if p.grad is None or not p.grad.abs().sum() > 0]
        assert not missing, missing
        opt.step()
        losses.append((mlm.item(), nsp.item()))
    assert losses[-1][0] < losses[0][0] - 1.0 and losses[-1][1] < losses[0][1] - 0.03, losses


def test_init_is_sensible_for_bert_parameters(mcore_world1):
    params = dict(initialised(tiny_config()).named_parameters())
    for name in ("embedding.tokentype_embeddings.weight", "lm_head.dense.weight", "pooler.dense.weight",
                 "binary_head.weight"):
        assert abs(params[name].std().item() - 0.02) < 0.01, name  # normal(0, init_method_std)
    for name in ("lm_head.dense.bias", "output_layer.bias", "pooler.dense.bias", "binary_head.bias"):
        assert not params[name].any(), name
    assert bool((params["lm_head.layer_norm.weight"] == 1).all())


def test_flops_per_token_counts_every_matmul_of_the_model(mcore_world1):
    """6 FLOPs per weight per token for the matrices every token passes (the tied embedding as the output layer,
    not the position/type lookups), attention's two [s, s] products, and the per-sequence pooler + NSP head."""
    cfg = tiny_config()
    model = bert.build(cfg, ParallelConfig(), torch.float32, VOCAB)
    h, s, layers = cfg.hidden_size, cfg.seq_length, cfg.num_layers
    per_sequence = ("pooler.", "binary_head.")
    lookups = ("embedding.position_embeddings.", "embedding.tokentype_embeddings.")
    per_token = sum(p.numel() for n, p in model.named_parameters()
                    if p.dim() == 2 and not n.startswith(per_sequence + lookups))
    heads = sum(p.numel() for n, p in model.named_parameters() if p.dim() == 2 and n.startswith(per_sequence))
    expected = 6 * per_token + 3 * layers * 4 * s * h + 6 * heads / s
    assert bert.flops_per_token(cfg, VOCAB) == pytest.approx(expected, rel=1e-12)
    assert bert.flops_per_token(cfg, VOCAB) > gpt.flops_per_token(cfg, VOCAB)


@pytest.mark.parametrize("nsp", [True, False])
@pytest.mark.parametrize("pipeline", [1, 2])
def test_dry_run_parameter_count_matches_the_model(mcore_world1, nsp, pipeline):
    from pretrain.parallel import plan

    cfg = tiny_config(nsp=nsp)
    stage_cfg = dataclasses.replace(cfg, num_layers=cfg.num_layers // pipeline)
    for stage in range(pipeline):
        # A world of one: megatron-core's pipeline groups are size 1, so pre/post_process choose the stage.
        model = bert.build(stage_cfg, ParallelConfig(), torch.float32, VOCAB, pre_process=stage == 0,
                           post_process=stage == pipeline - 1)
        assert plan.stage_params(cfg, VOCAB, 1, pipeline, stage) == sum(p.numel() for p in model.parameters())


# ---------------------------------------------------------------------------------------------------------------
# Tensor parallelism
# ---------------------------------------------------------------------------------------------------------------


def tp_outputs(tensor: int, sequence_parallel: bool) -> dict:
    """In a spawned 2-process group: megatron-core groups of ``tensor``; this rank's MLM losses, NSP logits, loss,
    full logits and the gradients of a few parameters (TP shards gathered whole), for one fixed batch."""
    import torch.distributed as dist
    from megatron.core import parallel_state
    from megatron.core.tensor_parallel.random import model_parallel_cuda_manual_seed

    parallel_state.initialize_model_parallel(tensor, 1)
    model_parallel_cuda_manual_seed(0)
    try:
        model = initialised(tiny_config(), ParallelConfig(tensor=tensor, sequence_parallel=sequence_parallel))
        batch = make_batch(b=4)
        lm_loss, nsp_logits = model(**batch["inputs"])
        loss = bert.loss_fn((lm_loss, nsp_logits), batch)
        loss.backward()
        with torch.no_grad():
            logits, _ = model(**{k: v for k, v in batch["inputs"].items() if k != "lm_labels"})  # [b, s, V/t]
        out = {"lm_loss": lm_loss.detach(), "nsp_logits": nsp_logits.detach(), "loss": loss.detach(),
               "logits": gather_tp(logits, dim=-1, tensor=tensor)}
        for name, param in model.named_parameters():
            if name.startswith(("embedding.word", "encoder.layers.0.self_attention.linear_qkv", "pooler.",
                                "binary_head.", "lm_head.dense.weight", "encoder.layers.1.mlp.linear_fc2.weight")):
                grad = param.grad
                if getattr(param, "sequence_parallel", False):  # the engine sums these partial gradients
                    dist.all_reduce(grad, group=parallel_state.get_tensor_model_parallel_group())
                if getattr(param, "tensor_model_parallel", False):
                    grad = gather_tp(grad, dim=param.partition_dim, tensor=tensor)
                out[f"grad {name}"] = grad
        return out
    finally:
        parallel_state.destroy_model_parallel()


def gather_tp(shard: torch.Tensor, dim: int, tensor: int) -> torch.Tensor:
    import torch.distributed as dist
    from megatron.core import parallel_state

    if tensor == 1:
        return shard.detach()
    parts = [torch.empty_like(shard) for _ in range(tensor)]
    dist.all_gather(parts, shard.detach().contiguous(), group=parallel_state.get_tensor_model_parallel_group())
    return torch.cat(parts, dim=dim)


def tp_matrix() -> dict:
    """TP=1 (two data-parallel replicas), TP=2 and TP=2 with sequence parallelism, in one launch."""
    return {name: tp_outputs(tensor, sp) for name, tensor, sp in
            [("TP=1", 1, False), ("TP=2", 2, False), ("TP=2 + SP", 2, True)]}


@pytest.fixture(scope="module")
def tp_runs() -> list[dict]:
    return run_distributed(tp_matrix, 2, timeout_s=300)


@pytest.mark.parametrize("layout", ["TP=2", "TP=2 + SP"])
def test_tensor_parallel_equals_single(tp_runs, layout):
    for rank_out in tp_runs:  # both TP ranks hold the full result
        ref, ours = rank_out["TP=1"], rank_out[layout]
        assert set(ours) == set(ref) and len(ref) > 6
        for key in ref:
            torch.testing.assert_close(ours[key], ref[key], rtol=1e-5, atol=1e-6, msg=f"{layout}: {key}")
    assert tp_runs[0]["TP=1"]["loss"] > 0


def test_classification_features_are_the_mean_of_the_real_tokens_states(mcore_world1):
    """Fine-tuning features: the mean final hidden state over real tokens; padding changes nothing."""
    model = bert.build(tiny_config(), ParallelConfig(), torch.float32, VOCAB).eval()
    model.post_process = False  # as the classifier uses it: the encoder's hidden states [s, b, h]
    ids = torch.randint(7, VOCAB, (2, 12))
    with torch.no_grad():
        features = bert.classification_features(model, ids, torch.tensor([12, 7]))  # row 1: 5 padding positions
        alone = bert.classification_features(model, ids[1:, :7], torch.tensor([7]))
        hidden = model(input_ids=ids[:1], attention_mask=torch.ones_like(ids[:1]),
                       tokentype_ids=torch.zeros_like(ids[:1]))  # [s, 1, h]
    torch.testing.assert_close(features[1:], alone, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(features[:1], hidden.mean(0), rtol=1e-5, atol=1e-6)
