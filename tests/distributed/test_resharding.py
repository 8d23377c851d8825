"""A checkpoint saved in one parallel layout continues in another: TP 2->1 and 1->2, PP 2->1 (with and without
virtual stages) and 1->2 (interleaved), DP 2->1 under ZeRO-1 (which DeepSpeed refuses), and ZeRO 0->2, 3->1,
1->3, 3->0; GPT (TP 2->1 with swiglu, whose first MLP layer holds [gate; up] per TP rank), and Transformer-XL
for its u/v parameters shared by every pipeline chunk.

Layout A trains 3 steps and saves at steps 2 and 3; layout B starts from A's step 2 (checkpoint.load, so the
manager reshards) and takes step 3. Two checks: B's step-3 loss (the forward from the loaded weights) equals A's,
and B's weights after its one AdamW step equal A's step-3 weights, which holds only if the AdamW moments and step
count came along. Measured: at most 1.2e-7 apart; with the AdamW state reset after loading (done by hand for
TP 2->1 and ZeRO 1->3) 8.0e-4 apart. Dropout is off; validation too (it is not what is tested). Two models also get
a checkpoint from load_resharded directly: one of another hidden size (refused, naming the tensor) and one whose
padded vocabulary is larger (common rows copied, the rest zero).
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
import yaml

from tests.conftest import REPO, TINY_CONFIG
from tests.distributed.layouts_support import run_layouts

TXL_CONFIG = REPO / "configs" / "txl" / "tiny.yaml"
COMMON = ["--model.hidden_dropout=0.0", "--model.attention_dropout=0.0", "--train.steps=3",
          "--train.micro_batch_size=4", "--train.global_batch_size=16", "--train.log_every=1",
          "--checkpoint.every_steps=2", "--checkpoint.keep_last=0", "--data.valid="]
# Transformer-XL without segment memory: memory is not resharded, and with it B's losses would differ from A's.
SWIGLU = "--model.activation=swiglu"
TXL = ["--model.num_layers=4", "--model.hidden_size=64", "--model.ffn_hidden_size=128", "--model.seq_length=32",
       "--model.mem_length=0", "--model.eval_mem_length=0", "--optim.warmup_steps=0", "--optim.lr=5e-3"]

#: Layouts A (all at world size 2): name -> (config, overrides).
SAVED = {"TP=2 swiglu": (TINY_CONFIG, ["--parallel.tensor=2", SWIGLU]),
         "PP=2": (TINY_CONFIG, ["--parallel.pipeline=2"]),
         "DP=2 ZeRO-1": (TINY_CONFIG, ["--parallel.zero_stage=1"]),
         "DP=2 ZeRO-3": (TINY_CONFIG, ["--parallel.zero_stage=3"]),
         "TXL PP=2 VPP=2": (TXL_CONFIG, [*TXL, "--parallel.pipeline=2", "--parallel.virtual_pipeline=2"])}
#: Layouts B by world size: case -> (layout A it loads, its own overrides).
LOADED = {
    1: {"TP 2->1 (swiglu: gated fc1)": ("TP=2 swiglu", [SWIGLU]),
        "PP 2->1": ("PP=2", []),
        "DP 2->1, ZeRO 1->0": ("DP=2 ZeRO-1", []),
        "TXL PP=2 VPP=2 -> 1 (shared u/v)": ("TXL PP=2 VPP=2", TXL)},
    2: {"TP 1->2, DP 2->1, ZeRO 1->0": ("DP=2 ZeRO-1", ["--parallel.tensor=2"]),
        "PP 2->1, DP 1->2, ZeRO 0->2": ("PP=2", ["--parallel.zero_stage=2"]),
        "ZeRO 3->1": ("DP=2 ZeRO-3", ["--parallel.zero_stage=1"]),
        "ZeRO 1->3": ("DP=2 ZeRO-1", ["--parallel.zero_stage=3"]),
        "PP 1->2 VPP 2, DP 2->1, ZeRO 3->0": ("DP=2 ZeRO-3", ["--parallel.pipeline=2",
                                                              "--parallel.virtual_pipeline=2"])},
}
CASES = {case: source for jobs in LOADED.values() for case, (source, _) in jobs.items()}
#: Runs whose TP = PP = 1 module files give the whole model's names and shapes: GPT's, else the case's own.
SHAPES_FROM = {"GPT": ("saved", "DP=2 ZeRO-1"), "TXL PP=2 VPP=2 -> 1 (shared u/v)": ("loaded", None),
               "TP 2->1 (swiglu: gated fc1)": ("loaded", None)}
#: Models handed a checkpoint by load_resharded directly: name -> (layout A, overrides). Hidden size 256, not
#: 192: refused. Vocabulary padded to a multiple of 384 (1152 rows) loading TP=2's padding to 256 (1024 rows).
DIRECT = {"other shape": ("DP=2 ZeRO-1", ["--model.hidden_size=256"]),
          "padded vocabulary 1024 -> 1152": ("TP=2 swiglu",
                                             [SWIGLU, "--model.make_vocab_size_divisible_by=384"])}


def train_loaded(jobs: dict[str, tuple[str, list[str]]], data_args: list[str], root: str,
                 direct: dict[str, tuple[str, list[str], str]]) -> dict:
    """In a spawned group: train layouts B (their overrides name checkpoint.load) as train_layouts does; then
    build each model in ``direct`` {name: (config, overrides, checkpoint)} and hand it the checkpoint through
    load_resharded itself (the manager would refuse a differing config first). For those, rank 0 returns
    {"error": the CheckpointError's message} or this rank's word embedding and its AdamW exp_avg."""
    from megatron.core import parallel_state

    from pretrain import device
    from pretrain.errors import CheckpointError
    from pretrain.checkpoint.format import read_marker
    from pretrain.checkpoint.reshard import load_resharded
    from pretrain.config import load
    from pretrain.parallel.dims import ParallelDims
    from pretrain.train import build
    from tests.distributed.layouts_support import train_layouts

    results = train_layouts(jobs, data_args, f"{root}/loaded")
    for name, (config, overrides, checkpoint) in direct.items():
        cfg = load(config, [*data_args, f"--run.dir={root}/direct", *overrides])
        trainer = build(cfg, ParallelDims.from_config(cfg, 1), device.detect(0, cfg.train.precision))
        try:
            load_resharded(Path(checkpoint), read_marker(checkpoint)["layout"], trainer.engine,
                           cfg.model.num_layers, gated_mlp=cfg.model.activation == "swiglu")
            weight = trainer.engine.chunks[0].embedding.word_embeddings.weight
            results[name] = {"weight": weight.detach().clone(),
                             "exp_avg": trainer.engine.optimizer.state[weight]["exp_avg"].clone()}
        except CheckpointError as e:
            results[name] = {"error": str(e)}
        parallel_state.destroy_model_parallel()
    return results


@pytest.fixture(scope="module")
def runs(shakespeare, tmp_path_factory) -> dict[str, dict]:
    from pretrain.testing import run_distributed

    root = str(tmp_path_factory.mktemp("resharding"))
    saved = run_layouts({2: {name: (str(config), [*COMMON, *overrides]) for name, (config, overrides)
                             in SAVED.items()}}, shakespeare, root)
    data_args = [f"--data.train={shakespeare['train']}", f"--data.valid={shakespeare['valid']}",
                 f"--data.tokenizer={shakespeare['tokenizer']}"]
    step_2 = {name: f"{result['run_dir']}/checkpoints/step_2" for name, result in saved.items()}
    loaded = {}
    for world, cases in LOADED.items():
        jobs = {case: (str(SAVED[source][0]), [*COMMON, *overrides, f"--checkpoint.load={step_2[source]}"])
                for case, (source, overrides) in cases.items()}
        direct = {name: (str(TINY_CONFIG), [*COMMON, *overrides], step_2[source])
                  for name, (source, overrides) in DIRECT.items()} if world == 1 else {}
        loaded.update(run_distributed(train_loaded, world, args=(jobs, data_args, root, direct), timeout_s=900)[0])
    return {"saved": saved, "loaded": loaded, "step_2": step_2}


def weights(checkpoint: Path, shapes_from: Path) -> dict[str, torch.Tensor]:
    """The whole model's fp32 weights by global name, read without pretrain.checkpoint.reshard: DeepSpeed's
    zero_to_fp32 for ZeRO-3 (TP = PP = 1 here), else consolidate.py joining the module files into the names and
    shapes of ``shapes_from`` (a TP = PP = 1, ZeRO < 3 checkpoint of the same model)."""
    from pretrain.checkpoint.format import read_marker
    from pretrain.checkpoint.consolidate import consolidated_state_dict, model_file

    layout = read_marker(checkpoint)["layout"]
    if layout["zero_stage"] == 3:
        from deepspeed.utils import zero_to_fp32 as z

        states = z.parse_model_states(z.get_model_state_files(str(checkpoint)))
        _, dp, flats, _ = z.parse_optim_states(z.get_optim_files(str(checkpoint)), str(checkpoint))
        merged = z._get_fp32_state_dict_from_zero3_checkpoint(dp, flats, states, exclude_frozen_parameters=True)
        return {k: v.contiguous() for k, v in merged.items()}
    target = {k: v for k, v in torch.load(model_file(shapes_from, 0), weights_only=False)["module"].items()
              if not k.endswith("_extra_state")}
    model = yaml.safe_load((checkpoint / "config.yaml").read_text())["model"]
    return consolidated_state_dict(checkpoint, layout, target, model["num_layers"],
                                   gated_mlp=model.get("activation") == "swiglu")


@pytest.mark.slow
@pytest.mark.parametrize("case", list(CASES))
def test_loaded_layout_continues_like_the_saved_one(runs, case):
    saved, loaded = runs["saved"][CASES[case]], runs["loaded"][case]
    assert sorted(loaded["metrics"]) == [3]
    ours, ref = loaded["metrics"][3], saved["metrics"][3]
    assert ours["loss"] == pytest.approx(ref["loss"], rel=1e-5), case  # the loaded weights
    assert ours["grad_norm"] == pytest.approx(ref["grad_norm"], rel=1e-4), case
    group, name = SHAPES_FROM.get(case, SHAPES_FROM["GPT"])
    shapes_from = Path(runs[group][name or case]["run_dir"]) / "checkpoints" / "step_3"
    a = weights(Path(saved["run_dir"]) / "checkpoints" / "step_3", shapes_from)
    b = weights(Path(loaded["run_dir"]) / "checkpoints" / "step_3", shapes_from)
    assert a.keys() == b.keys()
    worst = max((a[k] - b[k]).abs().max().item() for k in a)
    print(f"{case}: step-3 loss {ours['loss']:.7f} vs {ref['loss']:.7f}; max |weight diff| {worst:.2e}")
    assert worst < 1e-5, case  # the AdamW state came along (without it: ~lr)


@pytest.mark.slow
def test_a_model_of_another_shape_is_refused(runs):
    message = runs["loaded"]["other shape"]["error"]
    assert "\n" not in message and "embedding.word_embeddings.weight" in message, message


@pytest.mark.slow
def test_a_larger_padded_vocabulary_gets_the_common_rows_and_zeros(runs):
    """TP=2 padded the 1024-token vocabulary to 1024 rows; a model padding to 1152 gets those rows (weights and
    AdamW moments) and zeros below them."""
    from pretrain.checkpoint.consolidate import consolidated_state_dict, model_file

    name, step_2 = "embedding.word_embeddings.weight", Path(runs["step_2"]["TP=2 swiglu"])
    ours = runs["loaded"]["padded vocabulary 1024 -> 1152"]
    assert ours["weight"].shape == ours["exp_avg"].shape == (1152, 192)
    layout = {"tensor": 2, "pipeline": 1}
    weight = consolidated_state_dict(step_2, layout, {name: torch.empty(1024, 192)}, num_layers=4)[name]
    # ZeRO-0 AdamW state id 0 is the first matrix, the word embedding; TP shards split its rows.
    exp_avg = torch.cat([torch.load(model_file(step_2, t), weights_only=False)["optimizer"]["state"][0]["exp_avg"]
                         for t in range(2)])
    assert torch.equal(ours["weight"][:1024], weight) and torch.equal(ours["exp_avg"][:1024], exp_avg)
    assert exp_avg.abs().max() > 0 and not ours["weight"][1024:].any() and not ours["exp_avg"][1024:].any()
