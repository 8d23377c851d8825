"""Config: shipped YAML files load, overrides are typed, every bad key or value is a one-line ConfigError naming it."""

from __future__ import annotations

import ast
import dataclasses
import re
import typing
from pathlib import Path

import pytest
import yaml

from pretrain import config as C
from pretrain.config import Config, dump, load
from pretrain.errors import ConfigError

REPO = Path(__file__).resolve().parents[2]
TINY = REPO / "configs" / "debug" / "gpt_tiny.yaml"
G125M = REPO / "configs" / "gpt" / "125m.yaml"
G13B = REPO / "configs" / "gpt" / "1.3b.yaml"


def config_error(path, overrides) -> str:
    """Load expecting a ConfigError; return its message after checking it is one line."""
    with pytest.raises(ConfigError) as info:
        load(path, overrides)
    message = str(info.value)
    assert message and "\n" not in message, f"ConfigError message is not one line: {message!r}"
    return message


# ---------------------------------------------------------------------------------------------------------------
# Shipped configs
# ---------------------------------------------------------------------------------------------------------------


def test_load_debug_tiny():
    cfg = load(TINY)
    assert isinstance(cfg, Config)
    assert (cfg.run.name, cfg.run.seed) == ("gpt_tiny", 1234)
    m = cfg.model
    assert (m.family, m.num_layers, m.hidden_size, m.num_attention_heads, m.seq_length) == ("gpt", 4, 192, 4, 128)
    assert cfg.data.train == [C.DataSource(path="runs/demo/data/train")]  # a lone path is a one-source blend
    assert cfg.optim.lr == pytest.approx(3e-3) and cfg.optim.min_lr == pytest.approx(3e-4)
    assert isinstance(cfg.optim.lr, float)
    assert (cfg.optim.warmup_steps, cfg.optim.schedule) == (20, "cosine")
    assert (cfg.train.steps, cfg.train.micro_batch_size, cfg.train.log_every) == (300, 16, 10)
    assert (cfg.checkpoint.every_steps, cfg.checkpoint.keep_last) == (50, 2)
    # Keys the file leaves out keep their dataclass defaults.
    assert cfg.model.ffn_hidden_size == 0 and cfg.train.global_batch_size == 0 and cfg.ft.save_on_signal is True


def test_load_gpt_125m():
    cfg = load(G125M)
    m = cfg.model
    assert (m.num_layers, m.hidden_size, m.num_attention_heads, m.seq_length) == (12, 768, 12, 2048)
    assert (cfg.parallel.tensor, cfg.parallel.zero_stage) == (1, 1)
    assert (cfg.train.micro_batch_size, cfg.train.global_batch_size, cfg.train.precision) == (16, 256, "bf16")
    assert cfg.optim.lr == pytest.approx(6e-4) and cfg.optim.warmup_steps == 375
    assert cfg.data.num_workers == 2


def test_load_gpt_1_3b():
    cfg = load(G13B)
    m = cfg.model
    assert (m.num_layers, m.hidden_size, m.num_attention_heads, m.seq_length) == (24, 2048, 16, 2048)
    p = cfg.parallel
    assert (p.tensor, p.pipeline, p.zero_stage, p.activation_checkpointing) == (2, 1, 1, "full")
    assert (cfg.train.micro_batch_size, cfg.train.global_batch_size) == (4, 512)
    assert cfg.optim.min_lr == pytest.approx(2e-5)


@pytest.mark.parametrize("path", [TINY, G125M, G13B], ids=["tiny", "125m", "1.3b"])
def test_dump_then_load_round_trips(path, tmp_path):
    cfg = load(path, ["--optim.min_lr=1.5e-5", "--run.name=round trip", "--metrics.console=false"])
    out = tmp_path / "config.yaml"
    dump(cfg, out)
    again = load(out)
    assert again == cfg
    assert again.optim.min_lr == 1.5e-5 and again.run.name == "round trip" and again.metrics.console is False
    # The dump is complete: every section and every field is written, not just the non-defaults.
    raw = yaml.safe_load(out.read_text())
    assert list(raw) == [f.name for f in dataclasses.fields(Config)]
    for f in dataclasses.fields(Config):
        assert list(raw[f.name]) == [g.name for g in dataclasses.fields(getattr(cfg, f.name))]


# ---------------------------------------------------------------------------------------------------------------
# Overrides: typed values
# ---------------------------------------------------------------------------------------------------------------


def test_override_int_float_bool_string():
    cfg = load(TINY, ["--model.hidden_size=256", "--optim.lr=3.0e-4", "--optim.weight_decay=0",
                      "--data.shuffle=false", "--run.name=my run", "--data.train=/tmp/shards",
                      "--parallel.zero_stage=2", "--train.precision=fp32"])
    assert cfg.model.hidden_size == 256 and type(cfg.model.hidden_size) is int
    assert cfg.optim.lr == 3.0e-4 and type(cfg.optim.lr) is float
    # An int is accepted for a float field and stored as a float.
    assert cfg.optim.weight_decay == 0.0 and type(cfg.optim.weight_decay) is float
    assert cfg.data.shuffle is False
    assert cfg.run.name == "my run" and cfg.data.train == [C.DataSource(path="/tmp/shards")]
    assert cfg.parallel.zero_stage == 2 and cfg.train.precision == "fp32"
    # The file's other values are untouched.
    assert cfg.model.num_layers == 4 and cfg.optim.min_lr == pytest.approx(3e-4)


def test_override_value_may_contain_equals_and_be_empty():
    cfg = load(TINY, ["--run.name=a=b", "--data.valid="])
    assert cfg.run.name == "a=b" and cfg.data.valid == ""


def test_later_override_wins():
    assert load(TINY, ["--train.steps=5", "--train.steps=7"]).train.steps == 7


@pytest.mark.parametrize("text, value", [("3e-4", 3e-4), ("1e3", 1000.0), ("1.0e5", 1.0e5), ("2E-5", 2e-5),
                                         ("3.0e-4", 3.0e-4), (".5", 0.5)])
def test_override_float_in_any_spelling(text, value):
    """PyYAML (YAML 1.1) reads `3e-4` and `1.0e5` as *strings*; a float field must still take them as floats."""
    if text in ("3e-4", "1e3", "1.0e5", "2E-5"):
        assert isinstance(yaml.safe_load(text), str)  # the trap this guards against
    cfg = load(TINY, [f"--optim.weight_decay={text}"])
    assert cfg.optim.weight_decay == value and type(cfg.optim.weight_decay) is float


def test_float_without_dot_in_yaml_file(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("data:\n  train: x\noptim:\n  lr: 3e-4\n  min_lr: 3e-5\n")
    cfg = load(path)
    assert (cfg.optim.lr, cfg.optim.min_lr) == (3e-4, 3e-5)


@pytest.mark.parametrize("text", ["abc", "3e", "e5", "1e-4x", "nan", "1.2.3"])
def test_float_field_still_rejects_non_numbers(text):
    message = config_error(TINY, [f"--optim.weight_decay={text}"])
    assert message.startswith("optim.weight_decay:") and "float" in message


def test_exponent_string_is_not_a_float_for_other_types():
    # Only float fields read `3e-4` as a number: an int field refuses it, a str field keeps the text.
    assert config_error(TINY, ["--train.steps=1e3"]).startswith("train.steps:")
    assert load(TINY, ["--run.name=3e-4"]).run.name == "3e-4"


def test_data_train_blend_sources():
    cfg = load(TINY, ["--data.train=[{path: a, weight: 0.7}, {path: b, weight: 0.3, shards: 'pipe:cat b-{0..3}.tar'}]"])
    assert cfg.data.train == [C.DataSource("a", 0.7), C.DataSource("b", 0.3, "pipe:cat b-{0..3}.tar")]
    for override, key in [("--data.train=[{pth: a}]", "data.train[0].pth"), ("--data.train=3", "data.train"),
                          ("--data.train=[{path: a, weight: 0}]", "data.train[0].weight")]:
        assert key in config_error(TINY, [override])


@pytest.mark.parametrize("text", ["2024", "yes", "null", "off", "1.5"])
def test_text_fields_take_override_text_as_typed(text):
    # YAML 1.1 would make these a number, a bool or None; a run name is text whatever it looks like.
    assert load(TINY, [f"--run.name={text}"]).run.name == text


def test_empty_section_in_file_accepts_overrides(tmp_path):
    path = tmp_path / "cfg.yaml"
    path.write_text(TINY.read_text() + "ft:\n")
    assert load(path, ["--ft.save_on_signal=false"]).ft.save_on_signal is False


@pytest.mark.parametrize("override, key", [
    ("--optim.lr=.inf", "optim.lr"), ("--optim.beta2=1.5", "optim.beta2"), ("--optim.eps=0", "optim.eps"),
    ("--optim.weight_decay=-0.1", "optim.weight_decay"), ("--model.init_method_std=0", "model.init_method_std"),
    ("--optim.decay_steps=5", "optim.decay_steps"),  # below warmup_steps (20)
])
def test_optimizer_and_init_ranges(override, key):
    with pytest.raises(ConfigError, match=re.escape(key)):
        load(TINY, [override])


@pytest.mark.parametrize("overrides, key", [
    (["--model.num_query_groups=3"], "model.num_query_groups"),  # does not divide 4 heads
    (["--model.rope_theta=0"], "model.rope_theta"),
    (["--model.rope_scaling_factor=8"], "model.rope_scaling_factor"),  # learned positions: nothing to scale
    (["--model.position_embedding=rope", "--model.rope_scaling_factor=0.5"], "model.rope_scaling_factor"),
    (["--model.position_embedding=rope", "--model.rope_scaling_factor=8", "--model.rope_high_freq_factor=1"],
     "model.rope_high_freq_factor"),  # not above the low frequency factor (1)
    (["--model.position_embedding=rope", "--model.rope_scaling_factor=8",
      "--model.rope_original_max_position_embeddings=0"], "model.rope_original_max_position_embeddings"),
    (["--model.family=bert", "--model.normalization=rmsnorm"], "model.normalization"),  # GPT options only
    (["--model.family=bert", "--model.add_bias_linear=false"], "model.add_bias_linear"),
])
def test_llama_options_are_checked(overrides, key):
    assert config_error(TINY, overrides).startswith(f"{key}:")


@pytest.mark.parametrize("name, layers, hidden, groups", [
    ("tiny", 4, 192, 2), ("3.2-1b", 16, 2048, 8), ("3.1-8b", 32, 4096, 8)])
def test_llama_presets_load(name, layers, hidden, groups):
    m = load(REPO / "configs" / "llama" / f"{name}.yaml", []).model
    assert (m.num_layers, m.hidden_size, m.num_query_groups) == (layers, hidden, groups)
    assert (m.normalization, m.activation, m.position_embedding, m.add_bias_linear) == \
        ("rmsnorm", "swiglu", "rope", False)
    # Meta's config.json rope_scaling (rope_type llama3): none in the tiny model, 32 in 3.2 1B, 8 in 3.1 8B.
    assert (m.rope_scaling_factor, m.rope_low_freq_factor, m.rope_high_freq_factor,
            m.rope_original_max_position_embeddings) == ({"tiny": 0.0, "3.2-1b": 32.0, "3.1-8b": 8.0}[name], 1.0, 4.0,
                                                         8192)


@pytest.mark.parametrize("override, key, shown", [
    ("--model.hidden_size=abc", "model.hidden_size", "'abc'"),
    ("--train.steps=1.5", "train.steps", "1.5"),
    ("--train.steps=true", "train.steps", "True"),  # bool is not an int here
    ("--model.num_layers=[1, 2]", "model.num_layers", "[1, 2]"),
    ("--optim.lr=abc", "optim.lr", "'abc'"),
    ("--optim.lr=true", "optim.lr", "True"),  # bool is not a float either
    ("--data.shuffle=1", "data.shuffle", "1"),  # nor is an int a bool
    ("--parallel.zero_stage=4", "parallel.zero_stage", "4"),
    ("--parallel.zero_stage=1.0", "parallel.zero_stage", "1.0"),  # right value, wrong type
    ("--parallel.zero_stage=true", "parallel.zero_stage", "True"),  # True == 1 but is not a stage
    ("--train.precision=fp16", "train.precision", "'fp16'"),
    ("--parallel.activation_checkpointing=some", "parallel.activation_checkpointing", "'some'"),
    ("--model.family=t5", "model.family", "'t5'"),
])
def test_wrong_type_names_the_key(override, key, shown):
    message = config_error(TINY, [override])
    assert message.startswith(f"{key}:"), message
    assert shown in message


def test_literal_error_lists_allowed_values():
    message = config_error(TINY, ["--parallel.zero_stage=4"])
    assert "0, 1, 2, 3" in message


@pytest.mark.parametrize("override, shown", [
    ("--model.hiden=3", "'model.hiden'"),
    ("--optim.learning_rate=1.0", "'optim.learning_rate'"),
    ("--model.=3", "'model.'"),
])
def test_unknown_key_names_it_and_lists_the_allowed(override, shown):
    message = config_error(TINY, [override])
    assert shown in message and "unknown key" in message
    assert "hidden_size" in message or "lr" in message  # the allowed keys are listed


@pytest.mark.parametrize("override, section", [("--modle.hidden_size=3", "'modle'"), ("--.x=1", "''")])
def test_unknown_section_names_it(override, section):
    message = config_error(TINY, [override])
    assert f"unknown section {section}" in message
    assert "model" in message and "parallel" in message  # the allowed sections are listed


def test_unknown_key_in_yaml_file(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("data:\n  train: x\ntrain:\n  stepz: 3\n")
    assert "'train.stepz'" in config_error(path, [])
    path.write_text("data:\n  train: x\ntrainer:\n  steps: 3\n")
    assert "'trainer'" in config_error(path, [])


@pytest.mark.parametrize("override", [
    "model.hidden_size=3",  # no leading --
    "-model.hidden_size=3",
    "--model.hidden_size",  # no =
    "--hidden_size=3",  # no section
    "--model=3",
    "--=3",
])
def test_malformed_override(override):
    message = config_error(TINY, [override])
    assert message.startswith("bad override") and repr(override) in message


# ---------------------------------------------------------------------------------------------------------------
# Malformed files
# ---------------------------------------------------------------------------------------------------------------


def test_missing_file(tmp_path):
    message = config_error(tmp_path / "nope.yaml", [])
    assert "not found" in message and "nope.yaml" in message


@pytest.mark.parametrize("text, needle", [
    ("a: [\n", "not valid YAML"),
    ("- 1\n- 2\n", "mapping of sections"),
    ("data:\n  train: x\nmodel: [1, 2]\n", "model: expected a mapping"),
])
def test_malformed_file(tmp_path, text, needle):
    path = tmp_path / "c.yaml"
    path.write_text(text)
    assert needle in config_error(path, [])


def test_empty_section_in_file_means_defaults(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("data:\n  train: x\nft:\n")
    assert load(path).ft == C.FtConfig()


# ---------------------------------------------------------------------------------------------------------------
# validate(): one case per rule; the message starts with the key
# ---------------------------------------------------------------------------------------------------------------

_POSITIVE = ["model.num_layers", "model.hidden_size", "model.num_attention_heads", "model.seq_length",
             "model.make_vocab_size_divisible_by", "train.steps", "train.micro_batch_size", "train.log_every",
             "parallel.tensor", "parallel.pipeline"]
_NON_NEGATIVE = ["model.ffn_hidden_size", "model.vocab_size", "train.global_batch_size", "train.eval_every",
                 "train.eval_batches", "optim.warmup_steps", "optim.decay_steps", "checkpoint.every_steps",
                 "checkpoint.keep_last", "data.num_workers"]


@pytest.mark.parametrize("key", _POSITIVE)
def test_must_be_positive(key):
    message = config_error(TINY, [f"--{key}=0"])
    assert message.startswith(f"{key}:") and "> 0" in message


@pytest.mark.parametrize("key", _NON_NEGATIVE)
def test_must_be_non_negative(key):
    message = config_error(TINY, [f"--{key}=-1"])
    assert message.startswith(f"{key}:") and ">= 0" in message and "-1" in message
    load(TINY, [f"--{key}=0"])  # the boundary is allowed


@pytest.mark.parametrize("overrides, key, needles", [
    (["--model.num_attention_heads=5"], "model.num_attention_heads", ["5", "192"]),
    (["--model.hidden_dropout=1.0"], "model.hidden_dropout", ["[0, 1)", "1.0"]),
    (["--model.attention_dropout=-0.1"], "model.attention_dropout", ["-0.1"]),
    (["--model.hidden_dropout=.nan"], "model.hidden_dropout", ["nan"]),
    (["--optim.lr=0.0", "--optim.min_lr=0.0"], "optim.lr", ["> 0"]),
    (["--optim.min_lr=0.01"], "optim.min_lr", ["0.01", "0.003"]),  # min_lr > lr (3e-3)
    (["--optim.min_lr=-1.0e-5"], "optim.min_lr", ["-1e-05"]),
    (["--optim.clip_grad=-1.0"], "optim.clip_grad", [">= 0"]),
    (["--parallel.pipeline=0"], "parallel.pipeline", ["> 0", "0"]),
    (["--parallel.virtual_pipeline=2"], "parallel.virtual_pipeline", ["2", "parallel.pipeline > 1"]),
    (["--parallel.pipeline=2", "--parallel.zero_stage=2"], "parallel.zero_stage", ["2", "pipeline 1 (got 2)"]),
    (["--parallel.pipeline=2", "--parallel.zero_stage=3"], "parallel.zero_stage", ["3", "zero_stage 0 or 1"]),
    (["--parallel.sequence_parallel=true"], "parallel.sequence_parallel", ["parallel.tensor > 1"]),
    (["--data.train="], "data.train", ["required"]),
])
def test_value_rules(overrides, key, needles):
    message = config_error(TINY, overrides)
    assert message.startswith(f"{key}:"), message
    for needle in needles:
        assert needle in message, (needle, message)


def test_value_rule_boundaries_are_accepted():
    cfg = load(TINY, ["--model.hidden_dropout=0.99", "--model.attention_dropout=0.0", "--optim.min_lr=3.0e-3",
                      "--optim.clip_grad=0", "--parallel.tensor=2", "--parallel.sequence_parallel=true",
                      "--model.num_attention_heads=6"])
    assert cfg.optim.min_lr == cfg.optim.lr and cfg.parallel.sequence_parallel is True
    assert cfg.model.num_attention_heads == 6


def test_missing_data_train_in_defaults():
    with pytest.raises(ConfigError, match=r"^data\.train:"):
        C.validate(Config())
    C.validate(Config(data=C.DataConfig(train=[C.DataSource(path="x")])))  # every other default is valid


def test_from_dict_rejects_non_mapping():
    with pytest.raises(ConfigError, match="mapping of sections"):
        C.from_dict([1, 2])


# ---------------------------------------------------------------------------------------------------------------
# The `#:` comments the README's config reference is generated from
# ---------------------------------------------------------------------------------------------------------------


def _dataclass_fields_in_source():
    """{class name: [(field name, line above)]} for every @dataclass in pretrain/config/sections.py."""
    path = Path(C.__file__).with_name("sections.py")
    lines = path.read_text().splitlines()
    found = {}
    for node in ast.parse(path.read_text()).body:
        if not isinstance(node, ast.ClassDef):
            continue
        names = {d.id if isinstance(d, ast.Name) else getattr(d, "attr", None) for d in node.decorator_list}
        if "dataclass" not in names:
            continue
        found[node.name] = [(stmt.target.id, lines[stmt.lineno - 2].strip())
                            for stmt in node.body if isinstance(stmt, ast.AnnAssign)]
    return found


def test_every_section_field_has_a_doc_comment_directly_above():
    found = _dataclass_fields_in_source()
    sections = {tp.__name__ for tp in typing.get_type_hints(Config).values()}
    # Every dataclass in the module is a section, a section's item type, or Config (so none escapes this check).
    assert set(found) == sections | {"Config", "DataSource", "PrometheusConfig", "WandbConfig"}
    missing = [f"{cls}.{name}" for cls in sorted(found) for name, above in found[cls]
               if not above.startswith("#:") or len(above) <= 3]
    assert not missing, f"fields without a '#:' comment directly above: {missing}"
    # The parse really saw the fields (guards against the check passing on an empty list).
    assert sum(len(found[c]) for c in sections) == sum(len(dataclasses.fields(getattr(Config(), f.name)))
                                                       for f in dataclasses.fields(Config))


def test_checkpoint_async_is_accepted_as_the_async_save_key(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("data: {train: shards}\ncheckpoint: {async: true}\n")
    assert C.load(path).checkpoint.async_save is True
    assert C.load(path, ["--checkpoint.async=false"]).checkpoint.async_save is False
    with pytest.raises(ConfigError, match="checkpoint.async_save: expected bool"):
        C.load(path, ["--checkpoint.async=maybe"])


def test_nested_section_override_and_its_errors():
    cfg = C.load(TINY, ["--metrics.prometheus.enabled=true", "--metrics.prometheus.port=9500",
                        "--metrics.prometheus.host=0.0.0.0"])
    assert cfg.metrics.prometheus == C.PrometheusConfig(enabled=True, host="0.0.0.0", port=9500)
    assert C.from_dict(yaml.safe_load(C.to_yaml(cfg))) == cfg  # the nested section round-trips
    assert config_error(TINY, ["--model.a.b=1"]).startswith("unknown key 'model.a'")
    assert config_error(TINY, ["--model.hidden_size.x=1"]) == "model.hidden_size: expected a mapping of keys"
    assert config_error(TINY, ["--metrics.prometheus=true"]).startswith("metrics.prometheus: expected a mapping")


# ---------------------------------------------------------------------------------------------------------------
# validate_local: paths on this machine and this node's ports, before any process group (pretrain train's main)
# ---------------------------------------------------------------------------------------------------------------


@pytest.fixture
def local_files(tmp_path) -> dict[str, Path]:
    """A shard directory with a manifest, a tokenizer file, a checkpoint directory (contents are not read)."""
    shards = tmp_path / "shards"
    shards.mkdir()
    (shards / "manifest.json").write_text("{}")
    (tmp_path / "tok.model").write_bytes(b"sp")
    (tmp_path / "ckpt").mkdir()
    return {"shards": shards, "tokenizer": tmp_path / "tok.model", "checkpoint": tmp_path / "ckpt", "tmp": tmp_path}


def local_overrides(files: dict[str, Path]) -> list[str]:
    return [f"--data.train={files['shards']}", f"--data.valid={files['shards']}",
            f"--data.tokenizer={files['tokenizer']}", f"--checkpoint.load={files['checkpoint']}",
            f"--run.dir={files['tmp'] / 'run'}"]


def local_error(overrides, local_world_size: int = 1) -> str:
    cfg = load(TINY, overrides)  # the path checks are not part of load: --dry-run plans on any machine
    with pytest.raises(ConfigError) as info:
        C.validate_local(cfg, local_world_size)
    message = str(info.value)
    assert "\n" not in message, message
    return message


def test_validate_local_accepts_existing_paths_and_urls(local_files):
    C.validate_local(load(TINY, local_overrides(local_files)))
    manifest = local_files["shards"] / "manifest.json"
    C.validate_local(load(TINY, [*local_overrides(local_files), f"--data.train={manifest}",  # a manifest file
                                 f"--data.valid=file://{local_files['shards']}"]))
    # URL sources are webdataset's to open: nothing is checked here.
    blend = {"data": {"train": [{"path": "http://example.invalid/c4/manifest.json", "shards": "pipe:cat {0..3}"},
                                {"path": "pipe:curl -s http://example.invalid/m.json", "shards": "x"}],
                      "valid": "s3://bucket/valid", "tokenizer": str(local_files["tokenizer"])}}
    C.validate_local(C.from_dict(blend))


@pytest.mark.parametrize("key, override, needle", [
    ("data.tokenizer", "--data.tokenizer={tmp}/missing/tok.model", "file not found: {tmp}/missing/tok.model"),
    ("data.tokenizer", "--data.tokenizer={tmp}/shards", "not a file: {tmp}/shards"),
    ("data.train[0].path", "--data.train={tmp}/nowhere", "not found: {tmp}/nowhere"),
    ("data.train[0].path", "--data.train={tmp}/ckpt", "no manifest.json in {tmp}/ckpt"),
    ("data.train[0].path", "--data.train=file://{tmp}/nowhere", "not found: file://{tmp}/nowhere"),
    ("data.valid", "--data.valid={tmp}/valid", "not found: {tmp}/valid"),
    ("checkpoint.load", "--checkpoint.load={tmp}/ckpt/step_7", "checkpoint directory not found: {tmp}/ckpt/step_7"),
    ("checkpoint.load", "--checkpoint.load={tmp}/tok.model", "not a directory: {tmp}/tok.model"),
    ("run.dir", "--run.dir={tmp}/tok.model", "exists and is not a directory: {tmp}/tok.model"),
    ("checkpoint.dir", "--checkpoint.dir={tmp}/tok.model", "exists and is not a directory: {tmp}/tok.model"),
])
def test_validate_local_names_key_and_path(local_files, key, override, needle):
    tmp = local_files["tmp"]
    message = local_error([*local_overrides(local_files), override.format(tmp=tmp)])
    assert message == f"{key}: {needle.format(tmp=tmp)}" or message.startswith(f"{key}: {needle.format(tmp=tmp)} ")


def test_validate_local_second_blend_source_is_named(local_files):
    tmp = local_files["tmp"]
    blend = {"data": {"train": [str(local_files["shards"]), {"path": str(tmp / "gone"), "weight": 2.0}]}}
    with pytest.raises(ConfigError, match=rf"^data\.train\[1\]\.path: not found: {tmp}/gone$"):
        C.validate_local(C.from_dict(blend))


def test_prometheus_port_plus_local_rank_past_65535(local_files):
    base = [*local_overrides(local_files), "--metrics.prometheus.enabled=true"]
    message = local_error([*base, "--metrics.prometheus.port=65530"], local_world_size=8)
    assert message == ("metrics.prometheus.port: 65530 + LOCAL_RANK (up to 7 on this node) reaches 65537, past 65535; "
                       "use a base port <= 65528")
    C.validate_local(load(TINY, [*base, "--metrics.prometheus.port=65528"]), local_world_size=8)  # 65535: last one
    C.validate_local(load(TINY, [*local_overrides(local_files), "--metrics.prometheus.port=65530"]),
                     local_world_size=8)  # exporter off: the port is not used
