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
    names = {f.name for f in dataclasses.fields(cls)}
    for key in data:
        if key not in names:
            near = difflib.get_close_matches(key, names, n=1)
            hint = f" (did you mean {near[0]!r}?)" if near else f"; known: {', '.join(sorted(names))}"
            raise SparsecodeError(f"unknown {what} option {key!r}{hint}")
    try:
        obj = cls(**data)
    except TypeError as e:  # a required field is missing
        raise SparsecodeError(f"{what} config: {e}") from None
    validate = getattr(obj, "validate", None)
    if validate is not None:
        validate()
    return obj


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


def derive_seed(seed: int, tag: str) -> int:
    """An independent seed for each use of a run's seed (model init, data, sampling...)."""
    import zlib

    return (seed * 0x9E3779B1 + zlib.crc32(tag.encode())) % (1 << 63)
