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
:func:`scaled_segment_sums` does the same on raw model outputs and targets in the units
of the data, bringing both to loss units on the way (baseline, scale, division by atoms)
without building the intermediate tensors.

Every function takes optional non-negative per-entry ``weights`` (broadcasting against
the entries): the sum becomes ``sum_i w_i l_i`` and the count ``sum_i w_i`` over the
entries that count. The weighted sum is computed as the unweighted one on scaled
differences (``mse``: ``sqrt(w) d``; ``mae``: ``w d``; ``huber``: ``w l(d)``), so weights
of 1 give bitwise the unweighted values.

>>> pointwise_loss(prediction, target, kind="mse", weight=torch.tensor([1.0, 5.0, 3.0]))
tensor(3.)
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
    "scaled_segment_sums",
    "weight_sum",
    "weighted_counts",
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


def weight_sum(ignored: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """Sum of the weights of the entries that count (``weight`` broadcasts against
    ``ignored``), in the weights' dtype."""
    return torch.where(ignored, _zero(weight), weight).sum()


def pointwise_sum_and_count(
    prediction: torch.Tensor,
    target: torch.Tensor,
    mask: torch.Tensor | None = None,
    *,
    kind: str = "mse",
    delta: float = 1.0,
    weight: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Sum of the per-entry losses over the entries that count, and their number.

    An entry counts when its target is not NaN and (if ``mask`` is given) its mask is
    nonzero; the others contribute exactly zero, with a zero gradient, whatever the
    prediction there. All three tensors have the same shape. The count is an ``int64``
    tensor; when nothing counts the sum is an exact zero that keeps the autograd path.
    With ``weight`` (non-negative, broadcasting against the entries): the weighted sum
    and the sum of the weights of the entries that count.
    """
    difference, ignored = masked_difference(prediction, target, mask)
    if weight is None:
        return pointwise_total(difference, kind, delta), count_kept(ignored)
    return pointwise_total(difference, kind, delta, weight), weight_sum(ignored, weight)


def pointwise_total(
    difference: torch.Tensor, kind: str, delta: float = 1.0, weight: torch.Tensor | None = None
) -> torch.Tensor:
    """Sum of :func:`pointwise_elementwise` over all entries (``mse``: one dot product),
    each times its ``weight`` if given (see the module docstring)."""
    if weight is not None:
        if kind == "huber":
            return (pointwise_elementwise(difference, kind, delta) * weight).sum()
        difference = _weighted_difference(difference, kind, weight)
    if kind == "mse":
        flat = difference.reshape(-1)
        return torch.dot(flat, flat)
    return pointwise_elementwise(difference, kind, delta).sum()


def _weighted_difference(
    difference: torch.Tensor, kind: str, weight: torch.Tensor | None
) -> torch.Tensor:
    """The difference whose plain ``mse``/``mae`` sum is the weighted sum: ``sqrt(w) d``
    (``mse``) and ``w d`` (``mae``); unchanged without a weight or for ``huber``."""
    if weight is None or kind == "huber":
        return difference
    return difference * (weight.sqrt() if kind == "mse" else weight)


def _weighted_grads(grads: list[torch.Tensor], weights: Sequence[torch.Tensor | None]) -> list:
    """``grads[k] x weights[k]`` where a weight is given."""
    return [g if w is None else g * w for g, w in zip(grads, weights, strict=True)]


class _SegmentSums(torch.autograd.Function):
    """``pointwise_sum_and_count`` of K segments as one autograd node.

    ``tensors`` holds the K predictions, the K targets, the K masks (``masked``) and
    the K weights (``weighted``; ``None`` for an unweighted segment). The differences
    saved by the forward give the first derivatives directly; under ``create_graph``
    the backward recomputes them from the inputs, so that higher derivatives are exact
    too. No gradient flows to masks or weights.
    """

    @staticmethod
    def forward(
        ctx, kind: str, delta: float, n_segments: int, masked: bool, weighted: bool, *tensors
    ):
        n = n_segments
        predictions, targets = tensors[:n], tensors[n : 2 * n]
        masks = tensors[2 * n : 3 * n] if masked else (None,) * n
        start = 3 * n if masked else 2 * n
        weights = tensors[start : start + n] if weighted else (None,) * n
        sums, counts, differences = [], [], []
        for prediction, target, mask, weight in zip(
            predictions, targets, masks, weights, strict=True
        ):
            difference, ignored = masked_difference(prediction, target, mask)
            differences.append(difference)
            sums.append(pointwise_total(difference, kind, delta, weight))
            if not weighted:
                counts.append(count_kept(ignored))
            elif weight is None:
                counts.append(count_kept(ignored).to(difference.dtype))
            else:
                counts.append(weight_sum(ignored, weight))
        counts_t = torch.stack(counts)
        ctx.mark_non_differentiable(counts_t)
        ctx.save_for_backward(*differences, *tensors)
        ctx.kind, ctx.delta, ctx.n_segments = kind, delta, n_segments
        ctx.masked, ctx.weighted = masked, weighted
        return torch.stack(sums), counts_t

    @staticmethod
    def backward(ctx, grad_sums: torch.Tensor, _grad_counts: torch.Tensor | None):
        n = ctx.n_segments
        saved = ctx.saved_tensors
        differences, tensors = saved[:n], saved[n:]
        masks = tensors[2 * n : 3 * n] if ctx.masked else (None,) * n
        start = 3 * n if ctx.masked else 2 * n
        weights = tensors[start : start + n] if ctx.weighted else (None,) * n
        if torch.is_grad_enabled():  # create_graph: differentiable in the inputs
            differences = [
                masked_difference(p, t, m)[0]
                for p, t, m in zip(tensors[:n], tensors[n : 2 * n], masks, strict=True)
            ]
        grads = pointwise_derivatives(differences, grad_sums, ctx.kind, ctx.delta)
        if ctx.weighted:
            grads = _weighted_grads(grads, weights)
        wants = ctx.needs_input_grad[5:]
        prediction_grads = [g if w else None for g, w in zip(grads, wants[:n], strict=True)]
        target_grads = [-g if w else None for g, w in zip(grads, wants[n : 2 * n], strict=True)]
        other_grads = [None] * (len(tensors) - 2 * n)
        return None, None, None, None, None, *prediction_grads, *target_grads, *other_grads


def pointwise_segment_sums(
    predictions: Sequence[torch.Tensor],
    targets: Sequence[torch.Tensor],
    masks: Sequence[torch.Tensor] | None = None,
    *,
    kind: str = "mse",
    delta: float = 1.0,
    weights: Sequence[torch.Tensor | None] | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """:func:`pointwise_sum_and_count` of each segment ``(predictions[k], targets[k],
    masks[k], weights[k])``, as two ``(K,)`` tensors: the sums and the ``int64`` counts
    (with ``weights``: the sums of the weights of the entries that count, in the
    predictions' dtype; a ``None`` weight counts entries).

    Each segment is summed on its own (the sums equal those of
    :func:`pointwise_sum_and_count`), but the K segments make one autograd node, which
    saves most of the per-operation overhead when the segments are small (an energy,
    force and stress term of one batch). Segments may have different shapes; all
    tensors share one dtype and device.
    """
    if kind not in POINTWISE_KINDS:
        raise _unknown_kind(kind)
    n_segments = len(predictions)
    if (
        len(targets) != n_segments
        or (masks is not None and len(masks) != n_segments)
        or (weights is not None and len(weights) != n_segments)
    ):
        weights_text = "" if weights is None else f" and {len(weights)} weights"
        raise ValueError(
            f"pointwise_segment_sums: {n_segments} predictions, {len(targets)} targets and "
            f"{'no' if masks is None else len(masks)} masks{weights_text}; expected one of "
            f"each per segment"
        )
    if n_segments == 0:
        raise ValueError("pointwise_segment_sums needs at least one segment")
    weighted = weights is not None and any(w is not None for w in weights)
    tensors = (
        *predictions,
        *targets,
        *(masks if masks is not None else ()),
        *(weights if weighted else ()),
    )
    return _SegmentSums.apply(kind, float(delta), n_segments, masks is not None, weighted, *tensors)


def pointwise_loss(
    prediction: torch.Tensor,
    target: torch.Tensor,
    mask: torch.Tensor | None = None,
    *,
    kind: str = "mse",
    delta: float = 1.0,
    reduction: str = "mean",
    weight: torch.Tensor | None = None,
) -> torch.Tensor:
    """``mean`` (sum / count, 0 when nothing counts) or ``sum`` of the pointwise loss;
    with ``weight``: ``sum_i w_i l_i / sum_i w_i`` or ``sum_i w_i l_i``."""
    total, count = pointwise_sum_and_count(
        prediction, target, mask, kind=kind, delta=delta, weight=weight
    )
    return reduce_total(total, count, reduction)


def reduce_total(total: torch.Tensor, count: torch.Tensor, reduction: str) -> torch.Tensor:
    """``sum`` -> ``total``; ``mean`` -> ``total / count``, an exact 0 when ``count == 0``.

    The zero keeps ``total``'s autograd path (``total`` is then a sum of zeros). A
    floating count (a sum of weights) may be below 1: it is used as it is when positive.
    """
    if reduction == "sum":
        return total
    if reduction == "mean":
        return total / positive_count(count)
    raise ValueError(f"reduction must be 'mean' or 'sum' here, got {reduction!r}")


def positive_count(count: torch.Tensor) -> torch.Tensor:
    """``count`` where positive, else 1 (integer counts: ``clamp(min=1)``, one
    operation; floating ones, sums of weights, may lie between 0 and 1)."""
    if count.is_floating_point():
        return torch.where(count > 0, count, torch.ones_like(count))
    return count.clamp(min=1)


def _segment_totals(
    differences: Sequence[torch.Tensor],
    kinds: Sequence[str],
    deltas: Sequence[float],
    weights: Sequence[torch.Tensor | None] | None = None,
) -> torch.Tensor:
    """``(K,)`` sum of the pointwise loss of each difference (ignored entries are 0),
    each entry times its weight where ``weights[k]`` is given.

    ``mse`` and ``mae`` segments are reduced by one ``_foreach_norm`` call for all of
    them (one kernel launch on GPUs), weighted ones on ``sqrt(w) d`` and ``w d``;
    ``huber`` per segment.
    """
    if weights is not None:
        differences = [
            _weighted_difference(d, k, w)
            for d, k, w in zip(differences, kinds, weights, strict=True)
        ]
    if all(kind == "mse" for kind in kinds):
        return torch.stack(torch._foreach_norm(list(differences), 2)).square()
    if all(kind == "mae" for kind in kinds):
        return torch.stack(torch._foreach_norm(list(differences), 1))
    weights = weights if weights is not None else [None] * len(kinds)
    return torch.stack(
        [
            pointwise_total(difference, kind, delta, weight if kind == "huber" else None)
            for difference, kind, delta, weight in zip(
                differences, kinds, deltas, weights, strict=True
            )
        ]
    )


def _scaled_differences(
    predictions: Sequence[torch.Tensor],
    targets: Sequence[torch.Tensor],
    row_factors: Sequence[torch.Tensor | None],
    shifts: Sequence[torch.Tensor | None],
    inverse_scale: torch.Tensor | None,
) -> list[torch.Tensor]:
    """``(p - (t - shift) x inverse_scale) x row_factor`` per segment, with autograd
    (the backward's recomputation under ``create_graph``)."""
    result = []
    for p, t, f, c in zip(predictions, targets, row_factors, shifts, strict=True):
        loss_target = t if c is None else t - c
        if inverse_scale is not None:
            loss_target = loss_target * inverse_scale
        difference = p - loss_target
        result.append(difference if f is None else difference * f)
    return result


_ZEROS: dict[tuple[torch.dtype, torch.device], torch.Tensor] = {}


def _zero(like: torch.Tensor) -> torch.Tensor:
    """A 0-dim zero of ``like``'s dtype and device, made once (never written to)."""
    key = (like.dtype, like.device)
    zero = _ZEROS.get(key)
    if zero is None:
        zero = _ZEROS[key] = torch.zeros((), dtype=like.dtype, device=like.device)
    return zero


class _ScaledSegmentSums(torch.autograd.Function):
    """:func:`scaled_segment_sums` as one autograd node.

    ``tensors`` holds the K predictions, the K targets, the K row factors, the K shifts
    (``None`` where absent), the inverse scale (or ``None``) and, for weighted sums, the
    K weights (``None`` where absent). The forward saves the masked differences, which
    give the first derivatives directly; under ``create_graph`` the backward recomputes
    them from the inputs.
    """

    @staticmethod
    def forward(ctx, kinds: tuple, deltas: tuple, n: int, results: list, *tensors):
        predictions, targets = tensors[:n], tensors[n : 2 * n]
        row_factors, shifts = tensors[2 * n : 3 * n], tensors[3 * n : 4 * n]
        inverse_scale = tensors[4 * n]
        weights = tensors[4 * n + 1 :] or None
        loss_targets = [t if c is None else t - c for t, c in zip(targets, shifts, strict=True)]
        if inverse_scale is not None:  # one multi-tensor kernel for all segments
            loss_targets = torch._foreach_mul(loss_targets, inverse_scale)
        differences = torch._foreach_sub(list(predictions), loss_targets)
        for difference, factor in zip(differences, row_factors, strict=True):
            if factor is not None:
                difference.mul_(factor)
        # an entry counts when its target is not NaN (NaN != NaN); the others give an
        # exact 0 whatever the prediction there
        valid = [t == t for t in targets]
        zero = _zero(differences[0])
        differences = [torch.where(v, d, zero) for v, d in zip(valid, differences, strict=True)]
        counts = torch.stack([torch.count_nonzero(v) for v in valid])
        sums = _segment_totals(differences, kinds, deltas, weights)
        ctx.mark_non_differentiable(counts)
        ctx.save_for_backward(*differences, *tensors)
        ctx.kinds, ctx.deltas, ctx.n = kinds, deltas, n
        results.append((differences, valid))  # for the caller (metrics read them)
        return sums, counts

    @staticmethod
    def backward(ctx, grad_sums: torch.Tensor, _grad_counts: torch.Tensor | None):
        n = ctx.n
        saved = ctx.saved_tensors
        differences, tensors = saved[:n], saved[n:]
        row_factors, inverse_scale = tensors[2 * n : 3 * n], tensors[4 * n]
        if torch.is_grad_enabled():  # create_graph: differentiable in the inputs
            recomputed = _scaled_differences(
                tensors[:n], tensors[n : 2 * n], row_factors, tensors[3 * n : 4 * n], inverse_scale
            )
            differences = [
                torch.where(t == t, d, torch.zeros_like(d))
                for t, d in zip(tensors[n : 2 * n], recomputed, strict=True)
            ]
        grads = []
        for k, (difference, factor, kind, delta) in enumerate(
            zip(differences, row_factors, ctx.kinds, ctx.deltas, strict=True)
        ):
            grad = pointwise_derivatives([difference], grad_sums[k : k + 1], kind, delta)[0]
            grads.append(grad if factor is None else grad * factor)
        weights = tensors[4 * n + 1 :]
        if weights:
            grads = _weighted_grads(grads, weights)
        wants = ctx.needs_input_grad[4:]
        prediction_grads = [g if w else None for g, w in zip(grads, wants[:n], strict=True)]
        # d/dt = -inverse_scale x row_factor x loss'; d/dshift = +inverse_scale x ...
        target_grads, shift_grads = [], []
        for k, grad in enumerate(grads):
            wants_target, wants_shift = wants[n + k], wants[3 * n + k]
            scaled = None
            if wants_target or wants_shift:
                scaled = grad if inverse_scale is None else grad * inverse_scale
            target_grads.append(-scaled if wants_target else None)
            shift_grads.append(scaled if wants_shift else None)
        return (
            None,
            None,
            None,
            None,
            *prediction_grads,
            *target_grads,
            *([None] * n),
            *shift_grads,
            None,
            *([None] * len(weights)),
        )


def scaled_segment_sums(
    predictions: Sequence[torch.Tensor],
    targets: Sequence[torch.Tensor],
    row_factors: Sequence[torch.Tensor | None] | None = None,
    shifts: Sequence[torch.Tensor | None] | None = None,
    inverse_scale: torch.Tensor | None = None,
    *,
    kinds: Sequence[str],
    deltas: Sequence[float] | None = None,
    weights: Sequence[torch.Tensor | None] | None = None,
) -> tuple[torch.Tensor, torch.Tensor, list[torch.Tensor], list[torch.Tensor]]:
    """Pointwise sums of K segments after bringing the targets to the predictions'
    units, as one autograd node.

    Segment ``k`` compares ``predictions[k] x row_factors[k]`` with ``(targets[k] -
    shifts[k]) x inverse_scale x row_factors[k]``: with raw model outputs, targets in the
    units of the data, the composition baseline as shift, the inverse per-target scale
    and ``1 / n_atoms`` per row as row factor, these are the loss units of
    :mod:`pl_mtt.scaling` (``None`` entries: not applied). Row factors and shifts
    broadcast against their segment; the inverse scale is a 0-dim tensor.

    Entries whose target is NaN are ignored (as in :func:`pointwise_sum_and_count`).
    Returns the ``(K,)`` sums of the loss ``kinds[k]`` (``deltas[k]`` for ``huber``), the
    ``(K,)`` ``int64`` counts of entries that count, and per segment the differences in
    loss units (ignored entries 0; no autograd history) and the boolean mask of the
    entries that count, for metrics that read the same residuals. No gradient flows to
    the row factors or the inverse scale.

    With ``weights`` (per segment a non-negative tensor broadcasting against it in loss
    units' rows, or ``None``) the sums are weighted; the counts stay the numbers of
    entries (the metrics' counts): :func:`weighted_counts` gives the sums of the weights.
    """
    n_segments = len(predictions)
    if n_segments == 0:
        raise ValueError("scaled_segment_sums needs at least one segment")
    row_factors = list(row_factors) if row_factors is not None else [None] * n_segments
    shifts = list(shifts) if shifts is not None else [None] * n_segments
    deltas = list(deltas) if deltas is not None else [1.0] * n_segments
    weights = list(weights) if weights is not None and any(w is not None for w in weights) else []
    lengths = {len(targets), len(row_factors), len(shifts), len(kinds), len(deltas)}
    if lengths != {n_segments} or len(weights) not in (0, n_segments):
        raise ValueError(
            f"scaled_segment_sums: {n_segments} predictions, {len(targets)} targets, "
            f"{len(row_factors)} row factors, {len(shifts)} shifts, {len(kinds)} kinds, "
            f"{len(deltas)} deltas and {len(weights) or 'no'} weights; expected one of each "
            f"per segment"
        )
    unknown = [kind for kind in kinds if kind not in POINTWISE_KINDS]
    if unknown:
        raise _unknown_kind(unknown[0])
    results: list = []
    sums, counts = _ScaledSegmentSums.apply(
        tuple(kinds),
        tuple(float(d) for d in deltas),
        n_segments,
        results,
        *predictions,
        *targets,
        *row_factors,
        *shifts,
        inverse_scale,
        *weights,
    )
    differences, valid = results[0]
    return sums, counts, differences, valid


def weighted_counts(
    valid: Sequence[torch.Tensor], weights: Sequence[torch.Tensor | None], counts: torch.Tensor
) -> torch.Tensor:
    """``(K,)`` sums of the weights of the entries that count (``valid[k]``), in the
    weights' dtype; ``counts[k]`` (the number of entries) for an unweighted segment."""
    dtype = next(w.dtype for w in weights if w is not None)
    return torch.stack(
        [
            counts[k].to(dtype) if w is None else torch.where(v, w, _zero(w)).sum()
            for k, (v, w) in enumerate(zip(valid, weights, strict=True))
        ]
    )
