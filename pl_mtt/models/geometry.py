"""Batch geometry: atoms of all systems concatenated, neighbour pairs, strain handle.

Pairs are found with ``vesin`` on detached float64 copies of the positions (one call
per system: vesin works on one system at a time), then the pair vectors are rebuilt
differentiably from positions, cells and integer cell shifts:

    r_ij = x'_j - x'_i + S_ij · h'      with  x' = x (1 + ε),  h' = h (1 + ε)

where ``ε`` is a zero ``(n_systems, 3, 3)`` strain that requires grad when the strain
gradient is needed: ``dE/dε`` at ``ε = 0`` is then the strain gradient
``dE/d(strain) = V * stress = -virial``.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
import vesin
from metatomic.torch import System

__all__ = ["BatchGeometry", "batch_geometry"]


@dataclass
class BatchGeometry:
    """Concatenated atoms and pairs of a batch of systems.

    Attributes:
        types: ``(N,)`` atomic numbers.
        positions: ``(N, 3)`` positions (the tensor to differentiate for forces).
        strain: ``(B, 3, 3)`` zero strain (requires grad) or None.
        atom_system: ``(N,)`` index of each atom's system.
        atom_index: ``(N,)`` index of each atom within its system.
        centers, neighbors: ``(P,)`` atom indices of each (directed) pair.
        vectors: ``(P, 3)`` pair vectors ``r_j - r_i`` (differentiable).
        n_systems: ``B``.
    """

    types: torch.Tensor
    positions: torch.Tensor
    strain: torch.Tensor | None
    atom_system: torch.Tensor
    atom_index: torch.Tensor
    centers: torch.Tensor
    neighbors: torch.Tensor
    vectors: torch.Tensor
    n_systems: int


def _pairs(system: System, calculator: vesin.NeighborList) -> tuple[np.ndarray, ...]:
    positions = system.positions.detach().cpu().to(torch.float64).numpy()
    cell = system.cell.detach().cpu().to(torch.float64).numpy()
    periodic = system.pbc.detach().cpu().numpy().tolist()
    return calculator.compute(positions, cell, periodic, quantities="ijS")


def batch_geometry(
    systems: list[System], cutoff: float, *, positions_grad: bool, strain_grad: bool
) -> BatchGeometry:
    """Concatenate ``systems`` and find their pairs within ``cutoff`` (full list)."""
    if len(systems) == 0:
        raise ValueError("the model needs at least one system")
    device, dtype = systems[0].positions.device, systems[0].positions.dtype
    calculator = vesin.NeighborList(cutoff=cutoff, full_list=True)
    counts = [len(system) for system in systems]
    offsets = np.cumsum([0, *counts[:-1]])
    centers, neighbors, shifts, pair_system = [], [], [], []
    for index, system in enumerate(systems):
        i, j, s = _pairs(system, calculator)
        centers.append(i.astype(np.int64) + offsets[index])
        neighbors.append(j.astype(np.int64) + offsets[index])
        shifts.append(s)
        pair_system.append(np.full(len(i), index, dtype=np.int64))

    def to_tensor(arrays: list[np.ndarray], kind: torch.dtype) -> torch.Tensor:
        return torch.from_numpy(np.concatenate(arrays)).to(device=device, dtype=kind)

    centers_t = to_tensor(centers, torch.int64)
    neighbors_t = to_tensor(neighbors, torch.int64)
    shifts_t = to_tensor(shifts, dtype).reshape(-1, 3)
    pair_system_t = to_tensor(pair_system, torch.int64)
    atom_system = torch.cat(
        [torch.full((n,), i, dtype=torch.int64, device=device) for i, n in enumerate(counts)]
    )
    atom_index = torch.cat([torch.arange(n, device=device) for n in counts])

    positions = torch.cat([system.positions for system in systems])
    cells = torch.stack([system.cell for system in systems])
    if positions_grad and not positions.requires_grad:
        positions = positions.detach().requires_grad_(True)
    strain = None
    displaced, strained_cells = positions, cells
    if strain_grad:
        strain = torch.zeros((len(systems), 3, 3), dtype=dtype, device=device, requires_grad=True)
        displaced = positions + torch.einsum("na,nab->nb", positions, strain[atom_system])
        strained_cells = cells + torch.einsum("sac,scb->sab", cells, strain)
    vectors = (
        displaced[neighbors_t]
        - displaced[centers_t]
        + torch.einsum("pa,pab->pb", shifts_t, strained_cells[pair_system_t])
    )
    return BatchGeometry(
        types=torch.cat([system.types for system in systems]),
        positions=positions,
        strain=strain,
        atom_system=atom_system,
        atom_index=atom_index,
        centers=centers_t,
        neighbors=neighbors_t,
        vectors=vectors,
        n_systems=len(systems),
    )
