"""Strictly proper scoring rules of an ensemble against a target, on plain tensors.

``members`` holds the ``M`` ensemble members along ``member_dim``; removing that
dimension gives ``target``'s shape. NaN target entries are ignored (left out of the
sum and the count) by arithmetic masking. Nothing here reads tensor values on the
host: no host-device synchronisation, and the functions compile with
``torch.compile(fullgraph=True)``.

- ``gaussian_nll``: torch's ``GaussianNLLLoss`` (``eps=1e-6``, ``full=False``) on the
  ensemble mean and unbiased variance;
- ``gaussian_crps``: the non-negative Gaussian CRPS
  ``sigma * (z * (2 Phi(z) - 1) + 2 phi(z) - 1 / sqrt(pi))``, ``z = (y - mu) / sigma``,
  variance floored at ``1e-12``;
- ``empirical_crps``: ``mean_j |x_j - y| - sum_jk |x_j - x_k| / (2 M^2)``, computed from
  the sorted members with ``sum_jk |x_j - x_k| = 2 sum_i (2i - M - 1) x_(i)`` in
  ``O(M log M)`` time and ``O(M)`` memory per entry (never the ``M x M`` matrix).
"""

from __future__ import annotations

import math

import torch

from pl_mtt.losses.functional.pointwise import reduce_total, weight_sum

__all__ = [
    "ENSEMBLE_KINDS",
    "GAUSSIAN_NLL_EPS",
    "VARIANCE_FLOOR",
    "empirical_crps",
    "ensemble_elementwise",
    "ensemble_loss",
    "ensemble_mean_and_variance",
    "ensemble_sum_and_count",
    "gaussian_crps",
    "gaussian_nll",
    "min_members",
]

ENSEMBLE_KINDS = ("gaussian_nll", "gaussian_crps", "empirical_crps")
GAUSSIAN_NLL_EPS = 1e-6
VARIANCE_FLOOR = 1e-12
_INV_SQRT_PI = 1.0 / math.sqrt(math.pi)
_INV_SQRT_2 = 1.0 / math.sqrt(2.0)
_INV_SQRT_2PI = 1.0 / math.sqrt(2.0 * math.pi)


def min_members(kind: str) -> int:
    """Fewest members ``kind`` accepts: 2 for the Gaussian rules (a variance), else 1."""
    if kind not in ENSEMBLE_KINDS:
        raise ValueError(f"unknown ensemble loss kind {kind!r}; expected one of {ENSEMBLE_KINDS}")
    return 2 if kind.startswith("gaussian") else 1


def ensemble_mean_and_variance(
    members: torch.Tensor, member_dim: int = -1
) -> tuple[torch.Tensor, torch.Tensor]:
    """Mean and unbiased (Bessel-corrected) variance over the members."""
    variance, mean = torch.var_mean(members, dim=member_dim, correction=1)
    return mean, variance


def gaussian_nll(
    mean: torch.Tensor, variance: torch.Tensor, target: torch.Tensor, eps: float = GAUSSIAN_NLL_EPS
) -> torch.Tensor:
    """``0.5 * (log(v) + (mu - y)^2 / v)`` with ``v = max(variance, eps)``.

    As in ``torch.nn.GaussianNLLLoss`` the clamp is applied without autograd, so the
    gradient flows to ``variance`` as if it were not clamped.
    """
    clamped = variance.clone()
    with torch.no_grad():
        clamped.clamp_(min=eps)
    residual = mean - target
    return 0.5 * (torch.log(clamped) + residual * residual / clamped)


def gaussian_crps(
    mean: torch.Tensor,
    variance: torch.Tensor,
    target: torch.Tensor,
    variance_floor: float = VARIANCE_FLOOR,
) -> torch.Tensor:
    """Non-negative CRPS of ``N(mean, variance)`` at ``target`` (DESIGN decision 1)."""
    sigma = torch.sqrt(variance.clamp(min=variance_floor))
    z = (target - mean) / sigma
    # 2 * Phi(z) - 1 = erf(z / sqrt(2))
    return sigma * (
        z * torch.erf(z * _INV_SQRT_2)
        + (2.0 * _INV_SQRT_2PI) * torch.exp(-0.5 * z * z)
        - _INV_SQRT_PI
    )


def empirical_crps(
    members: torch.Tensor, target: torch.Tensor, member_dim: int = -1
) -> torch.Tensor:
    """Empirical CRPS of the members at ``target``, from the sorted members.

    ``M = 1`` gives ``|x - y|``. Values equal the pairwise formula; at tied members
    the (sub)gradient may differ from autograd through the pairwise form.
    """
    n_members = members.shape[member_dim]
    absolute = (members - target.unsqueeze(member_dim)).abs().mean(dim=member_dim)
    ranked = torch.sort(members, dim=member_dim).values.movedim(member_dim, -1)
    # sum_jk |x_j - x_k| / (2 M^2) = sum_i (2i - M - 1) x_(i) / M^2, i = 1..M
    rank = torch.arange(1, n_members + 1, dtype=members.dtype, device=members.device)
    weights = (2.0 * rank - (n_members + 1)) / (n_members * n_members)
    return absolute - ranked @ weights


def ensemble_elementwise(
    members: torch.Tensor, target: torch.Tensor, kind: str, member_dim: int = -1
) -> torch.Tensor:
    """Per-entry score ``kind`` (one of :data:`ENSEMBLE_KINDS`), shape of ``target``."""
    if kind == "empirical_crps":
        return empirical_crps(members, target, member_dim)
    mean, variance = ensemble_mean_and_variance(members, member_dim)
    return _gaussian_score(kind, mean, variance, target)


def _gaussian_score(
    kind: str, mean: torch.Tensor, variance: torch.Tensor, target: torch.Tensor
) -> torch.Tensor:
    if kind == "gaussian_nll":
        return gaussian_nll(mean, variance, target)
    if kind == "gaussian_crps":
        return gaussian_crps(mean, variance, target)
    raise ValueError(f"unknown ensemble loss kind {kind!r}; expected one of {ENSEMBLE_KINDS}")


def ensemble_sum_and_count(
    members: torch.Tensor,
    target: torch.Tensor,
    *,
    kind: str,
    member_dim: int = -1,
    weight: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Sum of the per-entry scores over non-NaN targets, and their number (``int64``);
    with ``weight`` (non-negative, broadcasting against ``target``) the weighted sum and
    the sum of the weights of the non-NaN entries.

    When every target is NaN the sum is an exact zero that keeps the autograd path.
    """
    ignored = torch.isnan(target)
    # ignored entries get a finite stand-in target (their scores and gradients are zeroed)
    if kind == "empirical_crps":
        scores = empirical_crps(members, target.masked_fill(ignored, 0.0), member_dim)
    else:
        mean, variance = ensemble_mean_and_variance(members, member_dim)
        stand_in = torch.where(ignored, mean.detach(), target)
        scores = _gaussian_score(kind, mean, variance, stand_in)
    scores = scores.masked_fill(ignored, 0.0)
    if weight is None:
        return scores.sum(), ignored.numel() - ignored.sum()
    return (scores * weight).sum(), weight_sum(ignored, weight)


def ensemble_loss(
    members: torch.Tensor,
    target: torch.Tensor,
    *,
    kind: str,
    member_dim: int = -1,
    reduction: str = "mean",
    weight: torch.Tensor | None = None,
) -> torch.Tensor:
    """``mean`` (over non-NaN targets, 0 when none) or ``sum`` of the score ``kind``
    (weighted by ``weight`` if given: ``sum w s / sum w`` or ``sum w s``)."""
    total, count = ensemble_sum_and_count(
        members, target, kind=kind, member_dim=member_dim, weight=weight
    )
    return reduce_total(total, count, reduction)
