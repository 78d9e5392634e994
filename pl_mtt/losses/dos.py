"""The masked density-of-states alignment loss (TensorMap adapter)."""

from __future__ import annotations

from pl_mtt.losses.base import LossTerm
from pl_mtt.registry import REQUIRED, Param, register_loss_type

__all__ = ["MaskedDOSLoss"]


@register_loss_type(
    "masked_dos",
    params={
        "grad_weight": Param(1e-4, "non_negative_float"),
        "int_weight": Param(2.0, "non_negative_float"),
        "extra_targets": Param(REQUIRED, "non_negative_int"),
        "grid_spacing": Param(0.05, "positive_float"),
        "energy_grid": Param(None, "optional_float_list"),
    },
    reductions=("mean", "sum", "none"),
    supports_gradients=False,
)
class MaskedDOSLoss(LossTerm):
    """Shift-aligned masked DOS loss (placeholder)."""

    def __init__(
        self,
        *,
        grad_weight: float,
        int_weight: float,
        extra_targets: int,
        grid_spacing: float = 0.05,
        energy_grid: list[float] | None = None,
        **kwargs,
    ) -> None:
        super().__init__(**kwargs)
        self.grad_weight = grad_weight
        self.int_weight = int_weight
        self.extra_targets = extra_targets
        self.grid_spacing = grid_spacing
        self.energy_grid = energy_grid
