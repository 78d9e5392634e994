"""Pointwise losses (``mse``, ``mae``, ``huber``) on plain tensors.

NaN target entries, and entries whose mask is zero, are ignored by arithmetic masking:
their difference is set to zero and they are left out of the count. Nothing here reads
tensor values on the host, so the functions make no host-device synchronisation and
compile with ``torch.compile(fullgraph=True)``.

>>> prediction = torch.tensor([1.0, 2.0, 3.0])
>>> target = torch.tensor([1.5, float("nan"), 1.0])
>>> pointwise_loss(prediction, target, kind="mse")
tensor(2.1250)

:func:`pointwise_segment_sums` computes several independent (sum, count) pairs in one
call (one per segment, e.g. the energy, force and stress terms of a LossModule) with a
single autograd node: the per-entry code is the same as :func:`pointwise_sum_and_count`.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

__all__ = [
    "POINTWISE_KINDS",
    "count_kept",
    "masked_difference",
    "pointwise_derivatives",
    "pointwise_elementwise",
    "pointwise_loss",
    "pointwise_segment_sums",
    "pointwise_sum_and_count",
    "pointwise_total",
    "reduce_total",
]

POINTWISE_KINDS = ("mse", "mae", "huber")


def _unknown_kind(kind: str) -> ValueError:
    return ValueError(f"unknown pointwise loss kind {kind!r}; expected one of {POINTWISE_KINDS}")


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
    raise _unknown_kind(kind)


def pointwise_derivatives(
    differences: Sequence[torch.Tensor], grads: torch.Tensor, kind: str, delta: float = 1.0
) -> list[torch.Tensor]:
    """``grads[k]`` times the derivative of :func:`pointwise_elementwise` at
    ``differences[k]``, for each k.

    The values autograd gives through :func:`pointwise_elementwise`: ``mse``: ``2 d``;
    ``mae``: ``sign(d)`` (0 at 0); ``huber``: ``d`` where ``|d| < delta``, else
    ``delta * sign(d)``. Each is exactly 0 at ``d = 0`` (ignored entries).
    """
    if kind == "mse":
        return [d * g for d, g in zip(differences, (2.0 * grads).unbind(), strict=True)]
    if kind == "mae":
        return [d.sign().mul_(g) for d, g in zip(differences, grads.unbind(), strict=True)]
    if kind == "huber":
        return [
            torch.where(d.abs() < delta, d, delta * d.sign()).mul_(g)
            for d, g in zip(differences, grads.unbind(), strict=True)
        ]
    raise _unknown_kind(kind)


def masked_difference(
    prediction: torch.Tensor, target: torch.Tensor, mask: torch.Tensor | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """``prediction - target`` with the ignored entries set to 0, and the ignored entries.

    An entry is ignored when its target is NaN or (if ``mask`` is given) its mask is 0;
    its difference is 0 whatever the prediction there (even NaN), with a zero gradient.
    """
    ignored = torch.isnan(target)
    if mask is not None:
        ignored.logical_or_(mask == 0)
    # in place on the fresh difference: cheaper than torch.where with a scalar
    return (prediction - target).masked_fill_(ignored, 0.0), ignored


def count_kept(ignored: torch.Tensor) -> torch.Tensor:
    """Number of entries that count (an ``int64`` tensor) given the ignored ones."""
    return torch.rsub(torch.count_nonzero(ignored), ignored.numel())


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
    difference, ignored = masked_difference(prediction, target, mask)
    return pointwise_total(difference, kind, delta), count_kept(ignored)


def pointwise_total(difference: torch.Tensor, kind: str, delta: float = 1.0) -> torch.Tensor:
    """Sum of :func:`pointwise_elementwise` over all entries (``mse``: one dot product)."""
    if kind == "mse":
        flat = difference.reshape(-1)
        return torch.dot(flat, flat)
    return pointwise_elementwise(difference, kind, delta).sum()


class _SegmentSums(torch.autograd.Function):
    """``pointwise_sum_and_count`` of K segments as one autograd node.

    ``tensors`` holds the K predictions, the K targets, then the K masks (if any). The
    differences saved by the forward give the first derivatives directly; under
    ``create_graph`` the backward recomputes them from the inputs, so that higher
    derivatives are exact too.
    """

    @staticmethod
    def forward(ctx, kind: str, delta: float, n_segments: int, *tensors: torch.Tensor):
        predictions = tensors[:n_segments]
        targets = tensors[n_segments : 2 * n_segments]
        masks = tensors[2 * n_segments :] or (None,) * n_segments
        sums, counts, differences = [], [], []
        for prediction, target, mask in zip(predictions, targets, masks, strict=True):
            difference, ignored = masked_difference(prediction, target, mask)
            differences.append(difference)
            sums.append(pointwise_total(difference, kind, delta))
            counts.append(count_kept(ignored))
        counts_t = torch.stack(counts)
        ctx.mark_non_differentiable(counts_t)
        ctx.save_for_backward(*differences, *tensors)
        ctx.kind, ctx.delta, ctx.n_segments = kind, delta, n_segments
        return torch.stack(sums), counts_t

    @staticmethod
    def backward(ctx, grad_sums: torch.Tensor, _grad_counts: torch.Tensor | None):
        n = ctx.n_segments
        saved = ctx.saved_tensors
        differences, tensors = saved[:n], saved[n:]
        if torch.is_grad_enabled():  # create_graph: differentiable in the inputs
            masks = tensors[2 * n :] or (None,) * n
            differences = [
                masked_difference(p, t, m)[0]
                for p, t, m in zip(tensors[:n], tensors[n : 2 * n], masks, strict=True)
            ]
        grads = pointwise_derivatives(differences, grad_sums, ctx.kind, ctx.delta)
        wants = ctx.needs_input_grad[3:]
        prediction_grads = [g if w else None for g, w in zip(grads, wants[:n], strict=True)]
        target_grads = [-g if w else None for g, w in zip(grads, wants[n : 2 * n], strict=True)]
        mask_grads = [None] * (len(tensors) - 2 * n)
        return None, None, None, *prediction_grads, *target_grads, *mask_grads


def pointwise_segment_sums(
    predictions: Sequence[torch.Tensor],
    targets: Sequence[torch.Tensor],
    masks: Sequence[torch.Tensor] | None = None,
    *,
    kind: str = "mse",
    delta: float = 1.0,
) -> tuple[torch.Tensor, torch.Tensor]:
    """:func:`pointwise_sum_and_count` of each segment ``(predictions[k], targets[k],
    masks[k])``, as two ``(K,)`` tensors: the sums and the ``int64`` counts.

    Each segment is summed on its own (the sums equal those of
    :func:`pointwise_sum_and_count`), but the K segments make one autograd node, which
    saves most of the per-operation overhead when the segments are small (an energy,
    force and stress term of one batch). Segments may have different shapes; all
    tensors share one dtype and device.
    """
    if kind not in POINTWISE_KINDS:
        raise _unknown_kind(kind)
    n_segments = len(predictions)
    if len(targets) != n_segments or (masks is not None and len(masks) != n_segments):
        raise ValueError(
            f"pointwise_segment_sums: {n_segments} predictions, {len(targets)} targets and "
            f"{'no' if masks is None else len(masks)} masks; expected one of each per segment"
        )
    if n_segments == 0:
        raise ValueError("pointwise_segment_sums needs at least one segment")
    tensors = (*predictions, *targets, *(masks if masks is not None else ()))
    return _SegmentSums.apply(kind, float(delta), n_segments, *tensors)


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
