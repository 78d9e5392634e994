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

:func:`prepare_for_loss` returns mappings whose entries are computed on first access;
the LossModule computes per-structure targets from them without building TensorMaps
(:mod:`pl_mtt.scaling.prepared`).
"""

from __future__ import annotations

import functools
from collections.abc import Iterable, Mapping

import torch
from metatensor.torch import TensorMap
from metatomic.torch import System

from pl_mtt.scaling.prepared import LossUnits, PhysicalUnits, PreparedBatch
from pl_mtt.tensormaps.batch_atoms import BatchAtoms
from pl_mtt.tensormaps.block_ops import transform_map
from pl_mtt.tensormaps.builders import ensemble_output_name

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


def _not_divided(scaler: torch.nn.Module | None, names: Iterable[str] | None) -> frozenset[str]:
    """Names (targets and their ensemble outputs) that are never divided by atoms."""
    if names is None:
        names = getattr(scaler, "per_structure_targets", ()) if scaler is not None else ()
    return _with_ensembles(frozenset(names))


@functools.lru_cache(maxsize=64)
def _with_ensembles(names: frozenset[str]) -> frozenset[str]:
    return names | {ensemble_output_name(name) for name in names}


def _transform(
    systems: list[System],
    tensors: Tensors,
    *,
    divide: bool,
    not_divided: frozenset[str] | None,
    scaler: torch.nn.Module | None = None,
    scaler_factors: tuple[bool, bool] = (True, True),
    composition: torch.nn.Module | None = None,
) -> dict[str, TensorMap]:
    """Baseline, division by atoms (unless ``not_divided`` is None) and scales of every
    TensorMap in one :func:`transform_map` call each: ``divide`` gives
    ``(y - baseline) / (n_atoms x scale)``, else ``y x n_atoms x scale + baseline``."""
    result: dict[str, TensorMap] = {}
    atoms: BatchAtoms | None = None
    for name, tensor in tensors.items():
        shifts = None if composition is None else composition.baselines(systems, name, tensor)
        scales = None
        if scaler is not None:
            scales = scaler.factor_tables(systems, name, tensor, *scaler_factors)
        divided = not_divided is not None and name not in not_divided
        if shifts is None and scales is None and not divided:
            result[name] = tensor
            continue
        if atoms is None:
            atoms = BatchAtoms.of(systems)
        counts = atoms.atom_counts() if divided else None
        new = transform_map(tensor, divide, shifts, scales, counts, atoms.first_atom)
        result[name] = tensor if new is None else new
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
    not_divided = _not_divided(None, per_structure_targets)
    return _transform(systems, tensors, divide=True, not_divided=not_divided)


def multiply_by_atoms(
    systems: list[System], tensors: Tensors, per_structure_targets: Iterable[str] = ()
) -> dict[str, TensorMap]:
    """The inverse of :func:`divide_by_atoms`."""
    not_divided = _not_divided(None, per_structure_targets)
    return _transform(systems, tensors, divide=False, not_divided=not_divided)


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
    return _target_units(systems, targets, scaler, composition, divide=True)


def targets_from_loss(
    systems: list[System],
    targets: Tensors,
    scaler: torch.nn.Module | None = None,
    composition: torch.nn.Module | None = None,
) -> dict[str, TensorMap]:
    """The inverse of :func:`targets_for_loss`: loss units -> physical, total units."""
    return _target_units(systems, targets, scaler, composition, divide=False)


def _target_units(
    systems: list[System],
    targets: Tensors,
    scaler: torch.nn.Module | None,
    composition: torch.nn.Module | None,
    *,
    divide: bool,
) -> dict[str, TensorMap]:
    """Baseline, division by atoms and per-target scales of targets, either way."""
    return _transform(
        systems,
        targets,
        divide=divide,
        not_divided=_not_divided(scaler, None),
        scaler=scaler,
        scaler_factors=(True, False),
        composition=composition,
    )


def predictions_for_loss(
    systems: list[System], predictions: Tensors, scaler: torch.nn.Module | None = None
) -> dict[str, TensorMap]:
    """Raw model outputs -> loss units: divided by atoms like the targets.

    In: the raw model output (scaled, baseline-free, total units). Out: per atom where
    divided. The LossModule then multiplies multi-property targets by their
    per-property scales.
    """
    return _transform(systems, predictions, divide=True, not_divided=_not_divided(scaler, None))


def prepare_for_loss(
    module: torch.nn.Module, systems: list[System], predictions: Tensors, targets: Tensors
) -> tuple[LossUnits, LossUnits]:
    """``(predictions_for_loss, targets_for_loss)`` with ``module.scaler`` and
    ``module.composition`` (attributes a :class:`pl_mtt.ScalerCallback` sets; missing
    ones are skipped), as two mappings whose entries are computed on first access
    (:class:`pl_mtt.scaling.prepared.LossUnits`: same values as the two functions,
    ``dict(...)`` gives plain dicts). The :class:`pl_mtt.LossModule` computes the loss of
    per-structure targets from them without building any TensorMap, and
    :func:`for_metrics` hands its residuals on to the metrics."""
    scaler = getattr(module, "scaler", None)
    composition = getattr(module, "composition", None)
    batch = PreparedBatch(
        systems,
        predictions,
        targets,
        scaler,
        composition,
        not_divided=_not_divided(scaler, None),
        to_loss_units=functools.partial(_loss_units_entry, systems, scaler, composition),
        to_metric_units=functools.partial(_metric_units_entry, systems),
    )
    return (
        LossUnits(batch, "predictions", list(predictions)),
        LossUnits(batch, "targets", list(targets)),
    )


def _loss_units_entry(
    systems: list[System],
    scaler: torch.nn.Module | None,
    composition: torch.nn.Module | None,
    side: str,
    name: str,
    raw: TensorMap,
) -> TensorMap:
    """One entry in loss units, as :func:`prepare_for_loss`'s two functions compute it."""
    if side == "predictions":
        return predictions_for_loss(systems, {name: raw}, scaler)[name]
    return targets_for_loss(systems, {name: raw}, scaler, composition)[name]


def _metric_units_entry(
    systems: list[System],
    side: str,
    name: str,
    tensor: TensorMap,
    scaler: torch.nn.Module | None,
) -> TensorMap:
    """One entry in physical units, as :func:`for_metrics` computes it."""
    if scaler is None:
        return tensor
    factors = (True, True) if side == "predictions" else (True, False)
    return _transform(
        systems,
        {name: tensor},
        divide=False,
        not_divided=None,
        scaler=scaler,
        scaler_factors=factors,
    )[name]


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

    Given the mappings of :func:`prepare_for_loss` (and their scaler), returns
    :class:`pl_mtt.scaling.prepared.PhysicalUnits` mappings: entries computed on first
    access, and the residuals of the fused loss readable by
    :class:`pl_mtt.training.metrics.PhysicalMetrics` without computing any entry.
    """
    if (
        isinstance(predictions, LossUnits)
        and isinstance(targets, LossUnits)
        and predictions.batch is targets.batch
        and scaler is predictions.batch.scaler
    ):
        return PhysicalUnits(predictions, scaler), PhysicalUnits(targets, scaler)
    if scaler is None:
        return dict(predictions), dict(targets)
    return (
        _transform(systems, predictions, divide=False, not_divided=None, scaler=scaler),
        _transform(
            systems,
            targets,
            divide=False,
            not_divided=None,
            scaler=scaler,
            scaler_factors=(True, False),
        ),
    )


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
    return _transform(
        systems,
        predictions,
        divide=False,
        not_divided=None,
        scaler=scaler,
        composition=composition,
    )
