"""Build the per-structure TensorMaps of the data layer (one structure, ``system`` 0).

Conventions (shared by the whole package):

- per-structure target: samples ``["system"]``, values ``(1, n_properties)``;
- per-atom target: samples ``["system", "atom"]``, values ``(n_atoms, n_properties)``;
- energy: properties ``Labels(["energy"], [[0]])``; other targets ``"properties"``
  ``0..n-1``;
- gradient ``positions``: samples ``["sample", "system", "atom"]``, components
  ``[xyz]``, values ``dE/dr = -forces`` (eV/Å);
- gradient ``strain``: samples ``["sample"]``, components ``[xyz_1, xyz_2]``, values
  ``dE/d(strain) = V * stress = -virial`` (eV), NaN where a structure has no cell.
"""

from __future__ import annotations

import torch
from metatensor.torch import Labels, TensorMap

from pl_mtt.tensormaps.builders import atomistic_tensor_map, range_labels, zero_sample_layout

__all__ = [
    "property_labels",
    "structure_tensor_map",
    "zero_sample_layout",  # re-exported from pl_mtt.tensormaps.builders
]


def property_labels(n_properties: int, energy_like: bool) -> Labels:
    """``energy`` (energy-like targets) or ``properties`` labels ``0..n-1``."""
    return range_labels("energy" if energy_like else "properties", n_properties)


def structure_tensor_map(
    values: torch.Tensor,
    properties: Labels,
    *,
    per_atom: bool = False,
    positions_gradient: torch.Tensor | None = None,
    strain_gradient: torch.Tensor | None = None,
) -> TensorMap:
    """A one-structure TensorMap (``system`` 0) with optional energy gradients.

    Args:
        values: ``(1, P)`` for a per-structure target, ``(n_atoms, P)`` per atom.
        properties: the ``P`` property labels.
        per_atom: samples ``["system", "atom"]`` instead of ``["system"]``.
        positions_gradient: ``(n_atoms, 3, P)``, ``dE/dr`` (= -forces).
        strain_gradient: ``(3, 3, P)`` (or ``(1, 3, 3, P)``), ``dE/d(strain)``.
    """
    n_atoms = values.shape[0] if per_atom else None
    if positions_gradient is not None:
        n_atoms = positions_gradient.shape[0]
    atoms = None if n_atoms is None else torch.arange(n_atoms)
    return atomistic_tensor_map(
        values,
        properties,
        per_atom=per_atom,
        atom_system=None if atoms is None else torch.zeros_like(atoms),
        atom_index=atoms,
        positions_gradient=positions_gradient,
        strain_gradient=None if strain_gradient is None else strain_gradient.reshape(1, 3, 3, -1),
    )
