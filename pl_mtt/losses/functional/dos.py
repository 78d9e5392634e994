"""The shift-aligned masked density-of-states loss on plain tensors (DESIGN decision 8).

Shapes: ``predictions`` ``(B, n + extra_targets)``; ``targets`` and ``mask`` ``(B, n)``
or ``(B, n + extra_targets)`` (then their first ``extra_targets`` points are ignored).
A mask point counts when it is nonzero; a NaN target point counts as masked out and as
0 in the cumulative integral. With ``h`` the grid spacing and trapezoid weights ``w``
(1, the first and last window point 1/2), for every structure the shift
``s in 0..extra_targets`` minimising ``L1(s) = h * sum_i w_i m_i (p[s + i] - t_i)^2``
is chosen (ties -> smallest shift; a fully masked structure uses 0) without gradient,
and with ``a = p[s : s + n]``::

    L1 = trapz((a - t)^2 * m)
    L2 = trapz(gradient(a)^2 * (1 - m))
    L3 = trapz((cumtrapz(a) - cumtrapz(t))^2 * m[1:])
    loss = L1 + grad_weight * L2 + int_weight * L3        # one value per structure

How the search avoids the ``(B, shifts, n)`` tensor: expanding the square,
``L1(s) / h = corr(p^2, w m)[s] - 2 corr(p, w m t)[s] + const``, and both
correlations over all shifts come from one FFT product (circular correlation of
length ``L >= n + extra_targets`` never wraps for ``s <= extra_targets``). The search
runs in float64 whatever the input dtype; shifts whose criterion lies within the FFT's
rounding error of the minimum count as tied, so exact ties still go to the smallest
shift. The chosen window is then read with one ``gather``; everything is batched,
makes no host-device synchronisation and has no Python loop over structures or shifts.
"""

from __future__ import annotations

import math
import operator

import torch

__all__ = ["check_extra_targets", "dos_alignment_shifts", "masked_dos_loss", "split_dos_inputs"]

# shifts within TIE_ULPS * log2(L) float64 ulps (relative to the correlations' scale)
# of the minimum are ties: far above FFT rounding, far below any real difference
TIE_ULPS = 32.0


def check_extra_targets(extra_targets: object) -> int:
    """``extra_targets`` as an ``int`` >= 0, or a ``ValueError``."""
    try:
        value = operator.index(extra_targets)  # type: ignore[arg-type]
    except TypeError:
        value = -1
    if isinstance(extra_targets, bool) or value < 0:
        raise ValueError(f"extra_targets must be a non-negative integer, got {extra_targets!r}")
    return value


def _fft_size(length: int) -> int:
    """The smallest ``2^a 3^b 5^c >= length`` (fast FFT sizes)."""
    best = 1 << max(length - 1, 0).bit_length()
    power5 = 1
    while power5 < best:
        power35 = power5
        while power35 < best:
            size = power35
            while size < length:
                size *= 2
            best = min(best, size)
            power35 *= 3
        power5 *= 5
    return best


def split_dos_inputs(
    predictions: torch.Tensor,
    targets: torch.Tensor,
    mask: torch.Tensor,
    extra_targets: int,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Check widths; return the ``n``-point targets with NaNs as 0 and the 0/1 mask.

    The returned mask is 0 at NaN targets and has the dtype of ``predictions``.
    Raises ``ValueError`` naming the widths on any layout mismatch.
    """
    extra_targets = check_extra_targets(extra_targets)
    if predictions.dim() != 2 or targets.dim() != 2 or mask.dim() != 2:
        raise ValueError(
            "DOS predictions, targets and mask must be 2-D (structures, points); got shapes "
            f"{tuple(predictions.shape)}, {tuple(targets.shape)}, {tuple(mask.shape)}"
        )
    width = predictions.shape[1]
    n = width - extra_targets
    if n < 2:
        raise ValueError(
            f"DOS predictions have {width} points, but extra_targets={extra_targets} needs "
            f"at least {extra_targets + 2} (n + extra_targets with a window of n >= 2 points)"
        )
    if targets.shape[1] not in (n, width):
        raise ValueError(
            f"DOS targets have {targets.shape[1]} points; with predictions of {width} points "
            f"and extra_targets={extra_targets} they must have n={n} or "
            f"n + extra_targets={width} points"
        )
    if mask.shape != targets.shape:
        raise ValueError(
            f"DOS mask has shape {tuple(mask.shape)}, expected the targets' shape "
            f"{tuple(targets.shape)} (n={n} or n + extra_targets={width} points)"
        )
    if targets.shape[0] != predictions.shape[0]:
        raise ValueError(
            f"DOS predictions have {predictions.shape[0]} structures, targets {targets.shape[0]}"
        )
    if targets.shape[1] == width:
        targets = targets[:, extra_targets:]
        mask = mask[:, extra_targets:]
    targets = targets.to(predictions.dtype)
    is_nan = torch.isnan(targets)
    weight = ((mask != 0) & ~is_nan).to(predictions.dtype)
    return torch.where(is_nan, torch.zeros_like(targets), targets), weight


def _trapezoid_weights(n: int, like: torch.Tensor) -> torch.Tensor:
    weights = torch.ones(n, dtype=like.dtype, device=like.device)
    # fill_ with a Python number launches a kernel; `weights[0] = 0.5` would copy a CPU
    # scalar tensor to the device and synchronise
    weights[:1].fill_(0.5)
    weights[-1:].fill_(0.5)
    return weights


@torch.no_grad()
def _search(predictions: torch.Tensor, targets: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """Shifts minimising ``L1`` (``targets`` NaN-free, ``weight`` 0/1), float64 FFT search."""
    batch, width = predictions.shape
    n = targets.shape[1]
    shifts = width - n + 1
    if batch == 0 or shifts == 1:  # nothing to search (an empty batch trips MKL's FFT)
        return torch.zeros(batch, dtype=torch.long, device=predictions.device)
    p = predictions.detach().to(torch.float64)
    wm = weight.to(torch.float64) * _trapezoid_weights(n, p)
    size = _fft_size(width)
    criterion, scale = window_criterion(p, wm, wm * targets.to(torch.float64), shifts, size)
    chosen = first_minimum(criterion, scale, size)
    return torch.where(weight.any(dim=1), chosen, torch.zeros_like(chosen))


def window_criterion(
    p: torch.Tensor, m: torch.Tensor, mt: torch.Tensor, shifts: int, size: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """``sum_j m_j (p[s + j]^2 - 2 t_j p[s + j])`` for ``s in 0..shifts-1`` (``(B,
    shifts)``; ``mt = m t``, all float64) by FFT correlations of ``size`` points
    (:func:`_fft_size` of ``p``'s width), and the rounding scale of each row (a
    Cauchy-Schwarz bound on its entries) for :func:`first_minimum`."""
    spectra = torch.fft.rfft(torch.stack([p * p, p]), n=size)  # (2, B, L/2+1)
    kernels = torch.fft.rfft(torch.stack([m, -2.0 * mt]), n=size).conj()
    criterion = torch.fft.irfft((spectra * kernels).sum(0), n=size)[:, :shifts]
    scale = torch.linalg.vector_norm(p * p, dim=1) * torch.linalg.vector_norm(m, dim=1)
    scale = scale + 2.0 * torch.linalg.vector_norm(p, dim=1) * torch.linalg.vector_norm(mt, dim=1)
    return criterion, scale


def first_minimum(criterion: torch.Tensor, scale: torch.Tensor, size: int) -> torch.Tensor:
    """Per row the first shift within the rounding tolerance of the row's minimum
    (``scale``: that of :func:`window_criterion` with FFTs of ``size`` points)."""
    tolerance = (TIE_ULPS * math.log2(size) * torch.finfo(torch.float64).eps) * scale
    best = criterion.min(dim=1, keepdim=True).values
    # argmax returns the first maximum
    return (criterion <= best + tolerance[:, None]).to(torch.uint8).argmax(dim=1)


def dos_alignment_shifts(
    predictions: torch.Tensor,
    targets: torch.Tensor,
    mask: torch.Tensor,
    *,
    extra_targets: int,
) -> torch.Tensor:
    """The chosen shift per structure, ``(B,)`` int64 in ``0..extra_targets``."""
    targets, weight = split_dos_inputs(predictions, targets, mask, extra_targets)
    return _search(predictions, targets, weight)


def masked_dos_loss(
    predictions: torch.Tensor,
    targets: torch.Tensor,
    mask: torch.Tensor,
    *,
    extra_targets: int,
    grid_spacing: float = 0.05,
    grad_weight: float = 1e-4,
    int_weight: float = 2.0,
    return_shifts: bool = False,
) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
    """Per-structure DOS loss ``(B,)`` (and the chosen shifts if ``return_shifts``).

    >>> p = torch.rand(4, 110); t = p[:, 7:107].clone(); m = torch.ones_like(t)
    >>> loss, shifts = masked_dos_loss(p, t, m, extra_targets=10, return_shifts=True)
    >>> shifts.tolist(), float(loss.abs().max())
    ([7, 7, 7, 7], 0.0)
    """
    if not grid_spacing > 0:
        raise ValueError(f"grid_spacing must be positive, got {grid_spacing!r}")
    targets, weight = split_dos_inputs(predictions, targets, mask, extra_targets)
    batch, n = targets.shape
    if extra_targets == 0:
        shifts = torch.zeros(batch, dtype=torch.long, device=predictions.device)
        aligned = predictions
    else:
        shifts = _search(predictions, targets, weight)
        index = shifts[:, None] + torch.arange(n, device=predictions.device)
        aligned = predictions.gather(1, index)
    h = float(grid_spacing)
    difference = aligned - targets
    masked = torch.trapezoid(difference.square() * weight, dx=h, dim=1)
    slope = torch.gradient(aligned, spacing=h, dim=1)[0]
    smooth = torch.trapezoid(slope.square() * (1.0 - weight), dx=h, dim=1)
    cumulative = torch.cumulative_trapezoid(difference, dx=h, dim=1)
    integrated = torch.trapezoid(cumulative.square() * weight[:, 1:], dx=h, dim=1)
    loss = masked + grad_weight * smooth + int_weight * integrated
    return (loss, shifts) if return_shifts else loss
