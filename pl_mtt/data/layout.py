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

from functools import lru_cache
from typing import Optional

import torch
from metatensor.torch import Labels, TensorBlock, TensorMap

from pl_mtt.tensormaps.block_ops import lazy_script
from pl_mtt.tensormaps.builders import atomistic_tensor_map, range_labels, zero_sample_layout

__all__ = [
    "item_labels",
    "property_labels",
    "shared_item_labels",
    "structure_tensor_map",
    "zero_sample_layout",  # re-exported from pl_mtt.tensormaps.builders
]


def property_labels(n_properties: int, energy_like: bool) -> Labels:
    """``energy`` (energy-like targets) or ``properties`` labels ``0..n-1``."""
    return item_labels("energy" if energy_like else "properties", n_properties)


@lru_cache(maxsize=4096)
def item_labels(kind: str, n: int) -> Labels:
    """The CPU Labels every structure of ``n`` atoms (or properties) shares, built once
    (each construction is a TorchScript call) and never modified: ``"atoms"`` (per-atom
    samples ``system, atom``), ``"positions"`` (gradient samples ``sample, system,
    atom``), or ``Labels([kind], 0..n-1)``."""
    if kind == "atoms":  # per-atom samples [system, atom]
        atoms = torch.arange(n, dtype=torch.int32)
        return Labels(["system", "atom"], torch.stack([atoms * 0, atoms], 1), assume_unique=True)
    if kind == "positions":  # positions gradient samples [sample, system, atom]
        atoms = torch.arange(n, dtype=torch.int32)
        zeros = atoms * 0
        values = torch.stack([zeros, zeros, atoms], 1)
        return Labels(["sample", "system", "atom"], values, assume_unique=True)
    return range_labels(kind, n)


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
    if values.device.type != "cpu":
        return _device_tensor_map(values, properties, per_atom, positions_gradient, strain_gradient)
    if per_atom:
        samples = item_labels("atoms", values.shape[0])
    else:
        if values.shape[0] != 1:
            raise ValueError(
                f"a per-structure target has one row of values, got shape {tuple(values.shape)}"
            )
        samples = item_labels("system", 1)
    n_atoms = 0 if positions_gradient is None else positions_gradient.shape[0]
    return _one_block_map(
        values,
        samples,
        properties,
        positions_gradient,
        item_labels("positions", n_atoms),
        None if strain_gradient is None else strain_gradient.reshape(1, 3, 3, -1),
        shared_item_labels(),
    )


@lru_cache(maxsize=1)
def shared_item_labels() -> list[Labels]:
    """``[_, sample, xyz, xyz_1, xyz_2, system]`` labels shared by every structure."""
    pairs = (("_", 1), ("sample", 1), ("xyz", 3), ("xyz_1", 3), ("xyz_2", 3), ("system", 1))
    return [item_labels(name, n) for name, n in pairs]


@lazy_script
def _one_block_map(
    values: torch.Tensor,
    samples: Labels,
    properties: Labels,
    positions_gradient: Optional[torch.Tensor],  # noqa: UP045 (TorchScript)
    positions_samples: Labels,
    strain_gradient: Optional[torch.Tensor],  # noqa: UP045 (TorchScript)
    shared: list[Labels],
) -> TensorMap:
    """One TorchScript call builds the block, its gradients and the map."""
    block = TensorBlock(values, samples, [], properties)
    if positions_gradient is not None:
        block.add_gradient(
            "positions",
            TensorBlock(positions_gradient, positions_samples, [shared[2]], properties),
        )
    if strain_gradient is not None:
        block.add_gradient(
            "strain", TensorBlock(strain_gradient, shared[1], [shared[3], shared[4]], properties)
        )
    return TensorMap(shared[0], [block])


def _device_tensor_map(
    values: torch.Tensor,
    properties: Labels,
    per_atom: bool,
    positions_gradient: torch.Tensor | None,
    strain_gradient: torch.Tensor | None,
) -> TensorMap:
    n_atoms = values.shape[0] if per_atom else None
    if positions_gradient is not None:
        n_atoms = positions_gradient.shape[0]
    atoms = None if n_atoms is None else torch.arange(n_atoms, device=values.device)
    return atomistic_tensor_map(
        values,
        properties,
        per_atom=per_atom,
        atom_system=None if atoms is None else torch.zeros_like(atoms),
        atom_index=atoms,
        positions_gradient=positions_gradient,
        strain_gradient=None if strain_gradient is None else strain_gradient.reshape(1, 3, 3, -1),
    )
