"""The registry of loss types: name -> factory, parameters with defaults, reductions.

This module sits at the bottom of the package and imports nothing of it:
:mod:`pl_mtt.config` validates loss configurations against it, and the loss families
register themselves when :mod:`pl_mtt.losses` is imported (``import pl_mtt`` does). A
user-defined loss type registered here validates and expands from YAML exactly like a built-in one:

.. code-block:: python

    from pl_mtt.registry import Param, register_loss_type

    @register_loss_type("log_cosh", params={"scale": Param(1.0, "positive_float")})
    class LogCosh(PointwiseLoss): ...

.. code-block:: yaml

    loss:
      energy:
        type: log_cosh
        scale: 0.5
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

__all__ = [
    "REQUIRED",
    "LossType",
    "Param",
    "get_loss_type",
    "loss_type_names",
    "register_loss_type",
]


class _Required:
    def __repr__(self) -> str:
        return "REQUIRED"


REQUIRED: Any = _Required()
"""Marker for a loss parameter that has no default."""


def _number(value: Any) -> float:
    """A real number; numeric strings such as ``"1e-4"`` are accepted (YAML 1.1)."""
    if isinstance(value, bool):
        raise ValueError("a number")
    if isinstance(value, str):
        try:
            value = float(value.strip())
        except ValueError:
            raise ValueError("a number") from None
    if not isinstance(value, (int, float)) or not math.isfinite(value):
        raise ValueError("a finite number")
    return float(value)


def _positive_float(value: Any) -> float:
    number = _number(value)
    if number <= 0:
        raise ValueError("a positive number")
    return number


def _non_negative_float(value: Any) -> float:
    number = _number(value)
    if number < 0:
        raise ValueError("a non-negative number")
    return number


def _non_negative_int(value: Any) -> int:
    number = _number(value)
    if number < 0 or number != int(number):
        raise ValueError("a non-negative integer")
    return int(number)


def _optional_float_list(value: Any) -> list[float] | None:
    if value is None:
        return None
    if isinstance(value, (str, bytes, Mapping)) or not isinstance(value, Sequence):
        raise ValueError("null or a list of numbers")
    try:
        return [_number(v) for v in value]
    except ValueError:
        raise ValueError("null or a list of numbers") from None


PARAM_KINDS: dict[str, Callable[[Any], Any]] = {
    "float": _number,
    "positive_float": _positive_float,
    "non_negative_float": _non_negative_float,
    "non_negative_int": _non_negative_int,
    "optional_float_list": _optional_float_list,
}
"""Converters for loss parameters; each raises ``ValueError(<what was expected>)``."""


@dataclass(frozen=True)
class Param:
    """A type-specific loss parameter: its default and how a config value is converted.

    ``kind`` is a key of :data:`PARAM_KINDS` or a callable that converts a raw config
    value and raises ``ValueError("<what was expected>")`` when it cannot.
    """

    default: Any = REQUIRED
    kind: str | Callable[[Any], Any] = "float"

    def convert(self, value: Any) -> Any:
        converter = PARAM_KINDS[self.kind] if isinstance(self.kind, str) else self.kind
        return converter(value)


@dataclass(frozen=True)
class LossType:
    """A registered loss type."""

    name: str
    factory: Callable[..., Any]
    params: Mapping[str, Param] = field(default_factory=dict)
    reductions: tuple[str, ...] = ("mean", "sum")
    supports_gradients: bool = True


_LOSS_TYPES: dict[str, LossType] = {}


def register_loss_type(
    name: str,
    *,
    params: Mapping[str, Param] | None = None,
    reductions: Sequence[str] = ("mean", "sum"),
    supports_gradients: bool = True,
) -> Callable[[Callable[..., Any]], Callable[..., Any]]:
    """Class/function decorator registering a loss type under ``name``.

    The factory is called as ``factory(name=..., gradient=..., weight=...,
    reduction=..., **params)`` with every parameter of ``params`` filled in.
    """
    if not isinstance(name, str) or not name:
        raise ValueError(f"a loss type name must be a non-empty string, got {name!r}")
    if name in _LOSS_TYPES:
        raise ValueError(f"loss type '{name}' is already registered")
    for reserved in ("type", "weight", "reduction", "gradients", "forces", "stress", "virial"):
        if params and reserved in params:
            raise ValueError(f"loss type '{name}': parameter name '{reserved}' is reserved")

    def decorator(factory: Callable[..., Any]) -> Callable[..., Any]:
        _LOSS_TYPES[name] = LossType(
            name=name,
            factory=factory,
            params=dict(params or {}),
            reductions=tuple(reductions),
            supports_gradients=supports_gradients,
        )
        return factory

    return decorator


def unregister_loss_type(name: str) -> None:
    """Remove a registered loss type (mostly for tests)."""
    _LOSS_TYPES.pop(name, None)


def get_loss_type(name: str) -> LossType:
    """The registered loss type ``name``; ``KeyError`` if there is none."""
    return _LOSS_TYPES[name]


def loss_type_names() -> list[str]:
    """Names of all registered loss types, sorted."""
    return sorted(_LOSS_TYPES)
