"""The masked density-of-states alignment loss (TensorMap adapter, DESIGN decision 8).

.. code-block:: yaml

    loss:
      mtt::dos:
        type: masked_dos
        grad_weight: 1e-4
        int_weight: 2.0
        extra_targets: 200
        reduction: mean
        grid_spacing: 0.05        # eV; or energy_grid: [e_0, ..., e_(n+extra_targets-1)]

Layout: the prediction, the target and ``extra_data["<target>_mask"]`` each have one
block with per-structure samples (``["system"]``), no components, and the DOS points
as properties. Predictions have ``n + extra_targets`` points; target and mask ``n`` or
``n + extra_targets`` (their first ``extra_targets`` points are then ignored). A DOS
target with several blocks is rejected: the shift alignment couples all points of a
structure, so there is no meaningful per-block split.
"""

from __future__ import annotations

import torch
from metatensor.torch import TensorBlock, TensorMap

from pl_mtt.losses.base import PerStructureLoss
from pl_mtt.losses.functional.dos import check_extra_targets, masked_dos_loss
from pl_mtt.registry import REQUIRED, Param, register_loss_type
from pl_mtt.tensormaps.builders import PER_STRUCTURE, TensorMaps, layout_signature, sample_kind

__all__ = ["MaskedDOSLoss", "grid_spacing_of"]

DEFAULT_GRID_SPACING = 0.05
GRID_RTOL = 1e-6


def grid_spacing_of(
    energy_grid: list[float] | None, grid_spacing: float = DEFAULT_GRID_SPACING
) -> float:
    """The spacing of a uniform ``energy_grid`` (to 1e-6 relative), else ``grid_spacing``.

    An explicit ``grid_spacing`` that differs from the grid's spacing is an error; the
    default value cannot be told apart from an explicit one and yields to the grid.
    """
    if not grid_spacing > 0:
        raise ValueError(f"masked_dos: grid_spacing must be positive, got {grid_spacing!r}")
    if energy_grid is None:
        return float(grid_spacing)
    grid = torch.as_tensor(energy_grid, dtype=torch.float64)
    if grid.dim() != 1 or len(grid) < 2:
        raise ValueError(
            f"masked_dos: energy_grid must be a list of at least 2 energies, got shape "
            f"{tuple(grid.shape)}"
        )
    steps = grid[1:] - grid[:-1]
    spacing = float((grid[-1] - grid[0]) / (len(grid) - 1))
    worst = float((steps - spacing).abs().max())
    if not spacing > 0 or worst > GRID_RTOL * spacing:
        raise ValueError(
            f"masked_dos: energy_grid must be increasing and uniform to {GRID_RTOL:g} "
            f"relative; mean spacing {spacing:g}, largest deviation of a step {worst:g}"
        )
    if grid_spacing != DEFAULT_GRID_SPACING and abs(grid_spacing - spacing) > GRID_RTOL * spacing:
        raise ValueError(
            f"masked_dos: grid_spacing={grid_spacing:g} disagrees with the spacing "
            f"{spacing:g} of energy_grid; give one of them"
        )
    return spacing


@register_loss_type(
    "masked_dos",
    params={
        "grad_weight": Param(1e-4, "non_negative_float"),
        "int_weight": Param(2.0, "non_negative_float"),
        "extra_targets": Param(REQUIRED, "non_negative_int"),
        "grid_spacing": Param(DEFAULT_GRID_SPACING, "positive_float"),
        "energy_grid": Param(None, "optional_float_list"),
    },
    reductions=("mean", "sum", "none"),
    supports_gradients=False,
    weighting=("sample_weights",),  # one value per structure: no type weights
)
class MaskedDOSLoss(PerStructureLoss):
    """Shift-aligned masked DOS loss; ``mean``/``sum`` over structures, ``none`` per structure.

    :meth:`sum_and_count` returns (sum of per-structure losses, number of structures);
    with per-structure ``sample_weights`` the weighted sum and the sum of the weights.
    """

    per_property_scaling = False
    """DOS targets are never per-property scaled (DESIGN decisions 4 and 8)."""

    core = staticmethod(masked_dos_loss)

    def __init__(
        self,
        *,
        grad_weight: float = 1e-4,
        int_weight: float = 2.0,
        extra_targets: int,
        grid_spacing: float = DEFAULT_GRID_SPACING,
        energy_grid: list[float] | None = None,
        **kwargs,
    ) -> None:
        super().__init__(**kwargs)
        try:
            extra_targets = check_extra_targets(extra_targets)
        except ValueError as error:
            raise ValueError(f"masked_dos: {error}") from None
        for name, value in (("grad_weight", grad_weight), ("int_weight", int_weight)):
            if not value >= 0:
                raise ValueError(f"masked_dos: {name} must be >= 0, got {value!r}")
        if self.reduction not in ("mean", "sum", "none"):
            raise ValueError(
                f"masked_dos: reduction must be 'mean', 'sum' or 'none', got {self.reduction!r}"
            )
        self.grad_weight = float(grad_weight)
        self.int_weight = float(int_weight)
        self.extra_targets = extra_targets
        self.energy_grid = None if energy_grid is None else [float(e) for e in energy_grid]
        self.grid_spacing = grid_spacing_of(self.energy_grid, grid_spacing)
        if self.energy_grid is not None and len(self.energy_grid) < extra_targets + 2:
            raise ValueError(
                f"masked_dos: energy_grid has {len(self.energy_grid)} points, fewer than "
                f"extra_targets + 2 = {extra_targets + 2}"
            )

    @property
    def mask_key(self) -> str:
        """Key of the mask in ``extra_data``."""
        return f"{self.target}_mask"

    # -- layout -----------------------------------------------------------------------
    def _single_block(self, tensor_map: TensorMap, what: str) -> TensorBlock:
        if len(tensor_map) != 1:
            raise ValueError(
                f"masked_dos on {self.description}: the {what} must have exactly one block "
                f"(the DOS of each structure), got {len(tensor_map)} blocks with keys "
                f"{tensor_map.keys.names}"
            )
        return tensor_map.block_by_id(0)

    def _check_layout(self, prediction: TensorMap, target: TensorMap, mask: TensorMap) -> None:
        """Full metadata check, once per layout signature."""
        blocks = {
            "prediction": self._single_block(prediction, "prediction"),
            "target": self._single_block(target, "target"),
            "mask": self._single_block(mask, f"mask '{self.mask_key}'"),
        }
        for what, block in blocks.items():
            try:
                kind = sample_kind(block.samples.names)
            except ValueError as error:
                kind = str(error)
            if kind != PER_STRUCTURE:
                raise ValueError(
                    f"masked_dos on {self.description}: the {what} must have per-structure "
                    f"samples ['system'], got {block.samples.names}"
                )
            if len(block.components) != 0:
                raise ValueError(
                    f"masked_dos on {self.description}: the {what} must have no components "
                    f"(DOS points are properties), got {[c.names for c in block.components]}"
                )
        if prediction.keys.names != target.keys.names or target.keys.names != mask.keys.names:
            raise ValueError(
                f"masked_dos on {self.description}: key names differ: prediction "
                f"{prediction.keys.names}, target {target.keys.names}, mask {mask.keys.names}"
            )
        if blocks["target"].properties != blocks["mask"].properties:
            raise ValueError(
                f"masked_dos on {self.description}: the mask '{self.mask_key}' must have the "
                f"target's properties"
            )
        if self.energy_grid is not None and len(blocks["prediction"].properties) != len(
            self.energy_grid
        ):
            raise ValueError(
                f"masked_dos on {self.description}: predictions have "
                f"{len(blocks['prediction'].properties)} points but energy_grid has "
                f"{len(self.energy_grid)} (it spans n + extra_targets points)"
            )

    def _values(
        self, predictions: TensorMaps, targets: TensorMaps, extra_data: TensorMaps | None
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        prediction = self.lookup(predictions, self.prediction_key, "predictions")
        target = self.lookup(targets, self.target, "targets")
        mask = self.lookup(extra_data, self.mask_key, "extra_data (the DOS mask)")
        signature = (layout_signature(prediction), layout_signature(target), layout_signature(mask))
        self.check_once(signature, lambda: self._check_layout(prediction, target, mask))
        p = prediction.block_by_id(0).values
        t = target.block_by_id(0).values
        m = mask.block_by_id(0).values
        if not (p.shape[0] == t.shape[0] == m.shape[0]):
            raise ValueError(
                f"masked_dos on {self.description}: sample counts differ: prediction "
                f"{p.shape[0]}, target {t.shape[0]}, mask {m.shape[0]}"
            )
        return p, t, m

    # -- computation ------------------------------------------------------------------
    def per_structure(
        self, predictions: TensorMaps, targets: TensorMaps, extra_data: TensorMaps | None = None
    ) -> torch.Tensor:
        """One loss value per structure, ``(B,)``."""
        p, t, m = self._values(predictions, targets, extra_data)
        try:
            return self.core_function()(
                p,
                t,
                m,
                extra_targets=self.extra_targets,
                grid_spacing=self.grid_spacing,
                grad_weight=self.grad_weight,
                int_weight=self.int_weight,
            )
        except ValueError as error:
            raise ValueError(f"masked_dos on {self.description}: {error}") from None

    def extra_repr(self) -> str:
        return (
            f"{super().extra_repr()}, grad_weight={self.grad_weight}, "
            f"int_weight={self.int_weight}, extra_targets={self.extra_targets}, "
            f"grid_spacing={self.grid_spacing}"
        )
