"""Plain dataclass configs: built from dicts with clear errors, saved as JSON beside the weights."""

from __future__ import annotations

import dataclasses
import difflib
import types
import typing
from typing import Any, TypeVar

from .errors import SparsecodeError

T = TypeVar("T")


def from_dict(cls: type[T], data: dict[str, Any], what: str) -> T:
    """Build dataclass `cls` from `data`, naming any unknown key and the closest known one."""
    if not isinstance(data, dict):
        raise SparsecodeError(f"{what} config must be a JSON object of options, got {type(data).__name__}")
    names = {f.name for f in dataclasses.fields(cls)}
    hints = typing.get_type_hints(cls)
    data = dict(data)
    for old, (new, values) in getattr(cls, "legacy", {}).items():  # renamed (new None: dropped) since saved
        if old in data and (new is None or new not in data) and data[old] in values:
            value = values[data.pop(old)]
            if new is not None:
                data[new] = value
    for key in data:
        if key not in names:
            near = difflib.get_close_matches(key, names, n=1)
            hint = f" (did you mean {near[0]!r}?)" if near else f"; known: {', '.join(sorted(names))}"
            raise SparsecodeError(f"unknown {what} option {key!r}{hint}")
        ok, data[key] = _conform(data[key], hints[key])
        if not ok:
            raise SparsecodeError(f"{what} option {key!r} must be {_type_name(hints[key])}, got {data[key]!r}")
    derived = {f.name for f in dataclasses.fields(cls) if not f.init}  # set from other options (fsq: m)
    try:
        obj = cls(**{k: v for k, v in data.items() if k not in derived})
    except TypeError as e:  # a required field is missing
        raise SparsecodeError(f"{what} config: {e}") from None
    for key in derived & set(data):  # as saved beside the weights: it must agree with what it derives from
        if data[key] != getattr(obj, key):
            raise SparsecodeError(f"{what} option {key!r} follows from the others ({key}={getattr(obj, key)}), "
                                  f"got {key}={data[key]!r}")
    validate = getattr(obj, "validate", None)
    if validate is not None:
        validate()
    return obj


def _conform(value: Any, hint: Any) -> tuple[bool, Any]:
    """(whether `value` fits type `hint`, the value with integral floats made ints and lists made tuples)."""
    origin, args = typing.get_origin(hint), typing.get_args(hint)
    if hint is Any:
        return True, value
    if isinstance(hint, types.UnionType) or origin is typing.Union:
        for option in args:
            ok, out = _conform(value, option)
            if ok:
                return True, out
        return False, value
    if hint is type(None):
        return value is None, value
    if hint is bool:
        return isinstance(value, bool), value
    if hint is int:
        if isinstance(value, float) and value.is_integer():
            return True, int(value)
        return isinstance(value, int) and not isinstance(value, bool), value
    if hint is float:
        return isinstance(value, (int, float)) and not isinstance(value, bool), value
    if hint is str:
        return isinstance(value, str), value
    if origin in (list, tuple):
        if not isinstance(value, (list, tuple)):
            return False, value
        items = args[:1] * len(value) if origin is list or (len(args) == 2 and args[1] is Ellipsis) else args
        if len(items) != len(value):
            return False, value
        parts = [_conform(v, t) for v, t in zip(value, items, strict=True)]
        out = [v for _, v in parts]
        return all(ok for ok, _ in parts), tuple(out) if origin is tuple else out
    if origin is dict or hint is dict:
        return isinstance(value, dict), value
    if dataclasses.is_dataclass(hint):
        return isinstance(value, hint), value
    return True, value


def _type_name(hint: Any) -> str:
    return str(hint).replace("typing.", "") if not isinstance(hint, type) else hint.__name__


def to_dict(obj: Any) -> dict[str, Any]:
    return dataclasses.asdict(obj)


def parse_value(cls: type, key: str, text: str) -> Any:
    """Parse a `key=value` command-line override into the type of field `key` of dataclass `cls`."""
    fields = {f.name: f for f in dataclasses.fields(cls)}
    if key not in fields:
        raise SparsecodeError(f"unknown option {key!r}; known: {', '.join(sorted(fields))}")
    hints = typing.get_type_hints(cls)
    kind = hints[key]
    options = typing.get_args(kind) if isinstance(kind, types.UnionType) else (kind,)
    if text.lower() in ("none", "null") and type(None) in options:
        return None
    for t in options:
        if typing.get_origin(t) is list:  # "8,5,5,5" -> [8, 5, 5, 5]
            (item,) = typing.get_args(t)
            try:
                return [item(part) for part in text.split(",") if part.strip()]
            except ValueError:
                continue
        if t is bool:
            if text.lower() in ("1", "true", "yes", "on"):
                return True
            if text.lower() in ("0", "false", "no", "off"):
                return False
        elif t in (int, float, str):
            try:
                return t(float(text)) if t is int and "e" in text.lower() else t(text)
            except ValueError:
                continue
    raise SparsecodeError(f"option {key}={text!r}: expected {kind}")


def check(cond: bool, message: str) -> None:
    """Raise a SparsecodeError with `message` unless `cond` holds."""
    if not cond:
        raise SparsecodeError(message)


def positive(cfg: Any, *names: str) -> None:
    """Check that each named option of `cfg` is > 0, naming the first that is not."""
    for name in names:
        check(getattr(cfg, name) > 0, f"{name} must be positive, got {getattr(cfg, name)}")


def non_negative(cfg: Any, *names: str) -> None:
    """Check that each named option of `cfg` is >= 0, naming the first that is not."""
    for name in names:
        check(getattr(cfg, name) >= 0, f"{name} must be non-negative, got {getattr(cfg, name)}")


def derive_seed(seed: int, tag: str) -> int:
    """An independent seed for each use of a run's seed (model init, data, sampling...)."""
    import zlib

    return (seed * 0x9E3779B1 + zlib.crc32(tag.encode())) % (1 << 63)
