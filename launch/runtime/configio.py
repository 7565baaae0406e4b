"""YAML <-> typed dataclasses, with errors that name the key, the value and what is allowed.

Section dataclasses live next to the code they configure (``data_pipeline.config``,
``autoencoder.config``, ``ldm.config``, ``launch.runtime.config``) and import nothing from here.
They declare ranges through field metadata, which this module reads:

    steps: int = field(default=10, metadata={"ge": 1})          # >= 1
    rate: float = field(default=0.1, metadata={"ge": 0, "le": 1})
    mode: Literal["a", "b"] = "a"                                # allowed values

and may define ``validate(self)`` raising ``ValueError`` for rules spanning several fields;
the message is prefixed with the section's dotted path.
"""
from __future__ import annotations

import dataclasses
import difflib
import json
import hashlib
import types
import typing
from pathlib import Path
from typing import Any, Literal, Union

import yaml

INHERIT_KEY = "inherit"  # `inherit: base.yaml` (or a list) deep-merges the file(s) under this one


class ConfigError(ValueError):
    """A configuration problem found before any compute."""


# ----------------------------------------------------------------------------- YAML + overrides

def read_yaml_tree(path: str | Path, _seen: tuple[Path, ...] = ()) -> dict:
    """Read a YAML file and resolve `inherit:` chains (paths relative to the including file)."""
    path = Path(path).resolve()
    if path in _seen:
        raise ConfigError(f"config inheritance cycle: {' -> '.join(map(str, _seen + (path,)))}")
    if not path.is_file():
        raise ConfigError(f"config file not found: {path}")
    with open(path) as f:
        data = yaml.safe_load(f) or {}
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: top level must be a mapping, got {type(data).__name__}")
    bases = data.pop(INHERIT_KEY, None)
    if bases is None:
        return data
    merged: dict = {}
    for base in [bases] if isinstance(bases, str) else list(bases):
        merged = deep_merge(merged, read_yaml_tree(path.parent / base, _seen + (path,)))
    return deep_merge(merged, data)


def deep_merge(base: dict, top: dict) -> dict:
    out = dict(base)
    for key, value in top.items():
        if isinstance(value, dict) and isinstance(out.get(key), dict):
            out[key] = deep_merge(out[key], value)
        else:
            out[key] = value
    return out


def parse_override(text: str) -> tuple[str, Any]:
    """`a.b.c=value` -> ("a.b.c", parsed value). Values are YAML scalars or flow collections."""
    if "=" not in text:
        raise ConfigError(f"override {text!r} is not of the form key=value (for example train.max_steps=100)")
    key, raw = text.split("=", 1)
    key = key.strip()
    if not key:
        raise ConfigError(f"override {text!r} has an empty key")
    try:
        value = yaml.safe_load(raw) if raw.strip() else ""
    except yaml.YAMLError:
        value = raw
    return key, value


def apply_overrides(tree: dict, overrides: list[str]) -> dict:
    tree = dict(tree)
    seen: dict[str, str] = {}
    for item in overrides:
        key, value = parse_override(item)
        if key in seen:
            raise ConfigError(f"override key '{key}' is given twice ({seen[key]!r} and {item!r}); if the shell "
                              "expanded a brace pattern such as {00000..00009}, quote it")
        seen[key] = item
        node = tree
        parts = key.split(".")
        for i, part in enumerate(parts[:-1]):
            child = node.get(part)
            if child is None:
                child = {}
            elif not isinstance(child, dict):
                raise ConfigError(f"override {key!r}: {'.'.join(parts[:i + 1])!r} is a value, not a section")
            node[part] = child = dict(child)
            node = child
        node[parts[-1]] = value
    return tree


# ----------------------------------------------------------------------------- typed construction

def _type_name(tp: Any) -> str:
    origin = typing.get_origin(tp)
    if origin is Literal:
        return " | ".join(repr(a) for a in typing.get_args(tp))
    if origin in (Union, types.UnionType):
        return " | ".join(_type_name(a) for a in typing.get_args(tp))
    if origin in (list, tuple, dict):
        args = ", ".join(_type_name(a) if a is not Ellipsis else "..." for a in typing.get_args(tp))
        return f"{origin.__name__}[{args}]"
    if tp is type(None):
        return "null"
    return getattr(tp, "__name__", str(tp))


def _check_range(path: str, value: Any, meta: typing.Mapping) -> None:
    rules = [("ge", ">=", lambda v, b: v >= b), ("gt", ">", lambda v, b: v > b),
             ("le", "<=", lambda v, b: v <= b), ("lt", "<", lambda v, b: v < b)]
    if value is None or isinstance(value, bool) or not isinstance(value, (int, float)):
        return
    for name, symbol, ok in rules:
        if name in meta and not ok(value, meta[name]):
            allowed = " and ".join(f"{s} {meta[n]}" for n, s, _ in rules if n in meta)
            raise ConfigError(f"config key '{path}' = {value!r} is out of range: must be {allowed}")


def _convert(path: str, value: Any, tp: Any) -> Any:
    origin = typing.get_origin(tp)
    args = typing.get_args(tp)
    if tp is Any:
        return value
    if dataclasses.is_dataclass(tp):
        if value is None:
            value = {}
        if not isinstance(value, dict):
            raise ConfigError(f"config key '{path}' must be a section (mapping), got {value!r}")
        return build_dataclass(tp, value, path)
    if origin is Literal:
        if value not in args:
            raise ConfigError(f"config key '{path}' = {value!r} is not allowed; allowed values: "
                              + ", ".join(repr(a) for a in args))
        return value
    if origin in (Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        errors = []
        for arg in (a for a in args if a is not type(None)):
            try:
                return _convert(path, value, arg)
            except ConfigError as e:
                errors.append(str(e))
        raise ConfigError(f"config key '{path}' = {value!r} does not match {_type_name(tp)}")
    if origin is list:
        if isinstance(value, (str, int, float)) and not isinstance(value, bool) and args and args[0] is str:
            value = [value]  # a single URL/string where a list is expected
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"config key '{path}' must be a list of {_type_name(args[0])}, got {value!r}")
        return [_convert(f"{path}[{i}]", v, args[0]) for i, v in enumerate(value)]
    if origin is tuple:
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"config key '{path}' must be a list ({_type_name(tp)}), got {value!r}")
        if len(args) == 2 and args[1] is Ellipsis:
            return tuple(_convert(f"{path}[{i}]", v, args[0]) for i, v in enumerate(value))
        if len(value) != len(args):
            raise ConfigError(f"config key '{path}' must have {len(args)} items ({_type_name(tp)}), got {value!r}")
        return tuple(_convert(f"{path}[{i}]", v, a) for i, (v, a) in enumerate(zip(value, args)))
    if origin is dict:
        if not isinstance(value, dict):
            raise ConfigError(f"config key '{path}' must be a mapping, got {value!r}")
        vt = args[1] if args else Any
        return {str(k): _convert(f"{path}.{k}", v, vt) for k, v in value.items()}
    if tp is bool:
        if not isinstance(value, bool):
            raise ConfigError(f"config key '{path}' = {value!r} must be true or false")
        return value
    if tp is int:
        if isinstance(value, bool) or not isinstance(value, int):
            if isinstance(value, float) and value.is_integer():
                return int(value)
            raise ConfigError(f"config key '{path}' = {value!r} must be an integer")
        return value
    if tp is float:
        if isinstance(value, str):
            try:  # YAML 1.1 reads `2e-3` (no dot) as a string; it is plainly a number
                value = float(value)
            except ValueError:
                pass
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ConfigError(f"config key '{path}' = {value!r} must be a number")
        return float(value)
    if tp is str:
        if not isinstance(value, str):
            raise ConfigError(f"config key '{path}' = {value!r} must be a string")
        return value
    raise ConfigError(f"config key '{path}': unsupported field type {tp!r}")  # a bug in a dataclass


def build_dataclass(cls: type, data: dict, path: str = ""):
    """Build ``cls`` from a plain mapping, checking keys, types, ranges and ``validate()``."""
    hints = typing.get_type_hints(cls)
    # a field may be spelled differently in YAML (metadata "key": `init.from` is the field `from_`)
    fields = {f.metadata.get("key", f.name): f for f in dataclasses.fields(cls) if f.init}
    unknown = [k for k in data if k not in fields]
    if unknown:
        key = unknown[0]
        full = f"{path}.{key}" if path else key
        close = difflib.get_close_matches(str(key), list(fields), n=1)
        hint = f" (did you mean '{(path + '.') if path else ''}{close[0]}'?)" if close else ""
        raise ConfigError(f"unknown config key '{full}'{hint}; allowed keys"
                          f"{' under ' + repr(path) if path else ''}: {', '.join(fields)}")
    kwargs = {}
    for name, f in fields.items():
        full = f"{path}.{name}" if path else name
        if name in data:
            kwargs[f.name] = _convert(full, data[name], hints[f.name])
            _check_range(full, kwargs[f.name], f.metadata)
        elif f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING:
            raise ConfigError(f"config key '{full}' is required ({_type_name(hints[f.name])})")
    obj = cls(**kwargs)
    for name, f in fields.items():  # defaults are checked too: a default can be out of range after a refactor
        if name not in data:
            _check_range(f"{path}.{name}" if path else name, getattr(obj, f.name), f.metadata)
    validate = getattr(obj, "validate", None)
    if callable(validate):
        try:
            validate()
        except ConfigError:
            raise
        except ValueError as e:
            raise ConfigError(f"config section '{path or '<root>'}': {e}") from None
    return obj


def to_plain(obj: Any) -> Any:
    """Dataclasses -> dicts, tuples -> lists (what YAML/JSON should see)."""
    if dataclasses.is_dataclass(obj) and not isinstance(obj, type):
        return {f.metadata.get("key", f.name): to_plain(getattr(obj, f.name)) for f in dataclasses.fields(obj)}
    if isinstance(obj, (list, tuple)):
        return [to_plain(v) for v in obj]
    if isinstance(obj, dict):
        return {k: to_plain(v) for k, v in obj.items()}
    return obj


def dump_yaml(obj: Any) -> str:
    return yaml.safe_dump(to_plain(obj), sort_keys=False, default_flow_style=None, width=100)


def config_hash(obj: Any) -> str:
    """Stable hash of a resolved config (sorted JSON)."""
    blob = json.dumps(to_plain(obj), sort_keys=True, separators=(",", ":"), default=str)
    return hashlib.sha256(blob.encode()).hexdigest()[:16]


def flatten(tree: Any, prefix: str = "") -> dict[str, Any]:
    """{'a': {'b': 1}} -> {'a.b': 1}; used to diff configs."""
    if isinstance(tree, dict):
        out: dict[str, Any] = {}
        for k, v in tree.items():
            out.update(flatten(v, f"{prefix}.{k}" if prefix else str(k)))
        return out
    return {prefix: tree}
