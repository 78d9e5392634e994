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
    "WEIGHTING_KEYS",
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


def _extra_data_name(value: Any) -> str:
    if not isinstance(value, str) or not value.strip():
        raise ValueError("the name of an extra_data entry (a non-empty string)")
    return value.strip()


def _atomic_number(key: Any) -> int:
    """An atomic number given as an integer, an integer string or an element symbol."""
    if isinstance(key, bool):
        raise ValueError(key)
    if isinstance(key, int):
        number = key
    elif isinstance(key, float) and key.is_integer():
        number = int(key)
    elif isinstance(key, str) and key.strip().lstrip("+").isdigit():
        number = int(key.strip())
    elif isinstance(key, str):
        from ase.data import atomic_numbers  # an element symbol (Cu, Au, ...)

        if key.strip() not in atomic_numbers:
            raise ValueError(key)
        number = atomic_numbers[key.strip()]
    else:
        raise ValueError(key)
    if number < 0:
        raise ValueError(key)
    return number


def _type_weights(value: Any) -> dict[int, float]:
    expected = (
        "a mapping of atomic type (atomic number or element symbol) -> non-negative "
        "weight, e.g. {29: 1.0, 79: 2.0}"
    )
    if not isinstance(value, Mapping):
        raise ValueError(expected)
    weights: dict[int, float] = {}
    for key, weight in value.items():
        try:
            number = _atomic_number(key)
        except ValueError:
            raise ValueError(f"{expected} (bad atomic type {key!r})") from None
        if number in weights:
            raise ValueError(f"{expected} (atomic type {number} given twice)")
        try:
            weights[number] = _non_negative_float(weight)
        except ValueError:
            raise ValueError(f"{expected} (bad weight {weight!r} of type {key!r})") from None
    return dict(sorted(weights.items()))


PARAM_KINDS: dict[str, Callable[[Any], Any]] = {
    "float": _number,
    "positive_float": _positive_float,
    "non_negative_float": _non_negative_float,
    "non_negative_int": _non_negative_int,
    "optional_float_list": _optional_float_list,
    "extra_data_name": _extra_data_name,
    "type_weights": _type_weights,
}
"""Converters for loss parameters; each raises ``ValueError(<what was expected>)``."""

WEIGHTING_KEYS: dict[str, str] = {
    "sample_weights": "extra_data_name",
    "type_weights": "type_weights",
}
"""Term keys that weight a term's entries (name -> kind in :data:`PARAM_KINDS`): a loss
type accepts those listed in its ``weighting``. Unlike parameters they have no default:
they are in a term's expanded config only when given (``null`` is not given)."""


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
    weighting: tuple[str, ...] = ()


_LOSS_TYPES: dict[str, LossType] = {}


def register_loss_type(
    name: str,
    *,
    params: Mapping[str, Param] | None = None,
    reductions: Sequence[str] = ("mean", "sum"),
    supports_gradients: bool = True,
    weighting: Sequence[str] = (),
) -> Callable[[Callable[..., Any]], Callable[..., Any]]:
    """Class/function decorator registering a loss type under ``name``.

    The factory is called as ``factory(name=..., gradient=..., weight=...,
    reduction=..., **params)`` with every parameter of ``params`` filled in, plus the
    keys of ``weighting`` (a subset of :data:`WEIGHTING_KEYS`: ``sample_weights``,
    ``type_weights``) that a config gives; a type lists them only when its terms apply
    them (:class:`pl_mtt.losses.LossTerm` does, for the subclasses that read
    :attr:`~pl_mtt.losses.LossTerm.weighting`).
    """
    if not isinstance(name, str) or not name:
        raise ValueError(f"a loss type name must be a non-empty string, got {name!r}")
    if name in _LOSS_TYPES:
        raise ValueError(f"loss type '{name}' is already registered")
    reserved_names = ("type", "weight", "reduction", "gradients", "forces", "stress", "virial")
    for reserved in (*reserved_names, *WEIGHTING_KEYS):
        if params and reserved in params:
            raise ValueError(f"loss type '{name}': parameter name '{reserved}' is reserved")
    unknown = [key for key in weighting if key not in WEIGHTING_KEYS]
    if unknown:
        raise ValueError(
            f"loss type '{name}': unknown weighting {unknown}; valid: {list(WEIGHTING_KEYS)}"
        )

    def decorator(factory: Callable[..., Any]) -> Callable[..., Any]:
        _LOSS_TYPES[name] = LossType(
            name=name,
            factory=factory,
            params=dict(params or {}),
            reductions=tuple(reductions),
            supports_gradients=supports_gradients,
            weighting=tuple(weighting),
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
