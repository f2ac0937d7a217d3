"""Frozen config dataclasses back from JSON: the inverse of ``dataclasses.asdict`` that every artifact's
record uses (``config.json`` of a run, the provenance of a cache, ``results.json`` of an ablation).

JSON has no tuples and no classes, so :func:`from_dict` reads each field's annotation: a nested config comes
back as its dataclass, a list as the tuple its field declares. A key the dataclass does not have is refused
by name (a typo in a hand-edited config must not be dropped silently); a missing one takes its default.
The configs' own ``__post_init__`` checks run as they do for any other construction.
"""

from __future__ import annotations

import dataclasses
import sys
import types as _types
import typing
from typing import Any, TypeVar

T = TypeVar("T")


def _hints(cls: type, extra: dict[str, Any] | None) -> dict[str, Any]:
    module = sys.modules.get(cls.__module__)
    try:
        return typing.get_type_hints(cls, vars(module) if module else None, extra)
    except NameError as e:  # a name imported under TYPE_CHECKING only: the caller passes it in ``types``
        raise TypeError(f"{cls.__name__}: cannot resolve a field's type ({e}); pass it in types=") from e


def _convert(tp: Any, value: Any, where: str) -> Any:
    if value is None or tp is Any:
        return value
    origin = typing.get_origin(tp)
    if origin in (typing.Union, _types.UnionType):  # X | None: the first member the value fits
        for arg in typing.get_args(tp):
            if arg is type(None):
                continue
            return _convert(arg, value, where)
        return value
    if dataclasses.is_dataclass(tp) and isinstance(value, dict):
        return from_dict(tp, value, where=where)
    if origin is tuple and isinstance(value, (list, tuple)):
        args = typing.get_args(tp)
        if len(args) == 2 and args[1] is Ellipsis:
            return tuple(_convert(args[0], v, f"{where}[{i}]") for i, v in enumerate(value))
        if args and len(args) != len(value):
            raise ValueError(f"{where}: expected {len(args)} items, got {len(value)}")
        return tuple(_convert(a, v, f"{where}[{i}]") for i, (a, v) in enumerate(zip(args or [Any] * len(value), value)))
    if tp is float and isinstance(value, int) and not isinstance(value, bool):
        return float(value)
    return value


def _parse(tp: Any, text: str, where: str) -> Any:
    origin = typing.get_origin(tp)
    if origin in (typing.Union, _types.UnionType):
        args = [a for a in typing.get_args(tp) if a is not type(None)]
        if text.lower() in ("none", "null") and len(args) < len(typing.get_args(tp)):
            return None
        return _parse(args[0], text, where) if args else text
    if tp is bool:
        if text.lower() in ("1", "true", "yes", "on"):
            return True
        if text.lower() in ("0", "false", "no", "off"):
            return False
        raise ValueError(f"{where}: expected true or false, got {text!r}")
    if tp in (int, float):
        try:
            return tp(text)
        except ValueError:
            raise ValueError(f"{where}: expected {tp.__name__}, got {text!r}") from None
    return text


def from_strings(cls: type[T], data: dict[str, Any], where: str = "") -> T:
    """``cls`` from ``data`` whose values may be command-line strings (``{"factor": "3"}``): each string is
    read as its field's type (int, float, bool, str, or None for an optional field). Unknown keys are
    refused by name, as in :func:`from_dict`."""
    hints = _hints(cls, None)
    names = {f.name for f in dataclasses.fields(cls) if f.init}
    typed = {
        k: _parse(hints.get(k, Any), v, f"{where}.{k}" if where else k) if isinstance(v, str) and k in names else v
        for k, v in data.items()
    }
    return from_dict(cls, typed, where=where)


def from_dict(cls: type[T], data: dict[str, Any], types: dict[str, Any] | None = None, where: str = "") -> T:
    """``cls(**data)`` with nested dataclasses and tuples rebuilt from their JSON forms.

    ``types``: classes that ``cls``'s module imports only for type checking (``{"DataConfig": DataConfig}``).
    ``where``: the dotted path of ``data`` in the document, for error messages.
    """
    if not isinstance(data, dict):
        raise ValueError(f"{where or cls.__name__}: expected an object, got {type(data).__name__}")
    fields = {f.name: f for f in dataclasses.fields(cls) if f.init}
    unknown = sorted(set(data) - set(fields))
    if unknown:
        raise ValueError(
            f"{where or cls.__name__}: unknown field(s) {', '.join(unknown)}; {cls.__name__} has {', '.join(fields)}"
        )
    hints = _hints(cls, types)
    kwargs = {k: _convert(hints.get(k, Any), v, f"{where}.{k}" if where else k) for k, v in data.items()}
    return cls(**kwargs)
