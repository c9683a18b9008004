"""Typed dataclass configs from YAML files and `key=value` overrides; unknown keys are errors.

    cfg = load_config(RunConfig, "configs/sandbox.yaml", ["rmu.alpha=[100]", "seed=3"])

Nested dataclasses map to nested YAML sections; an override names its path with dots.
Values of overrides are parsed as YAML (`3` is an int, `[5, 6]` a list, `null` None).
"""

from __future__ import annotations

import dataclasses
import types
import typing
from pathlib import Path
from typing import Any, TypeVar

import yaml

from wmdp.errors import WmdpError

T = TypeVar("T")


def load_yaml(path: str | Path) -> dict:
    path = Path(path)
    if not path.is_file():
        raise WmdpError(f"{path}: config file not found")
    try:
        data = yaml.safe_load(path.read_text(encoding="utf-8"))
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        line = f" line {mark.line + 1}" if mark is not None else ""
        raise WmdpError(f"{path}{line}: invalid YAML ({getattr(e, 'problem', e)})") from None
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise WmdpError(f"{path}: expected a mapping of settings at the top level")
    return data


def apply_overrides(data: dict, overrides: list[str]) -> dict:
    """`a.b=value` strings applied onto a nested dict (a copy)."""
    import copy

    data = copy.deepcopy(data)
    for item in overrides:
        key, sep, raw = item.partition("=")
        if not sep or not key:
            raise WmdpError(f"override {item!r} is not of the form key=value")
        try:
            value = yaml.safe_load(raw) if raw.strip() else ""
        except yaml.YAMLError:
            value = raw
        node = data
        *parents, leaf = key.split(".")
        for p in parents:
            node = node.setdefault(p, {})
            if not isinstance(node, dict):
                raise WmdpError(f"override {item!r}: {p} is not a section")
        node[leaf] = value
    return data


def from_dict(cls: type[T], data: dict, where: str = "config") -> T:
    """Build dataclass `cls` from `data`, checking keys and coercing simple types."""
    if not isinstance(data, dict):
        raise WmdpError(f"{where}: expected a mapping, found {type(data).__name__}")
    hints = typing.get_type_hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls)}  # type: ignore[arg-type]
    unknown = sorted(set(data) - set(fields))
    if unknown:
        raise WmdpError(f"{where}: unknown key {unknown[0]!r} (known: {', '.join(fields)})")
    kwargs = {name: _coerce(hints[name], value, f"{where}.{name}") for name, value in data.items()}
    return cls(**kwargs)


def load_config(cls: type[T], path: str | Path | None = None,
                overrides: list[str] | None = None, base: dict | None = None) -> T:
    data = dict(base or {})
    where = "config"
    if path is not None:
        data.update(load_yaml(path))
        where = str(path)
    return from_dict(cls, apply_overrides(data, overrides or []), where)


def to_dict(obj: Any) -> Any:
    """A dataclass config back to plain YAML/JSON-ready data."""
    if dataclasses.is_dataclass(obj):
        return {f.name: to_dict(getattr(obj, f.name)) for f in dataclasses.fields(obj)}
    if isinstance(obj, (list, tuple)):
        return [to_dict(x) for x in obj]
    if isinstance(obj, dict):
        return {k: to_dict(v) for k, v in obj.items()}
    if isinstance(obj, Path):
        return str(obj)
    return obj


def _coerce(tp: Any, value: Any, where: str) -> Any:
    origin = typing.get_origin(tp)
    args = typing.get_args(tp)
    if tp is Any:
        return value
    if origin in (typing.Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        errors = []
        for arg in args:
            if arg is type(None):
                continue
            try:
                return _coerce(arg, value, where)
            except WmdpError as e:
                errors.append(str(e))
        raise WmdpError(errors[0] if errors else f"{where}: bad value {value!r}")
    if dataclasses.is_dataclass(tp):
        return from_dict(tp, value, where)
    if origin in (list, tuple):
        if not isinstance(value, (list, tuple)):
            value = [value]  # a scalar where a list is expected: a list of one
        inner = args[0] if args else Any
        out = [_coerce(inner, v, where) for v in value]
        return tuple(out) if origin is tuple else out
    if origin is dict:
        if not isinstance(value, dict):
            raise WmdpError(f"{where}: expected a mapping, found {value!r}")
        return dict(value)
    if tp is bool:
        if isinstance(value, bool):
            return value
        raise WmdpError(f"{where}: expected true or false, found {value!r}")
    if tp is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
        raise WmdpError(f"{where}: expected an integer, found {value!r}")
    if tp is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
        raise WmdpError(f"{where}: expected a number, found {value!r}")
    if tp is str:
        if isinstance(value, (str, int, float)) and not isinstance(value, bool):
            return str(value)
        raise WmdpError(f"{where}: expected a string, found {value!r}")
    if tp is Path:
        return Path(value)
    return value
