"""Strict checks of plain config values against type annotations (no coercion).

The same rules as metatrain's option validation (pydantic in strict mode), written for
pl_mtt: ``bool`` is not an ``int``, an ``int`` is a valid ``float``, a string is never a
number, lists are lists, mapping keys are not converted. Supported annotations:
``Any``, ``bool``, ``int``, ``float``, ``str``, ``None``, ``Literal``, unions
(``X | Y``, ``Optional``), ``list[T]``, ``dict[K, V]``, ``TypedDict`` classes (unknown
keys are errors with a suggestion unless the class allows extra keys, as pydantic's
``extra="allow"``; missing keys are not checked here), ``Annotated``
with ``annotated_types`` bounds (``Ge``, ``Gt``, ``Le``, ``Lt``, ``Interval``) and
``NotRequired``/``Required`` wrappers.

.. code-block:: python

    check_value({"lr": "1e-3"}, dict[str, float], "training")
    # ValueError: training.lr: expected a number, got '1e-3' (str)
"""

from __future__ import annotations

import operator
import types
import typing
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from pl_mtt.config import check_known_keys

__all__ = ["Bound", "check_required", "check_value", "describe", "typed_dict_fields"]

_WRAPPERS = ("NotRequired", "Required", "ReadOnly")


@dataclass(frozen=True)
class Bound:
    """Bounds of a number, for ``Annotated[int, Bound(ge=0)]`` (like annotated_types)."""

    ge: float | None = None
    gt: float | None = None
    le: float | None = None
    lt: float | None = None


def check_required(mapping: Mapping[str, Any], keys: Sequence[str], path: str) -> None:
    """Raise a ``ValueError`` naming ``<path>.<key>`` for the first missing key."""
    for key in keys:
        if key not in mapping:
            raise ValueError(f"{path}.{key}: missing (required)")


def _origin_name(annotation: Any) -> str:
    origin = typing.get_origin(annotation)
    return getattr(origin, "_name", None) or getattr(origin, "__name__", "") if origin else ""


def _unwrap(annotation: Any) -> Any:
    while _origin_name(annotation) in _WRAPPERS:
        annotation = typing.get_args(annotation)[0]
    return annotation


def _is_typed_dict(annotation: Any) -> bool:
    """A ``TypedDict`` class, from ``typing`` or ``typing_extensions``."""
    return (
        isinstance(annotation, type)
        and issubclass(annotation, dict)
        and hasattr(annotation, "__total__")
        and hasattr(annotation, "__annotations__")
    )


def typed_dict_fields(cls: type) -> dict[str, Any]:
    """``field -> annotation`` of a ``TypedDict`` class (``NotRequired`` removed)."""
    try:
        hints = typing.get_type_hints(cls, include_extras=True)
    except Exception:  # unresolved forward references: fall back to the raw annotations
        hints = dict(getattr(cls, "__annotations__", {}))
    return {name: _unwrap(hint) for name, hint in hints.items()}


def _is_union(annotation: Any) -> bool:
    origin = typing.get_origin(annotation)
    return origin is typing.Union or origin is types.UnionType


def describe(annotation: Any) -> str:
    """A short human description of ``annotation`` (for error messages)."""
    annotation = _unwrap(annotation)
    if annotation is Any:
        return "anything"
    if annotation in (None, type(None)):
        return "null"
    if annotation is bool:
        return "true or false"
    if annotation is int:
        return "an integer"
    if annotation is float:
        return "a number"
    if annotation is str:
        return "a string"
    if _is_typed_dict(annotation):
        return f"a mapping ({', '.join(typed_dict_fields(annotation))})"
    origin = typing.get_origin(annotation)
    args = typing.get_args(annotation)
    if origin is typing.Annotated:
        bounds = [_bound_text(meta) for meta in args[1:]]
        return " ".join([describe(args[0]), *[b for b in bounds if b]])
    if origin is typing.Literal:
        return "one of " + ", ".join(repr(a) for a in args)
    if _is_union(annotation):
        return " or ".join(describe(a) for a in args)
    if origin in (list, typing.List):  # noqa: UP006
        return f"a list of {describe(args[0])}" if args else "a list"
    if origin in (dict, typing.Dict, Mapping):  # noqa: UP006
        return f"a mapping to {describe(args[1])}" if args else "a mapping"
    if annotation in (list, dict):
        return f"a {annotation.__name__}"
    return getattr(annotation, "__name__", str(annotation))


# bound attribute (of Bound and annotated_types) -> its symbol and test
_BOUNDS = (
    ("ge", ">=", operator.ge),
    ("gt", ">", operator.gt),
    ("le", "<=", operator.le),
    ("lt", "<", operator.lt),
)


def _bound_text(meta: Any) -> str:
    parts = []
    for attribute, symbol, _ in _BOUNDS:
        value = getattr(meta, attribute, None)
        if value is not None:
            parts.append(f"{symbol} {value}")
    return ", ".join(parts)


# strict checks of plain types: bool is not a number, an int is a valid float
_PLAIN = {
    type(None): lambda v: v is None,
    bool: lambda v: isinstance(v, bool),
    int: lambda v: isinstance(v, int) and not isinstance(v, bool),
    float: lambda v: isinstance(v, (int, float)) and not isinstance(v, bool),
    str: lambda v: isinstance(v, str),
    list: lambda v: isinstance(v, list),
    dict: lambda v: isinstance(v, Mapping),
}


def _fail(path: str, annotation: Any, value: Any) -> ValueError:
    return ValueError(
        f"{path}: expected {describe(annotation)}, got {value!r} ({type(value).__name__})"
    )


def check_value(value: Any, annotation: Any, path: str) -> None:
    """Raise a ``ValueError`` naming ``path`` if ``value`` does not have type ``annotation``."""
    annotation = _unwrap(annotation)
    if annotation is Any:
        return
    if annotation is None:
        annotation = type(None)
    if annotation in _PLAIN:
        if not _PLAIN[annotation](value):
            raise _fail(path, annotation, value)
        return
    if _is_typed_dict(annotation):
        _check_typed_dict(value, annotation, path)
        return
    origin = typing.get_origin(annotation)
    args = typing.get_args(annotation)
    if origin is typing.Annotated:
        check_value(value, args[0], path)
        for meta in args[1:]:
            _check_bounds(value, meta, annotation, path)
        return
    if origin is typing.Literal:
        if not any(value == a and type(value) is type(a) for a in args) and not (
            isinstance(value, (int, float)) and not isinstance(value, bool) and value in args
        ):
            raise _fail(path, annotation, value)
        return
    if _is_union(annotation):
        _check_union(value, args, annotation, path)
        return
    if origin in (list, typing.List):  # noqa: UP006
        if not isinstance(value, list):
            raise _fail(path, annotation, value)
        for index, item in enumerate(value):
            check_value(item, args[0] if args else Any, f"{path}.{index}")
        return
    if origin in (dict, typing.Dict, Mapping):  # noqa: UP006
        if not isinstance(value, Mapping):
            raise _fail(path, annotation, value)
        key_type, value_type = args if args else (Any, Any)
        for key, item in value.items():
            check_value(key, key_type, f"{path} (key {key!r})")
            check_value(item, value_type, f"{path}.{key}")
        return
    raise TypeError(f"{path}: cannot check values against the annotation {annotation!r}")


def _check_typed_dict(value: Any, cls: type, path: str) -> None:
    if not isinstance(value, Mapping):
        raise _fail(path, cls, value)
    fields = typed_dict_fields(cls)
    # a class that declares extra keys allowed (pydantic's extra="allow") takes any key
    if (getattr(cls, "__pydantic_config__", None) or {}).get("extra") != "allow":
        check_known_keys(value, list(fields), path, "option")
    for key, item in value.items():
        if key in fields:
            check_value(item, fields[key], f"{path}.{key}")


def _check_bounds(value: Any, meta: Any, annotation: Any, path: str) -> None:
    for attribute, _, holds in _BOUNDS:
        bound = getattr(meta, attribute, None)
        if bound is not None and not holds(value, bound):
            raise _fail(path, annotation, value)


def _check_union(value: Any, args: tuple, annotation: Any, path: str) -> None:
    errors = []
    for arg in args:
        try:
            check_value(value, arg, path)
            return
        except ValueError as error:
            errors.append((arg, error))
    # a mapping checked against exactly one mapping-shaped branch: that branch's error
    # (an unknown key with its suggestion) says more than the union's description
    if isinstance(value, Mapping):
        mapping_errors = [e for a, e in errors if _accepts_mappings(a)]
        if len(mapping_errors) == 1:
            raise mapping_errors[0]
    raise _fail(path, annotation, value)


def _accepts_mappings(annotation: Any) -> bool:
    annotation = _unwrap(annotation)
    origin = typing.get_origin(annotation)
    if origin is typing.Annotated:
        return _accepts_mappings(typing.get_args(annotation)[0])
    return (
        _is_typed_dict(annotation) or annotation is dict or origin in (dict, typing.Dict, Mapping)  # noqa: UP006
    )
