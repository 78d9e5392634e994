"""Profiles trained with a shift-aligned loss (``masked_dos``, ``shift_agnostic_mse``):
the window of the prediction that the loss compares with the target, for metrics,
parity plots and DOS overlays."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch

from pl_mtt.loss_module import NO_PROPERTY_SCALES
from pl_mtt.losses.functional.dos import dos_alignment_shifts
from pl_mtt.losses.functional.shift_agnostic import shift_agnostic_alignment

__all__ = ["PROFILE_LOSS_TYPES", "align_profile", "profile_targets"]

PROFILE_LOSS_TYPES = NO_PROPERTY_SCALES  # masked_dos, shift_agnostic_mse


def profile_targets(loss_config: Mapping[str, Mapping[str, Any]]) -> dict[str, dict[str, Any]]:
    """The entries of an expanded loss config whose type is a shift-aligned profile loss."""
    return {
        name: dict(entry)
        for name, entry in loss_config.items()
        if entry["type"] in PROFILE_LOSS_TYPES
    }


def align_profile(
    entry: Mapping[str, Any],
    prediction: torch.Tensor,
    target: torch.Tensor,
    extra_data: Mapping[str, Any] | None,
    name: str,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """``(aligned prediction, target, mask, shifts)`` of the ``n``-point window that the
    loss ``entry`` (expanded config) compares; ``mask`` is nonzero where the target
    counts (``masked_dos``: its mask; ``shift_agnostic_mse``: not NaN)."""
    if entry["type"] == "shift_agnostic_mse":
        shifts, aligned = shift_agnostic_alignment(prediction, target)
        return aligned, target, (~torch.isnan(target)).to(target.dtype), shifts
    mask = extra_data[f"{name}_mask"].block_by_id(0).values.to(prediction.device)
    extra = entry["extra_targets"]
    shifts = dos_alignment_shifts(prediction, target, mask, extra_targets=extra)
    n = prediction.shape[1] - extra
    aligned = prediction.gather(1, shifts[:, None] + torch.arange(n, device=shifts.device))
    return aligned, target[:, -n:], mask[:, -n:], shifts
