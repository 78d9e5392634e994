"""Pointwise losses: mse, mae, huber and their masked variants (TensorMap adapter)."""

from __future__ import annotations

from functools import partial

from pl_mtt.losses.base import LossTerm
from pl_mtt.registry import Param, register_loss_type

__all__ = ["PointwiseLoss"]


class PointwiseLoss(LossTerm):
    """Elementwise ``kind`` loss over all entries of all blocks (placeholder)."""

    def __init__(self, *, kind: str, masked: bool = False, delta: float = 1.0, **kwargs) -> None:
        super().__init__(**kwargs)
        self.kind = kind
        self.masked = masked
        self.delta = delta


_DELTA = {"delta": Param(1.0, "positive_float")}
for _kind, _params in (("mse", {}), ("mae", {}), ("huber", _DELTA)):
    register_loss_type(_kind, params=_params)(partial(PointwiseLoss, kind=_kind))
    register_loss_type(f"masked_{_kind}", params=_params)(
        partial(PointwiseLoss, kind=_kind, masked=True)
    )
