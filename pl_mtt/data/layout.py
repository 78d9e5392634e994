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
from metatensor.torch import Labels, TensorBlock, TensorMap

__all__ = [
    "property_labels",
    "structure_tensor_map",
    "zero_sample_layout",
]


def _range_labels(name: str, n: int) -> Labels:
    return Labels([name], torch.arange(n, dtype=torch.int32).reshape(-1, 1))


XYZ = _range_labels("xyz", 3)
XYZ_1 = _range_labels("xyz_1", 3)
XYZ_2 = _range_labels("xyz_2", 3)


def property_labels(n_properties: int, energy_like: bool) -> Labels:
    """``energy`` (energy-like targets) or ``properties`` labels ``0..n-1``."""
    return _range_labels("energy" if energy_like else "properties", n_properties)


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
    n_rows = values.shape[0]
    if per_atom:
        atoms = torch.arange(n_rows, dtype=torch.int32).reshape(-1, 1)
        samples = Labels(["system", "atom"], torch.cat([torch.zeros_like(atoms), atoms], dim=1))
    else:
        samples = Labels(["system"], torch.zeros((1, 1), dtype=torch.int32))
    block = TensorBlock(values, samples, [], properties)
    if positions_gradient is not None:
        n_atoms = positions_gradient.shape[0]
        atoms = torch.arange(n_atoms, dtype=torch.int32).reshape(-1, 1)
        zeros = torch.zeros_like(atoms)
        block.add_gradient(
            "positions",
            TensorBlock(
                positions_gradient,
                Labels(
                    ["sample", "system", "atom"],
                    torch.cat([zeros, zeros, atoms], dim=1),
                    assume_unique=True,
                ),
                [XYZ],
                properties,
            ),
        )
    if strain_gradient is not None:
        block.add_gradient(
            "strain",
            TensorBlock(
                strain_gradient.reshape(1, 3, 3, -1),
                Labels(["sample"], torch.zeros((1, 1), dtype=torch.int32)),
                [XYZ_1, XYZ_2],
                properties,
            ),
        )
    return TensorMap(Labels.single(), [block])


def _empty_like_block(block: TensorBlock) -> TensorBlock:
    samples = Labels(
        block.samples.names,
        torch.zeros((0, len(block.samples.names)), dtype=torch.int32),
    )
    values = block.values[:0].detach().clone()
    return TensorBlock(values, samples, block.components, block.properties)


def zero_sample_layout(tensor_map: TensorMap) -> TensorMap:
    """A copy of ``tensor_map``'s metadata with no samples (gradient blocks included).

    This is the ``layouts`` entry that describes a target to the ``Scaler``.
    """
    blocks = []
    for block in tensor_map.blocks():
        new = _empty_like_block(block)
        for name, gradient in block.gradients():
            new.add_gradient(name, _empty_like_block(gradient))
        blocks.append(new)
    return TensorMap(tensor_map.keys, blocks)
