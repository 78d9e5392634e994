"""metatrain's ``shift_agnostic_mse`` (TensorMap adapter; the math is in
:mod:`pl_mtt.losses.functional.shift_agnostic`).

.. code-block:: yaml

    loss:
      mtt::dos:
        type: shift_agnostic_mse
        int_weight: 0.0             # required, as in metatrain
        grad_penalty_weight: 0.0    # required, as in metatrain
        reduction: mean             # mean (metatrain's behaviour), sum or none

Layout: the prediction and the target each have one block with per-structure samples
(``["system"]``), no components and the profile points as properties; the prediction
has ``L`` points, the target ``n <= 3 L``. NaN target points are masked out (there is
no mask in ``extra_data``). Relation to ``masked_dos``: see docs/decisions.md.
"""

from __future__ import annotations

import torch
from metatensor.torch import TensorBlock, TensorMap

from pl_mtt.losses.base import PerStructureLoss
from pl_mtt.losses.functional.shift_agnostic import shift_agnostic_mse_loss
from pl_mtt.registry import REQUIRED, Param, register_loss_type
from pl_mtt.tensormaps.builders import PER_STRUCTURE, TensorMaps, layout_signature, sample_kind

__all__ = ["ShiftAgnosticMSELoss"]


@register_loss_type(
    "shift_agnostic_mse",
    params={
        "int_weight": Param(REQUIRED, "non_negative_float"),
        "grad_penalty_weight": Param(REQUIRED, "non_negative_float"),
    },
    reductions=("mean", "sum", "none"),
    supports_gradients=False,
    weighting=("sample_weights",),  # one value per structure: no type weights
)
class ShiftAgnosticMSELoss(PerStructureLoss):
    """Shift-agnostic squared error of a profile; ``mean`` (metatrain's) or ``sum`` over
    structures, ``none`` per structure."""

    per_property_scaling = False
    """Profiles are never per-property scaled (a per-point scale would break the shift)."""

    core = staticmethod(shift_agnostic_mse_loss)

    def __init__(self, *, int_weight: float, grad_penalty_weight: float, **kwargs) -> None:
        super().__init__(**kwargs)
        weights = (("int_weight", int_weight), ("grad_penalty_weight", grad_penalty_weight))
        for name, value in weights:
            if not value >= 0:
                raise ValueError(f"shift_agnostic_mse: {name} must be >= 0, got {value!r}")
        if self.reduction not in ("mean", "sum", "none"):
            raise ValueError(
                "shift_agnostic_mse: reduction must be 'mean', 'sum' or 'none', got "
                f"{self.reduction!r}"
            )
        self.int_weight = float(int_weight)
        self.grad_penalty_weight = float(grad_penalty_weight)

    def _block(self, tensor_map: TensorMap, what: str) -> TensorBlock:
        if len(tensor_map) != 1:
            raise self.error(
                f"shift_agnostic_mse: the {what} must have exactly one block (the profile of "
                f"each structure), got {len(tensor_map)} blocks with keys {tensor_map.keys.names}"
            )
        block = tensor_map.block_by_id(0)
        try:
            kind = sample_kind(block.samples.names)
        except ValueError:
            kind = None
        if kind != PER_STRUCTURE or len(block.components) != 0:
            raise self.error(
                f"shift_agnostic_mse: the {what} must have per-structure samples ['system'] "
                f"and no components, got samples {block.samples.names} and components "
                f"{[c.names for c in block.components]}"
            )
        return block

    def per_structure(
        self, predictions: TensorMaps, targets: TensorMaps, extra_data: TensorMaps | None = None
    ) -> torch.Tensor:
        prediction = self.lookup(predictions, self.prediction_key, "predictions")
        target = self.lookup(targets, self.target, "targets")
        signature = (layout_signature(prediction), layout_signature(target))
        self.check_once(
            signature,
            lambda: (self._block(prediction, "prediction"), self._block(target, "target")),
        )
        p = prediction.block_by_id(0).values
        t = target.block_by_id(0).values
        self.check_dtype_device(p, "predictions", t, "targets")
        try:
            return self.core_function()(
                p, t, int_weight=self.int_weight, grad_penalty_weight=self.grad_penalty_weight
            )
        except ValueError as error:
            raise self.error(str(error)) from None

    def extra_repr(self) -> str:
        return (
            f"{super().extra_repr()}, int_weight={self.int_weight}, "
            f"grad_penalty_weight={self.grad_penalty_weight}"
        )
