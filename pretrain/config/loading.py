"""Loading a Config: YAML files, ``--section.key=value`` overrides (nested sections: ``--a.b.c=v``), type checks."""

from __future__ import annotations

import dataclasses
import re
import typing
from pathlib import Path
from typing import Any, Literal

import yaml

from pretrain.config.sections import Config
from pretrain.errors import ConfigError
from pretrain.config.validation import validate

_FLOAT = re.compile(r"[-+]?(\d+\.?\d*|\.\d+)([eE][-+]?\d+)?")


def _describe(tp) -> str:
    if typing.get_origin(tp) is list:
        return f"a path or a list of {typing.get_args(tp)[0].__name__} mappings"
    if typing.get_origin(tp) is Literal:
        return "one of " + ", ".join(repr(a) for a in typing.get_args(tp))
    return getattr(tp, "__name__", str(tp))


def _coerce(key: str, value: Any, tp) -> Any:
    """Check ``value`` against the field type; ints are accepted for floats. Raises ConfigError naming ``key``."""
    if typing.get_origin(tp) is Literal:
        if value in typing.get_args(tp) and type(value) in {type(a) for a in typing.get_args(tp)}:
            return value
    elif tp is float and isinstance(value, (int, float)) and not isinstance(value, bool):
        return float(value)
    elif tp is float and isinstance(value, str) and _FLOAT.fullmatch(value.strip()):
        return float(value)  # PyYAML (YAML 1.1) reads `3e-4` as a string; it is a float to every user
    elif tp is int and isinstance(value, int) and not isinstance(value, bool):
        return value
    elif tp in (str, bool) and isinstance(value, tp):
        return value
    elif dataclasses.is_dataclass(tp):  # a nested section, e.g. metrics.prometheus
        return _build_section(tp, value or {}, key)
    elif typing.get_origin(tp) is list and dataclasses.is_dataclass(item := typing.get_args(tp)[0]):
        items = ([value] if value else []) if isinstance(value, str) else value  # a lone path: one source
        if isinstance(items, list):
            return [item(path=v) if isinstance(v, str) else _build_section(item, v, f"{key}[{i}]")
                    for i, v in enumerate(items)]
    raise ConfigError(f"{key}: expected {_describe(tp)}, got {value!r}")


#: Keys users may write that cannot be field names: (section, key) -> field.
_ALIASES = {("checkpoint", "async"): "async_save"}


def _build_section(cls, values: dict[str, Any], prefix: str):
    if not isinstance(values, dict):
        raise ConfigError(f"{prefix}: expected a mapping of keys, got {values!r}")
    hints = typing.get_type_hints(cls)
    names = [f.name for f in dataclasses.fields(cls)]
    kwargs = {}
    for key, value in values.items():
        key = _ALIASES.get((prefix, key), key)
        if key not in hints:
            raise ConfigError(f"unknown key '{prefix}.{key}' (allowed: {', '.join(names)})")
        kwargs[key] = _coerce(f"{prefix}.{key}", value, hints[key])
    return cls(**kwargs)


def from_dict(raw: dict[str, Any]) -> Config:
    """Build and validate a Config from nested plain data (as loaded from YAML)."""
    if not isinstance(raw, dict):
        raise ConfigError(f"config: expected a mapping of sections, got {type(raw).__name__}")
    hints = typing.get_type_hints(Config)
    sections = {}
    for name, values in raw.items():
        if name not in hints:
            raise ConfigError(f"unknown section '{name}' (allowed: {', '.join(hints)})")
        sections[name] = _build_section(hints[name], values or {}, name)
    cfg = Config(**sections)
    validate(cfg)
    return cfg


def parse_override(arg: str) -> tuple[list[str], Any]:
    """``--section.key=value`` → (["section", "key"], value), the value parsed as a YAML scalar; nested sections
    take more keys (``--metrics.prometheus.port=9500``)."""
    if not arg.startswith("--") or "=" not in arg or "." not in arg.split("=", 1)[0]:
        raise ConfigError(f"bad override {arg!r}: expected --section.key=value")
    dotted, text = arg[2:].split("=", 1)
    return dotted.split("."), yaml.safe_load(text) if text != "" else ""


def load(path: str | Path, overrides: list[str] = ()) -> Config:
    """Load a YAML config file, apply ``--section.key=value`` overrides, validate."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"config file not found: {path}")
    try:
        raw = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as e:
        raise ConfigError(f"{path}: not valid YAML ({str(e).splitlines()[0]})") from None
    if not isinstance(raw, dict):
        raise ConfigError(f"{path}: expected a mapping of sections at the top level")
    for arg in overrides:
        keys, value = parse_override(arg)
        if _field_type(keys) is str:
            value = arg.split("=", 1)[1]  # text fields take the text as typed: --run.name=2024 is not a number
        mapping = raw
        for depth, key in enumerate(keys[:-1]):
            inner = mapping.get(key) or {}  # an empty `ft:` in the file loads as None
            if not isinstance(inner, dict):
                raise ConfigError(f"{'.'.join(keys[:depth + 1])}: expected a mapping of keys")
            mapping[key] = mapping = inner
        mapping[keys[-1]] = value
    return from_dict(raw)


def _field_type(keys: list[str]):
    """The type of the field that dotted ``keys`` name from Config down, or None if there is none."""
    tp = Config
    for key in keys:
        if not dataclasses.is_dataclass(tp):
            return None
        tp = typing.get_type_hints(tp).get(key)
    return tp


def to_yaml(cfg: Config) -> str:
    """The resolved config as YAML text; ``load`` of it gives back an equal Config."""
    return yaml.safe_dump(cfg.to_dict(), sort_keys=False)


def dump(cfg: Config, path: str | Path) -> None:
    """Write the resolved config as YAML (the run directory's config.yaml)."""
    Path(path).write_text(to_yaml(cfg))


