"""Batch geometry: atoms of all systems concatenated, neighbour pairs, strain handle.

Pairs come from the neighbour list each system carries (``system.get_neighbor_list``,
metatomic's convention: samples ``first_atom, second_atom, cell_shift_a/b/c``, values
the pair vectors). :func:`neighbor_pairs` gathers them for a batch and is TorchScript
code, shared by training and the exported model. In training the data layer attaches
the lists once per structure (:mod:`pl_mtt.tensormaps.neighbors`); :func:`batch_geometry`
computes the missing ones (systems built by hand) and rebuilds the pair vectors
differentiably from positions, cells and the integer cell shifts:

    r_ij = x'_j - x'_i + S_ij · h'      with  x' = x (1 + ε),  h' = h (1 + ε)

where ``ε`` is a zero ``(n_systems, 3, 3)`` strain that requires grad when the strain
gradient is needed: ``dE/dε`` at ``ε = 0`` is then the strain gradient
``dE/d(strain) = V * stress = -virial``. (A simulation engine does the same with the
lists it computes, so the exported model uses the vectors it is given.)
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from metatomic.torch import NeighborListOptions, System

from pl_mtt.tensormaps.block_ops import lazy_script
from pl_mtt.tensormaps.neighbors import attach_neighbor_lists

__all__ = [
    "BatchGeometry",
    "batch_geometry",
    "compiled_neighbor_pairs",
    "geometry_from_pairs",
    "neighbor_pairs",
    "pair_vectors",
    "strained",
    "system_of_atoms",
]


@dataclass
class BatchGeometry:
    """Concatenated atoms and pairs of a batch of systems.

    Attributes:
        types: ``(N,)`` atomic numbers.
        positions: ``(N, 3)`` positions (the tensor to differentiate for forces).
        strain: ``(B, 3, 3)`` zero strain (requires grad) or None.
        atom_system: ``(N,)`` index of each atom's system.
        atom_index: ``(N,)`` index of each atom within its system.
        centers, neighbors: ``(P,)`` atom indices of each pair (as listed by the
            neighbour list: both directions for a full list).
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


def system_of_atoms(systems: list[System]) -> tuple[torch.Tensor, torch.Tensor]:
    """``(atom_system, atom_index)``: system of each atom of the batch and its index in
    that system (``(N,)`` int64 each). TorchScript."""
    device = systems[0].positions.device
    lengths: list[int] = [len(system) for system in systems]
    total = 0
    for length in lengths:
        total += length
    counts = torch.tensor(lengths, device=device)
    atom_system = torch.repeat_interleave(
        torch.arange(len(systems), device=device), counts, output_size=total
    )
    starts = torch.cumsum(counts, 0) - counts
    atom_index = torch.arange(atom_system.shape[0], device=device) - starts[atom_system]
    return atom_system, atom_index


def neighbor_pairs(
    systems: list[System], options: NeighborListOptions
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """The pairs of ``options``' neighbour list over a batch. TorchScript.

    Returns ``(centers, neighbors, cell_shifts, pair_system, vectors)``: atom indices in
    the concatenated batch (``(P,)`` int64), integer cell shifts ``(P, 3)`` and the
    system of each pair (``(P,)`` int64), and the list's pair vectors ``(P, 3)`` as
    the systems carry them. Every system must carry the list.
    """
    samples: list[torch.Tensor] = []
    vectors: list[torch.Tensor] = []
    n_pairs: list[int] = []
    n_atoms: list[int] = []
    total = 0
    for system in systems:  # only gathers each system's tensors
        pairs = system.get_neighbor_list(options)
        values = pairs.samples.values
        samples.append(values)
        vectors.append(pairs.values)
        n_pairs.append(values.shape[0])
        n_atoms.append(len(system))
        total += values.shape[0]
    joined = torch.cat(samples)
    device = joined.device
    pair_system = torch.repeat_interleave(
        torch.arange(len(systems), device=device),
        torch.tensor(n_pairs, device=device),
        output_size=total,
    )
    atoms = torch.tensor(n_atoms, device=device)
    offsets = (torch.cumsum(atoms, 0) - atoms)[pair_system]
    return (
        joined[:, 0].to(torch.int64) + offsets,
        joined[:, 1].to(torch.int64) + offsets,
        joined[:, 2:5],
        pair_system,
        torch.cat(vectors).reshape(-1, 3),
    )


compiled_neighbor_pairs = lazy_script(neighbor_pairs)  # what Python callers call


def batch_geometry(
    systems: list[System],
    cutoff: float | NeighborListOptions,
    *,
    positions_grad: bool,
    strain_grad: bool,
) -> BatchGeometry:
    """Concatenate ``systems`` and gather their pairs (a full list of ``cutoff`` when a
    number is given), with pair vectors rebuilt differentiably from the positions and,
    with ``strain_grad``, a strain. Systems lacking the list get it computed and
    attached (kept for the next call with the same system objects)."""
    if len(systems) == 0:
        raise ValueError("the model needs at least one system")
    options = (
        cutoff
        if isinstance(cutoff, torch.ScriptObject)
        else NeighborListOptions(cutoff=float(cutoff), full_list=True, strict=True)
    )
    attach_neighbor_lists(systems, [options])
    centers, neighbors, shifts, pair_system, _ = compiled_neighbor_pairs(systems, options)
    return geometry_from_pairs(
        systems,
        (centers, neighbors, shifts, pair_system),
        positions_grad=positions_grad,
        strain_grad=strain_grad,
    )


def geometry_from_pairs(
    systems: list[System],
    pairs: tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor],
    *,
    positions_grad: bool,
    strain_grad: bool,
) -> BatchGeometry:
    """The batch geometry of ``systems`` from their pairs ``(centers, neighbors,
    cell_shifts, pair_system)`` (as :func:`neighbor_pairs` returns them): pair vectors
    rebuilt from the positions, the cells and the integer shifts, with a strain when
    ``strain_grad``."""
    centers, neighbors, shifts, pair_system = pairs
    atom_system, atom_index = system_of_atoms(systems)
    positions = torch.cat([system.positions for system in systems])
    cells = torch.stack([system.cell for system in systems])
    if positions_grad and not positions.requires_grad:
        positions = positions.detach().requires_grad_(True)
    strain = None
    displaced, strained_cells = positions, cells
    if strain_grad:
        strain = torch.zeros(
            (len(systems), 3, 3), dtype=positions.dtype, device=positions.device, requires_grad=True
        )
        displaced, strained_cells = strained(positions, cells, strain, atom_system)
    vectors = pair_vectors(displaced, strained_cells, centers, neighbors, shifts, pair_system)
    return BatchGeometry(
        types=torch.cat([system.types for system in systems]),
        positions=positions,
        strain=strain,
        atom_system=atom_system,
        atom_index=atom_index,
        centers=centers,
        neighbors=neighbors,
        vectors=vectors,
        n_systems=len(systems),
    )


def strained(
    positions: torch.Tensor, cells: torch.Tensor, strain: torch.Tensor, atom_system: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """Positions ``(N, 3)`` and cells ``(B, 3, 3)`` under the strain ``(B, 3, 3)`` of
    each atom's system: ``x' = x (1 + ε)``, ``h' = h (1 + ε)``."""
    return (
        positions + torch.einsum("na,nab->nb", positions, strain[atom_system]),
        cells + torch.einsum("sac,scb->sab", cells, strain),
    )


def pair_vectors(
    positions: torch.Tensor,
    cells: torch.Tensor,
    centers: torch.Tensor,
    neighbors: torch.Tensor,
    shifts: torch.Tensor,
    pair_system: torch.Tensor,
) -> torch.Tensor:
    """``(P, 3)`` pair vectors ``x_j - x_i + S_ij · h`` from positions, cells and the
    pairs' integer cell shifts (as :func:`neighbor_pairs` returns them)."""
    return (
        positions[neighbors]
        - positions[centers]
        + torch.einsum("pa,pab->pb", shifts.to(positions.dtype), cells[pair_system])
    )
