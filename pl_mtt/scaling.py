"""The pipeline between data, model and loss (spec: "How scales are applied").

Every function returns a new ``Dict[str, TensorMap]`` and never modifies its inputs.
``scaler`` is a fitted :class:`pl_mtt.Scaler`, ``composition`` a fitted
:class:`pl_mtt.CompositionModel`; either may be ``None`` (that step is skipped). Units
of each stage, for an energy target ``E`` (eV) with forces and virial, ``N`` atoms,
baseline ``b`` and per-target scale ``s``:

================================  ==============  ====================  ===============
stage                              energy          positions gradient    strain gradient
================================  ==============  ====================  ===============
data (physical, total)             E  [eV]         dE/dr  [eV/A]         dE/de  [eV]
:func:`targets_for_loss`           (E - b)/N/s     dE/dr / s             dE/de / N / s
raw model output                   (E - b)/s       dE/dr / s             dE/de / s
:func:`predictions_for_loss`       raw / N         raw                   raw / N
:func:`for_metrics`                (E - b)/N       dE/dr                 dE/de / N
                                   [eV/atom]       [eV/A]                [eV/atom]
:func:`to_physical` (inference)    E  [eV]         dE/dr  [eV/A]         dE/de  [eV]
================================  ==============  ====================  ===============

The raw model output is in scaled, baseline-free, total units. Division by atoms
follows metatrain's rule (DESIGN decision 5): in a per-structure target every block and
gradient block whose samples contain neither ``atom`` nor ``first_atom`` is divided by
the number of atoms of its system; per-atom and atom-pair targets are never divided,
nor are targets listed in ``per_structure_targets`` (intensive ones; taken from the
scaler). The loss of a multi-property target sees the predictions multiplied by their
per-property scales: :class:`pl_mtt.LossModule` does that itself, with the scaler the
:class:`pl_mtt.ScalerCallback` hands it.

.. code-block:: python

    def training_step(self, batch, _):
        systems, targets, extra_data = batch
        predictions = self.model(systems)
        predictions, targets = scaling.prepare_for_loss(self, systems, predictions, targets)
        return self.loss(predictions, targets, extra_data, systems)
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping

import torch
from metatensor.torch import TensorBlock, TensorMap
from metatomic.torch import System

from pl_mtt.block_ops import rebuild_block
from pl_mtt.tensormaps import ensemble_output_name

__all__ = [
    "divide_by_atoms",
    "for_metrics",
    "multiply_by_atoms",
    "predictions_for_loss",
    "prepare_for_loss",
    "targets_for_loss",
    "targets_from_loss",
    "to_physical",
]

Tensors = Mapping[str, TensorMap]


def _not_divided(scaler: torch.nn.Module | None, names: Iterable[str] | None) -> set[str]:
    """Names (targets and their ensemble outputs) that are never divided by atoms."""
    if names is None:
        names = getattr(scaler, "per_structure_targets", ()) if scaler is not None else ()
    names = set(names)
    return names | {ensemble_output_name(name) for name in names}


def _n_atoms(systems: list[System]) -> torch.Tensor:
    return torch.tensor([len(system) for system in systems], dtype=torch.long)


def _is_divided(sample_names: list[str]) -> bool:
    return (
        "system" in sample_names
        and "atom" not in sample_names
        and ("first_atom" not in sample_names)
    )


def _by_atoms(
    systems: list[System], tensors: Tensors, not_divided: set[str], divide: bool
) -> dict[str, TensorMap]:
    n_atoms: torch.Tensor | None = None
    result: dict[str, TensorMap] = {}
    for name, tensor in tensors.items():
        if name in not_divided or len(tensor) == 0:
            result[name] = tensor
            continue
        names = list(tensor.block_by_id(0).samples.names)
        if not _is_divided(names):
            result[name] = tensor
            continue
        if n_atoms is None:
            n_atoms = _n_atoms(systems)
        blocks = []
        for block in tensor.blocks():
            values = block.values
            counts = n_atoms.to(values.device)[block.samples.column("system").to(torch.long)]
            counts = counts.to(values.dtype)

            def apply(values: torch.Tensor, rows: torch.Tensor) -> torch.Tensor:
                rows = rows.reshape([-1] + [1] * (values.dim() - 1))
                return values / rows if divide else values * rows

            def gradient_values(
                _: str, gradient: TensorBlock, counts: torch.Tensor = counts
            ) -> torch.Tensor:
                gradient_names = list(gradient.samples.names)
                if "atom" in gradient_names or "first_atom" in gradient_names:
                    return gradient.values
                return apply(gradient.values, counts[gradient.samples.values[:, 0].long()])

            blocks.append(rebuild_block(block, apply(values, counts), gradient_values))
        result[name] = TensorMap(tensor.keys, blocks)
    return result


def divide_by_atoms(
    systems: list[System], tensors: Tensors, per_structure_targets: Iterable[str] = ()
) -> dict[str, TensorMap]:
    """Divide per-structure TensorMaps (and their strain-like gradients) by atoms.

    Blocks and gradient blocks whose samples contain neither ``atom`` nor
    ``first_atom`` are divided by the number of atoms of their system (column
    ``system``; gradients through their ``sample`` column); names in
    ``per_structure_targets`` (and their ensemble outputs) are left as they are.
    """
    return _by_atoms(systems, tensors, _not_divided(None, per_structure_targets), True)


def multiply_by_atoms(
    systems: list[System], tensors: Tensors, per_structure_targets: Iterable[str] = ()
) -> dict[str, TensorMap]:
    """The inverse of :func:`divide_by_atoms`."""
    return _by_atoms(systems, tensors, _not_divided(None, per_structure_targets), False)


def targets_for_loss(
    systems: list[System],
    targets: Tensors,
    scaler: torch.nn.Module | None = None,
    composition: torch.nn.Module | None = None,
) -> dict[str, TensorMap]:
    """Physical targets -> loss units: ``(y - baseline) / n_atoms / per-target scale``.

    In: physical, total units (as read from the data). Out: baseline-free, per atom
    where divided, divided by the per-target scales (dimensionless, of order 1).
    """
    if composition is not None:
        targets = composition(systems, targets, remove=True)
    targets = _by_atoms(systems, targets, _not_divided(scaler, None), True)
    if scaler is not None:
        targets = scaler(
            systems,
            targets,
            remove=True,
            use_per_target_scales=True,
            use_per_property_scales=False,
        )
    return dict(targets)


def targets_from_loss(
    systems: list[System],
    targets: Tensors,
    scaler: torch.nn.Module | None = None,
    composition: torch.nn.Module | None = None,
) -> dict[str, TensorMap]:
    """The inverse of :func:`targets_for_loss`: loss units -> physical, total units."""
    if scaler is not None:
        targets = scaler(
            systems,
            targets,
            remove=False,
            use_per_target_scales=True,
            use_per_property_scales=False,
        )
    targets = _by_atoms(systems, targets, _not_divided(scaler, None), False)
    if composition is not None:
        targets = composition(systems, targets, remove=False)
    return dict(targets)


def predictions_for_loss(
    systems: list[System], predictions: Tensors, scaler: torch.nn.Module | None = None
) -> dict[str, TensorMap]:
    """Raw model outputs -> loss units: divided by atoms like the targets.

    In: the raw model output (scaled, baseline-free, total units). Out: per atom where
    divided. The LossModule then multiplies multi-property targets by their
    per-property scales.
    """
    return _by_atoms(systems, predictions, _not_divided(scaler, None), True)


def prepare_for_loss(
    module: torch.nn.Module, systems: list[System], predictions: Tensors, targets: Tensors
) -> tuple[dict[str, TensorMap], dict[str, TensorMap]]:
    """``(predictions_for_loss, targets_for_loss)`` with ``module.scaler`` and
    ``module.composition`` (attributes a :class:`pl_mtt.ScalerCallback` sets; missing
    ones are skipped)."""
    scaler = getattr(module, "scaler", None)
    composition = getattr(module, "composition", None)
    return (
        predictions_for_loss(systems, predictions, scaler),
        targets_for_loss(systems, targets, scaler, composition),
    )


def for_metrics(
    systems: list[System],
    predictions: Tensors,
    targets: Tensors,
    scaler: torch.nn.Module | None = None,
) -> tuple[dict[str, TensorMap], dict[str, TensorMap]]:
    """Loss units -> physical units per atom (where divided), for MAE/RMSE metrics.

    In: ``predictions`` from :func:`predictions_for_loss` and ``targets`` from
    :func:`targets_for_loss`. Out: both in physical units, baseline-free (it cancels in
    differences), per atom where divided: targets multiplied by their per-target scales,
    predictions by per-target x per-property scales (the per-property factor is the one
    the LossModule applies before the loss).
    """
    if scaler is None:
        return dict(predictions), dict(targets)
    predictions = scaler(systems, predictions, remove=False)
    targets = scaler(
        systems, targets, remove=False, use_per_target_scales=True, use_per_property_scales=False
    )
    return predictions, targets


def to_physical(
    systems: list[System],
    predictions: Tensors,
    scaler: torch.nn.Module | None = None,
    composition: torch.nn.Module | None = None,
) -> dict[str, TensorMap]:
    """Inference: raw model outputs -> physical, total units.

    ``raw x full scales + baseline`` (full = per-target x per-property); ensemble outputs
    get both on every member. In: the raw model output; out: the units of the data.
    """
    if scaler is not None:
        predictions = scaler(systems, predictions, remove=False)
    if composition is not None:
        predictions = composition(systems, predictions, remove=False)
    return dict(predictions)
