"""Write structures and targets back to extended XYZ (the inverse of the reader).

Units and conventions are ase's, so that ``ase.io.read(path).get_forces()`` and
``.get_stress()`` give the physical values back:

- an energy target whose key is ``energy`` with default gradient keys is written as
  calculator results (``energy``, ``forces = -dE/dr`` in eV/Å, ``stress =
  dE/d(strain) / V`` in eV/Å^3), which is what ase and other codes read;
- other targets go to ``info`` (per structure) or ``arrays`` (per atom) under their
  ``key``; forces under their key in ``arrays``; ``virial = -dE/d(strain)`` (eV, a 3x3
  matrix) under its key in ``info`` when the target's options say ``virial``;
- NaN strain gradients (structures without a cell) are not written.

Reading the file with the same target options gives the same TensorMaps back (to the
precision of the file: ase writes per-atom arrays with 8 decimals).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import ase
import ase.io
import numpy as np
from ase.calculators.singlepoint import SinglePointCalculator
from metatensor.torch import TensorMap
from metatomic.torch import System

from pl_mtt.config import is_energy_like, to_plain
from pl_mtt.data.systems import system_to_atoms

__all__ = ["write_extxyz"]


def _gradient_key(options: Mapping[str, Any], option: str) -> str:
    value = options.get(option)
    if isinstance(value, str):
        return value
    if isinstance(value, Mapping) and value.get("key"):
        return str(value["key"])
    return option


def _to_numpy(values) -> np.ndarray:
    return values.detach().cpu().double().numpy()


def _structure_atoms(
    system: System,
    tensors: Mapping[str, TensorMap],
    options: Mapping[str, Mapping[str, Any]],
) -> ase.Atoms:
    atoms = system_to_atoms(system)
    n_atoms = len(atoms)
    results: dict[str, Any] = {}
    for name, tensor_map in tensors.items():
        opts = options.get(name) or {}
        if len(tensor_map) != 1:
            raise ValueError(f"target '{name}': only single-block targets can be written")
        block = tensor_map.block_by_id(0)
        key = str(opts.get("key") or name)
        values = _to_numpy(block.values)
        per_atom = "atom" in block.samples.names
        gradients = block.gradients_list()
        standard = (
            is_energy_like(name, opts)
            and key == "energy"
            and not per_atom
            and _gradient_key(opts, "forces") == "forces"
            and _gradient_key(opts, "stress") == "stress"
            and not opts.get("virial")
        )
        if per_atom:
            atoms.arrays[key] = values[:, 0] if values.shape[1] == 1 else values
        elif standard:
            results["energy"] = float(values[0, 0])
        else:
            atoms.info[key] = float(values[0, 0]) if values.shape[1] == 1 else values[0]

        if "positions" in gradients:
            gradient = block.gradient("positions")
            forces = np.zeros((n_atoms, 3))
            atom = gradient.samples.values[:, gradient.samples.names.index("atom")]
            forces[atom.cpu().numpy()] = -_to_numpy(gradient.values)[:, :, 0]
            if standard:
                results["forces"] = forces
            else:
                atoms.arrays[_gradient_key(opts, "forces")] = forces
        if "strain" in gradients:
            strain = _to_numpy(block.gradient("strain").values).reshape(3, 3)
            if np.isnan(strain).all():
                pass
            elif opts.get("virial"):
                atoms.info[_gradient_key(opts, "virial")] = -strain
            elif standard:
                results["stress"] = strain / abs(atoms.cell.volume)
            else:
                atoms.info[_gradient_key(opts, "stress")] = strain / abs(atoms.cell.volume)
    if results:
        atoms.calc = SinglePointCalculator(atoms, **results)
    return atoms


def write_extxyz(
    path: str | Path,
    systems: Sequence[System],
    targets: Mapping[str, Sequence[TensorMap]] | None = None,
    target_options: Mapping[str, Mapping[str, Any]] | None = None,
) -> None:
    """Write ``systems`` and their per-structure ``targets`` to an extended XYZ file.

    Args:
        path: the output file.
        systems: the structures.
        targets: target name -> one TensorMap per structure (as in ``AtomisticDataset``).
        target_options: target name -> options (``key``, ``quantity``, ``forces``,
            ``stress``, ``virial`` key names...) used to name the written entries.
    """
    targets = targets or {}
    options = to_plain(target_options) or {}
    frames = []
    for index, system in enumerate(systems):
        tensors = {name: values[index] for name, values in targets.items()}
        frames.append(_structure_atoms(system, tensors, options))
    ase.io.write(str(path), frames, format="extxyz")
