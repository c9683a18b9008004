"""Typed dataclass configs from YAML files and `key=value` overrides; unknown keys are errors.

    cfg = load_config(RunConfig, "configs/sandbox.yaml", ["rmu.alpha=[100]", "seed=3"])

Nested dataclasses map to nested YAML sections; an override names its path with dots.
Values of overrides are parsed as YAML (`3` is an int, `[5, 6]` a list, `null` None).

Numbers are checked where they enter, in every config alike: a float is finite and not negative
(a weight, rate, radius or temperature; a field that may be negative says so with
`field(metadata={SIGNED: True})`), and an integer key of a name in `INT_MINIMUM` is at least its
minimum (a key means the same in every config: `limit` in eval, audit, chat and run).
"""

from __future__ import annotations

import copy
import dataclasses
import difflib
import math
import re
import types
import typing
from pathlib import Path
from typing import Any, Iterable, TypeVar

import yaml

from wmdp.errors import WmdpError
from wmdp.io import read_text

T = TypeVar("T")
OPEN = "any key"  # a schema entry whose keys are free (a NAME: PATH mapping, chat settings)
SIGNED = "signed"  # field metadata: this float field may be negative
MAX_YAML_VALUES = 100_000  # values a YAML document may expand to through its aliases

# Integer keys with a lower bound wherever they appear: `limit` (first N questions; 0 would
# silently mean all), RMU's `frozen_forget_every` (steps between frozen passes; 0: never).
INT_MINIMUM = {"limit": 1, "frozen_forget_every": 0}


class _Loader(yaml.SafeLoader):
    """YAML with YAML 1.2's numbers: `1e-4` is a float (PyYAML's 1.1 rules read a string), and
    no key twice in one mapping (PyYAML keeps the last silently)."""

    def construct_mapping(self, node: yaml.MappingNode, deep: bool = False) -> dict:
        seen = set()
        for key_node, _ in node.value:
            if key_node.tag == "tag:yaml.org,2002:merge":  # `<<: *base` then overrides: allowed
                continue
            key = self.construct_object(key_node, deep=True)
            if isinstance(key, (str, int, float, bool)) and key in seen:
                raise yaml.constructor.ConstructorError(
                    None, None, f"key {key!r} is given twice in one mapping", key_node.start_mark)
            seen.add(key)
        return super().construct_mapping(node, deep)


_Loader.add_implicit_resolver(
    "tag:yaml.org,2002:float",
    re.compile(r"""^(?:[-+]?(?:[0-9][0-9_]*)\.[0-9_]*(?:[eE][-+]?[0-9]+)?
    |[-+]?(?:[0-9][0-9_]*)(?:[eE][-+]?[0-9]+)
    |\.[0-9_]+(?:[eE][-+][0-9]+)?
    |[-+]?\.(?:inf|Inf|INF)
    |\.(?:nan|NaN|NAN))$""", re.X),
    list("-+0123456789."))


def yaml_load(text: str) -> Any:
    """Parse YAML text (safe: no objects), numbers as YAML 1.2 reads them. Aliases may not
    refer to themselves, nor expand the document past MAX_YAML_VALUES values ("billion
    laughs": a few lines of aliases to aliases), which raises yaml.YAMLError."""
    data = yaml.load(text, Loader=_Loader)  # noqa: S506 - _Loader is a SafeLoader
    _check_expansion(data)
    return data


def _check_expansion(data: Any) -> None:
    """Walk `data` as if its shared (aliased) parts were copies, within a budget of values."""
    count = 0
    stack: list[tuple[Any, tuple[int, ...]]] = [(data, ())]  # (value, ids of its containers)
    while stack:
        value, above = stack.pop()
        count += 1
        if count > MAX_YAML_VALUES:
            raise yaml.YAMLError(f"it expands to more than {MAX_YAML_VALUES:,} values through "
                                 "its aliases")
        if isinstance(value, (dict, list)):
            if id(value) in above:
                raise yaml.YAMLError("an alias refers to a node that contains it (recursive)")
            inner = above + (id(value),)
            items = value.values() if isinstance(value, dict) else value
            stack.extend((v, inner) for v in items)


def load_yaml(path: str | Path) -> dict:
    path = Path(path)
    if not path.is_file():
        raise WmdpError(f"{path}: config file not found")
    try:
        data = yaml_load(read_text(path))
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        line = f" line {mark.line + 1}" if mark is not None else ""
        raise WmdpError(f"{path}{line}: invalid YAML ({getattr(e, 'problem', None) or e})") \
            from None
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise WmdpError(f"{path}: expected a mapping of settings at the top level")
    return data


def apply_overrides(data: dict, overrides: list[str]) -> dict:
    """`a.b=value` strings applied onto a nested dict (a copy)."""
    data = copy.deepcopy(data)
    for item in overrides:
        key, sep, raw = item.partition("=")
        if not sep or not key:
            raise WmdpError(f"override {item!r} is not of the form key=value")
        try:
            value = yaml_load(raw) if raw.strip() else ""
        except yaml.YAMLError:
            value = raw  # not YAML: the text itself (a string field takes it as it is)
        node = data
        *parents, leaf = key.split(".")
        for p in parents:
            node = node.setdefault(p, {})
            if not isinstance(node, dict):
                raise WmdpError(f"override {item!r}: {p} is not a section")
        node[leaf] = value
    return data


def key_path(where: str, name: str) -> str:
    """`name` under `where`: a file and its key apart (`run.yaml: eval.tasks`), keys dotted."""
    if where.endswith((".yaml", ".yml", ".json")):
        return f"{where}: {name}"
    return f"{where}.{name}" if where else name


def from_dict(cls: type[T], data: dict, where: str = "config") -> T:
    """Build dataclass `cls` from `data`, checking keys and coercing simple types."""
    if not isinstance(data, dict):
        raise WmdpError(f"{where}: expected a mapping, found {type(data).__name__}")
    hints = typing.get_type_hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls)}  # type: ignore[arg-type]
    unknown = sorted(set(data) - set(fields))
    if unknown:
        raise unknown_name("key", unknown[0], fields, where)
    kwargs = {name: _coerce(hints[name], value, key_path(where, name))
              for name, value in data.items()}
    config = cls(**kwargs)  # its own checks (__post_init__) first: their messages are finer
    for name, value in kwargs.items():
        _check_range(fields[name], value, key_path(where, name))
    return config


def _check_range(f: dataclasses.Field, value: Any, where: str) -> None:
    """The numbers of one field (a number, or a list of them) against the rules above."""
    values = value if isinstance(value, (list, tuple)) else [value]
    for v in values:
        if isinstance(v, float):
            if not math.isfinite(v):
                raise WmdpError(f"{where} is {v}, expected a finite number")
            if v < 0 and not f.metadata.get(SIGNED):
                raise WmdpError(f"{where} is {v}, expected 0 or more")
        elif isinstance(v, int) and not isinstance(v, bool):
            least = INT_MINIMUM.get(f.name)
            if least is not None and v < least:
                raise WmdpError(f"{where} is {v}, expected at least {least}")


def unknown_name(what: str, name: str, known: Iterable[str], where: str = "") -> WmdpError:
    """The one error for a name nobody knows (a key, grid key, method): the closest known name
    first, then all of them, so a typo is fixed from the message alone."""
    known = list(known)
    close = closest(name, known)
    hint = f"did you mean {close!r}? " if close else ""
    return WmdpError(f"{where + ': ' if where else ''}unknown {what} {name!r} "
                     f"({hint}known: {', '.join(known)})")


def closest(name: str, known: list[str]) -> str | None:
    """The known name most like `name`: by the last dotted part first (a typo in `alpah`, or
    the right key in the wrong section, `unlearn.settings.lr`), then by the whole path."""
    def score(candidate: str) -> tuple[float, float]:
        leaf = difflib.SequenceMatcher(None, name.rpartition(".")[2], candidate.rpartition(".")[2])
        return leaf.ratio(), difflib.SequenceMatcher(None, name, candidate).ratio()

    best = max(known, key=score, default=None)
    return best if best is not None and score(best)[0] >= 0.6 else None


def schema(cls: type) -> dict[str, Any]:
    """The keys dataclass `cls` accepts: {field: None (a value) | {nested field: ...} | OPEN}."""
    hints = typing.get_type_hints(cls)
    out: dict[str, Any] = {}
    for f in dataclasses.fields(cls):
        tp = _unwrap(hints[f.name])
        if dataclasses.is_dataclass(tp):
            out[f.name] = schema(tp)  # type: ignore[arg-type]
        else:
            out[f.name] = OPEN if typing.get_origin(tp) is dict else None
    return out


def key_paths(tree: dict[str, Any], prefix: str = "") -> list[str]:
    """Every settable dotted key of a schema (a section's own keys, not the section)."""
    out: list[str] = []
    for key, sub in tree.items():
        if isinstance(sub, dict) and sub:
            out += key_paths(sub, f"{prefix}{key}.")
        else:
            out.append(prefix + key)
    return out


def check_keys(data: dict, tree: dict[str, Any], prefix: str = "", where: str = "") -> None:
    """Every key of nested `data` is in schema `tree`; else the closest known dotted key."""
    for key, value in data.items():
        path = prefix + str(key)
        if key not in tree:
            raise unknown_name("key", path, key_paths(tree, prefix), where)
        if isinstance(tree[key], dict) and isinstance(value, dict):
            check_keys(value, tree[key], path + ".", where)


def load_config(cls: type[T], path: str | Path | None = None,
                overrides: list[str] | None = None, base: dict | None = None) -> T:
    data = dict(base or {})
    where = "config"
    if path is not None:
        data.update(load_yaml(path))
        where = str(path)
    return from_dict(cls, apply_overrides(data, overrides or []), where)


def cli_flags(parser: Any, cls: type, dest_prefix: str = "", skip: tuple[str, ...] = ()) -> None:
    """One `--field-name` flag per field of dataclass `cls`, defaulting to None (= unset).

    Lists are comma-separated (`--layer-ids 5,6,7`); anything nested is given as YAML
    (`--keywords '[[a, b], [c]]'`); booleans take true/false (bare flag: true).
    """
    hints = typing.get_type_hints(cls)
    comments = field_comments(cls)
    for f in dataclasses.fields(cls):
        if f.name in skip:
            continue
        tp = hints[f.name]
        default = f.default if f.default is not dataclasses.MISSING else (
            f.default_factory() if f.default_factory is not dataclasses.MISSING else None)
        text = comments.get(f.name, "").replace("%", "%%")
        kwargs: dict[str, Any] = dict(dest=dest_prefix + f.name, default=None,
                                      help=(f"{text} (default: {default!r})" if default != ""
                                            else f"{text} (required, unless a --preset or "
                                                 "--config gives it)").lstrip())
        if _unwrap(tp) is bool:
            kwargs.update(nargs="?", const=True, type=_parse_bool, metavar="true|false")
        else:
            kwargs.update(type=_flag_parser(tp), metavar=f.name.upper())
        parser.add_argument("--" + f.name.replace("_", "-"), **kwargs)


def field_comments(cls: type) -> dict[str, str]:
    """The `# comment` after each field in the dataclass's source: the help text of its flag."""
    import inspect

    out: dict[str, str] = {}
    for klass in reversed(cls.__mro__):  # a subclass's comment wins (ModelSpec's fields)
        if not dataclasses.is_dataclass(klass):
            continue
        try:
            source = inspect.getsource(klass)
        except (OSError, TypeError):
            continue
        out.update({m.group(1): m.group(2).strip() for m in
                    re.finditer(r"^\s+(\w+):[^\n#]*#\s*(.+)$", source, re.MULTILINE)})
    return out


def _unwrap(tp: Any) -> Any:
    args = [a for a in typing.get_args(tp) if a is not type(None)]
    if typing.get_origin(tp) in (typing.Union, types.UnionType) and len(args) == 1:
        return args[0]
    return tp


def _parse_bool(value: str) -> bool:
    v = str(value).strip().lower()
    if v in ("1", "true", "yes", "on"):
        return True
    if v in ("0", "false", "no", "off"):
        return False
    raise ValueError(f"expected true or false, got {value!r}")


def _flag_parser(tp: Any):
    tp = _unwrap(tp)
    origin, args = typing.get_origin(tp), typing.get_args(tp)
    if tp in (int, float, str):
        return tp
    if origin in (list, tuple) and args and args[0] in (int, float, str):
        inner = args[0]

        def parse_list(value: str) -> list:
            return [inner(x.strip()) for x in value.split(",") if x.strip()]

        parse_list.__name__ = f"comma-separated {inner.__name__}"  # argparse's error text
        return parse_list

    def parse_yaml(value: str) -> Any:
        return yaml_load(value)

    parse_yaml.__name__ = "YAML"
    return parse_yaml


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
