"""Ensemble scoring rules on LLPR ensemble outputs (TensorMap adapter)."""

from __future__ import annotations

from functools import partial

from pl_mtt.losses.base import LossTerm
from pl_mtt.registry import register_loss_type

__all__ = ["EnsembleLoss"]


class EnsembleLoss(LossTerm):
    """Scoring rule ``kind`` of the ensemble output against the target (placeholder)."""

    def __init__(self, *, kind: str, **kwargs) -> None:
        super().__init__(**kwargs)
        self.kind = kind


for _kind in ("gaussian_nll", "gaussian_crps", "empirical_crps"):
    register_loss_type(f"{_kind}_ensemble")(partial(EnsembleLoss, kind=_kind))
