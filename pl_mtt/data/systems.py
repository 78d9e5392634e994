"""Structures: ``ase.io.read`` -> ``ase.Atoms`` -> ``metatomic.torch.System``.

Positions and cells are in Å (ase's units). A cell vector along a non-periodic
direction is set to zero, as ``metatomic`` requires (an ``ase.Atoms`` may carry a cell
vector that is not periodic, e.g. a slab's vacuum height with ``pbc=[T, T, F]``).
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import ase
import ase.io
import numpy as np
import torch
from metatomic.torch import System

__all__ = ["atoms_to_system", "read_atoms", "system_to_atoms", "system_volume"]


def read_atoms(path: str | Path) -> list[ase.Atoms]:
    """All frames of ``path`` (any format ``ase.io.read`` understands).

    Raises ``ValueError`` naming the path when the file is missing, unreadable or
    holds no structure.
    """
    path = Path(path)
    if not path.is_file():
        raise ValueError(f"structure file '{path}' does not exist")
    try:
        frames = ase.io.read(path, index=":")
    except Exception as error:  # ase raises many exception types for bad files
        raise ValueError(
            f"could not read structures from '{path}' with ase.io.read: "
            f"{type(error).__name__}: {error}"
        ) from error
    if isinstance(frames, ase.Atoms):
        frames = [frames]
    if len(frames) == 0:
        raise ValueError(f"structure file '{path}' contains no structures")
    return list(frames)


def atoms_to_system(atoms: ase.Atoms, dtype: torch.dtype = torch.float64) -> System:
    """One ``ase.Atoms`` -> ``metatomic.torch.System`` (types, positions, cell, pbc)."""
    pbc = np.asarray(atoms.pbc, dtype=bool)
    cell = np.array(atoms.cell.array, dtype=np.float64)
    cell[~pbc] = 0.0
    return System(
        types=torch.from_numpy(np.asarray(atoms.numbers, dtype=np.int32)),
        positions=torch.from_numpy(np.asarray(atoms.positions, dtype=np.float64)).to(dtype),
        cell=torch.from_numpy(cell).to(dtype),
        pbc=torch.from_numpy(pbc),
    )


def system_to_atoms(system: System) -> ase.Atoms:
    """``metatomic.torch.System`` -> ``ase.Atoms`` (float64, on the CPU)."""
    return ase.Atoms(
        numbers=system.types.detach().cpu().numpy(),
        positions=system.positions.detach().cpu().double().numpy(),
        cell=system.cell.detach().cpu().double().numpy(),
        pbc=system.pbc.detach().cpu().numpy(),
    )


def system_volume(system: System) -> float:
    """Cell volume in Å^3 of a fully periodic system, 0.0 otherwise."""
    if not bool(system.pbc.all()):
        return 0.0
    return float(abs(torch.linalg.det(system.cell.detach().double())))


def systems_from_atoms(frames: Sequence[ase.Atoms], dtype: torch.dtype) -> list[System]:
    """``atoms_to_system`` over frames."""
    return [atoms_to_system(atoms, dtype) for atoms in frames]
