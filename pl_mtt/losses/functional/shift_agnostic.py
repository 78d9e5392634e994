"""metatrain's ``shift_agnostic_mse`` on plain tensors (intended math; see docs/decisions.md).

Shapes: ``predictions`` ``(B, L)``, ``targets`` ``(B, n)`` with ``n <= 3 L``; a NaN
target point is masked out (``m = 0``) and counts as 0. The prediction is padded with
``L`` zeros on each side, ``P = [0_L, p, 0_L]`` (length ``3 L``), and for every integer
shift ``s in 0..3L-n`` of the ``n``-point window::

    criterion(s) = sum_j m_j (P[s + j] - t_j)^2 + sum_{k < s} P[k]^2

(the squared prediction in front of the window is penalised, the tail after it is
not). Per structure, with ``s*`` the first minimising shift (no gradient through the
choice), ``a = P[s* : s* + n]`` and ``h = 0.05`` (metatrain's fixed spacing)::

    base     = criterion(s*)
    gradient = trapz((D P)^2 * not(M), dx=h)           over points 4..3L-1
    integral = trapz((cumtrapz(a) - cumtrapz(t))^2 * m[1:], dx=h)
    loss     = base + grad_penalty_weight * gradient + int_weight * integral

``D P`` is the one-sided 5-point backward difference ``(P[k-4]/4 - 4 P[k-3]/3 +
3 P[k-2] - 4 P[k-1] + 25 P[k]/12) / h`` and ``M`` is true before the window
(``k < s*``) and at the unmasked points inside it, false after the window: the
gradient is penalised after the window and at NaN points inside it. metatrain
broadcasts the integral's mask over the batch (``(B, 1, n-1) * (B, n-1)``) and
integrates over the batch axis, which makes that term 0 for one structure and mixes
structures otherwise; this module computes the term as written above.

The search uses one FFT correlation (float64) for all shifts, and the loss is then
evaluated at the chosen shift with ``gather``: batched, no Python loop over structures
or shifts, no host-device synchronisation.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F  # noqa: N812

from pl_mtt.losses.functional.dos import _fft_size, first_minimum, window_criterion

__all__ = ["SPACING", "shift_agnostic_alignment", "shift_agnostic_mse_loss"]

SPACING = 0.05
"""metatrain's fixed grid spacing of the gradient and integral terms."""

# one-sided 5-point backward difference (metatrain's stencil), in units of 1/h
_STENCIL = (1 / 4, -4 / 3, 3.0, -4.0, 25 / 12)


def _check(predictions: torch.Tensor, targets: torch.Tensor) -> None:
    if predictions.dim() != 2 or targets.dim() != 2:
        raise ValueError(
            "shift_agnostic_mse: predictions and targets must be 2-D (structures, points); "
            f"got shapes {tuple(predictions.shape)} and {tuple(targets.shape)}"
        )
    if predictions.shape[0] != targets.shape[0]:
        raise ValueError(
            f"shift_agnostic_mse: predictions have {predictions.shape[0]} structures, "
            f"targets {targets.shape[0]}"
        )
    width, n = predictions.shape[1], targets.shape[1]
    if width < 2 or n < 2 or n > 3 * width:
        raise ValueError(
            f"shift_agnostic_mse: predictions have {width} points and targets {n}; both "
            f"need at least 2 points and the targets at most 3 x {width} (the prediction "
            f"padded with {width} zeros on each side)"
        )


@torch.no_grad()
def _search(padded: torch.Tensor, targets: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """First shift minimising the criterion (float64 FFT correlations)."""
    batch, length = padded.shape
    n = targets.shape[1]
    shifts = length - n + 1
    if batch == 0:
        return torch.zeros(0, dtype=torch.long, device=padded.device)
    p = padded.detach().to(torch.float64)
    m = mask.to(torch.float64)
    size = _fft_size(length)
    window, scale = window_criterion(p, m, m * targets.to(torch.float64), shifts, size)
    front = torch.cumsum(p * p, dim=1)[:, : shifts - 1]
    criterion = window + F.pad(front, (1, 0))
    scale = scale + front[:, -1:].squeeze(1) if shifts > 1 else scale
    return first_minimum(criterion, scale, size)


def _split(targets: torch.Tensor, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
    targets = targets.to(dtype)
    is_nan = torch.isnan(targets)
    return torch.where(is_nan, torch.zeros_like(targets), targets), (~is_nan).to(dtype)


def _aligned(
    predictions: torch.Tensor, targets: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """The padded predictions ``(B, 3 L)``, the targets with NaN as 0 and their mask
    ``(B, n)``, the chosen shifts ``(B,)`` and the aligned windows ``(B, n)``."""
    _check(predictions, targets)
    width = predictions.shape[1]
    padded = F.pad(predictions, (width, width))
    clean, mask = _split(targets, predictions.dtype)
    shifts = _search(padded, clean, mask)
    index = shifts[:, None] + torch.arange(targets.shape[1], device=predictions.device)
    return padded, clean, mask, shifts, padded.gather(1, index)


def shift_agnostic_alignment(
    predictions: torch.Tensor, targets: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """``(shifts, aligned)``: the chosen shift per structure ``(B,)`` (into the padded
    prediction) and the aligned ``n``-point window ``(B, n)`` of the padded prediction."""
    return _aligned(predictions, targets)[3:]


def shift_agnostic_mse_loss(
    predictions: torch.Tensor,
    targets: torch.Tensor,
    *,
    int_weight: float,
    grad_penalty_weight: float,
    return_shifts: bool = False,
) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
    """Per-structure ``shift_agnostic_mse`` ``(B,)`` in the dtype of ``predictions``
    (and the chosen shifts if ``return_shifts``); metatrain's value is the mean.

    >>> p = torch.rand(3, 40, dtype=torch.float64)
    >>> p[:, :5] = 0.0  # nothing in front of the window: a perfect match costs 0
    >>> loss, shifts = shift_agnostic_mse_loss(
    ...     p, p[:, 5:35], int_weight=1.0, grad_penalty_weight=0.0, return_shifts=True
    ... )
    >>> shifts.tolist(), float(loss.abs().max())
    ([45, 45, 45], 0.0)
    """
    dtype, device = predictions.dtype, predictions.device
    padded, clean, mask, shifts, aligned = _aligned(predictions, targets)
    n, length = clean.shape[1], padded.shape[1]
    difference = aligned - clean
    front = F.pad(torch.cumsum(padded.square(), dim=1), (1, 0)).gather(1, shifts[:, None])
    loss = (difference.square() * mask).sum(dim=1) + front.squeeze(1)
    if grad_penalty_weight > 0:
        stencil = torch.tensor(_STENCIL, dtype=dtype, device=device) / SPACING
        slope = F.conv1d(padded[:, None, :], stencil.reshape(1, 1, -1))[:, 0, :]
        position = torch.arange(len(_STENCIL) - 1, length, device=device) - shifts[:, None]
        inside = (position >= 0) & (position < n)
        at = mask.gather(1, position.clamp(0, n - 1)) != 0
        kept = (position < 0) | (inside & at)
        penalised = torch.where(kept, torch.zeros_like(slope), slope)
        loss = loss + grad_penalty_weight * torch.trapezoid(penalised.square(), dx=SPACING, dim=1)
    if int_weight > 0:
        cumulative = torch.cumulative_trapezoid(difference, dx=SPACING, dim=1)
        integral = torch.trapezoid(cumulative.square() * mask[:, 1:], dx=SPACING, dim=1)
        loss = loss + int_weight * integral
    return (loss, shifts) if return_shifts else loss
