"""Pointwise losses (``mse``, ``mae``, ``huber``) on plain tensors.

NaN target entries, and entries whose mask is zero, are ignored by arithmetic masking:
their difference is set to zero and they are left out of the count. Nothing here reads
tensor values on the host, so the functions make no host-device synchronisation and
compile with ``torch.compile(fullgraph=True)``.

>>> prediction = torch.tensor([1.0, 2.0, 3.0])
>>> target = torch.tensor([1.5, float("nan"), 1.0])
>>> pointwise_loss(prediction, target, kind="mse")
tensor(2.1250)
"""

from __future__ import annotations

import torch

__all__ = [
    "POINTWISE_KINDS",
    "pointwise_elementwise",
    "pointwise_loss",
    "pointwise_sum_and_count",
    "reduce_total",
]

POINTWISE_KINDS = ("mse", "mae", "huber")


def pointwise_elementwise(difference: torch.Tensor, kind: str, delta: float = 1.0) -> torch.Tensor:
    """Per-entry loss of ``difference = prediction - target``.

    ``mse``: ``d**2``; ``mae``: ``|d|``; ``huber``: ``d**2 / 2`` where ``|d| < delta``,
    else ``delta * (|d| - delta / 2)`` (torch's ``MSELoss``/``L1Loss``/``HuberLoss``).
    """
    if kind == "mse":
        return difference * difference
    if kind == "mae":
        return difference.abs()
    if kind == "huber":
        magnitude = difference.abs()
        return torch.where(
            magnitude < delta, 0.5 * magnitude * magnitude, delta * (magnitude - 0.5 * delta)
        )
    raise ValueError(f"unknown pointwise loss kind {kind!r}; expected one of {POINTWISE_KINDS}")


def pointwise_sum_and_count(
    prediction: torch.Tensor,
    target: torch.Tensor,
    mask: torch.Tensor | None = None,
    *,
    kind: str = "mse",
    delta: float = 1.0,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Sum of the per-entry losses over the entries that count, and their number.

    An entry counts when its target is not NaN and (if ``mask`` is given) its mask is
    nonzero; the others contribute exactly zero, with a zero gradient, whatever the
    prediction there. All three tensors have the same shape. The count is an ``int64``
    tensor; when nothing counts the sum is an exact zero that keeps the autograd path.
    """
    ignored = torch.isnan(target)
    if mask is not None:
        ignored = ignored | (mask == 0)
    difference = (prediction - target).masked_fill(ignored, 0.0)
    total = pointwise_elementwise(difference, kind, delta).sum()
    return total, ignored.logical_not().sum()


def pointwise_loss(
    prediction: torch.Tensor,
    target: torch.Tensor,
    mask: torch.Tensor | None = None,
    *,
    kind: str = "mse",
    delta: float = 1.0,
    reduction: str = "mean",
) -> torch.Tensor:
    """``mean`` (sum / count, 0 when nothing counts) or ``sum`` of the pointwise loss."""
    total, count = pointwise_sum_and_count(prediction, target, mask, kind=kind, delta=delta)
    return reduce_total(total, count, reduction)


def reduce_total(total: torch.Tensor, count: torch.Tensor, reduction: str) -> torch.Tensor:
    """``sum`` -> ``total``; ``mean`` -> ``total / count``, an exact 0 when ``count == 0``.

    The zero keeps ``total``'s autograd path (``total`` is then a sum of zeros).
    """
    if reduction == "sum":
        return total
    if reduction == "mean":
        return total / count.clamp(min=1)
    raise ValueError(f"reduction must be 'mean' or 'sum' here, got {reduction!r}")
