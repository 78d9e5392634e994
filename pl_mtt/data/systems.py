"""Structures: ``ase.io.read`` -> ``ase.Atoms`` -> ``metatomic.torch.System``.

Positions and cells are in Å (ase's units). A cell vector along a non-periodic
direction is set to zero, as ``metatomic`` requires (an ``ase.Atoms`` may carry a cell
vector that is not periodic, e.g. a slab's vacuum height with ``pbc=[T, T, F]``).
"""

from __future__ import annotations

import itertools
from collections.abc import Sequence
from pathlib import Path

import ase
import ase.io
import numpy as np
import torch
from metatomic.torch import System

__all__ = [
    "atoms_to_system",
    "read_atoms",
    "system_to_atoms",
    "system_volume",
    "xyz_layout_problem",
]


XYZ_SUFFIXES = (".xyz", ".extxyz")


def read_atoms(path: str | Path) -> list[ase.Atoms]:
    """All frames of ``path`` (any format ``ase.io.read`` understands).

    Raises ``ValueError`` naming the path when the file is missing, unreadable or
    holds no structure, and, for (ext)xyz files, naming the frame where the file ends
    early (a truncated last frame).
    """
    path = Path(path)
    if not path.is_file():
        raise ValueError(f"structure file '{path}' does not exist")
    is_xyz = path.suffix.lower() in XYZ_SUFFIXES
    try:
        frames = ase.io.read(path, index=":")
    except Exception as error:  # ase raises many exception types for bad files
        problem = xyz_layout_problem(path) if is_xyz else None
        raise ValueError(
            problem
            or f"could not read structures from '{path}' with ase.io.read: "
            f"{type(error).__name__}: {error}"
        ) from error
    if isinstance(frames, ase.Atoms):
        frames = [frames]
    if len(frames) == 0:
        raise ValueError(f"structure file '{path}' contains no structures")
    if is_xyz:
        problem = xyz_layout_problem(path, len(frames))
        if problem:
            raise ValueError(problem)
    return list(frames)


def xyz_layout_problem(path: str | Path, frames_read: int | None = None) -> str | None:
    """What is wrong with the frame layout of an (ext)xyz file, or None.

    Each frame is a line with the number of atoms, a comment line and one line per
    atom. A file cut inside its last frame (too few atom lines, or a last atom line
    with fewer columns than the frame's first) is reported with the frame's number and
    first line, as is a frame count that differs from ``frames_read`` (what ase
    returned). A count line that is not an integer is left to ase's own error.
    """
    frames = 0
    line_number = 0
    with open(path, encoding="utf-8", errors="replace") as handle:
        for line in handle:
            line_number += 1
            if not line.strip():
                continue  # blank lines between or after frames
            try:
                n_atoms = int(line)
            except ValueError:
                return None
            start = line_number
            comment = handle.readline()
            atoms = list(itertools.islice(handle, n_atoms))
            line_number += 1 + len(atoms)
            frames += 1
            where = f"structure file '{path}' ends inside frame {frames} (index {frames - 1})"
            if not comment or len(atoms) < n_atoms:
                return (
                    f"{where}, which starts at line {start}: it announces {n_atoms} atoms, "
                    f"the file has {len(atoms)} atom lines left; the file looks truncated"
                )
            if n_atoms and len(atoms[-1].split()) < len(atoms[0].split()):
                return (
                    f"{where}: its last atom line (line {line_number}) has "
                    f"{len(atoms[-1].split())} columns, its first {len(atoms[0].split())}; "
                    f"the file looks truncated"
                )
    if frames_read is not None and frames != frames_read:
        return (
            f"structure file '{path}' has {frames} frames but ase.io.read returned "
            f"{frames_read} structures"
        )
    return None


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
