"""The embedded ``emt`` dataset: rattled, strained Cu/Au bulk and surface structures.

Structure ``i`` is generated from its own random stream (``seed``, ``i``), so the
first ``n`` structures of a larger set are the same as a set of ``n``. Kinds cycle
over fcc bulk cells (4 to 32 atoms) and (111)/(100) slabs with vacuum (16 atoms, fully
periodic so that every structure has a stress). Each has a random Cu/Au composition,
a lattice constant from Vegard's law, a random strain of up to ±3 % and a rattle of
0.03-0.12 Å. Labels (energy, forces, stress) come from ase's EMT calculator,
computed on positions rounded to the precision of the extxyz file.
"""

from __future__ import annotations

import ase
import ase.build
import numpy as np
from ase.calculators.emt import EMT
from ase.calculators.singlepoint import SinglePointCalculator

__all__ = ["generate_emt_structures", "label_with_emt", "random_alloy_structure"]

LATTICE = {29: 3.61, 79: 4.08}  # fcc lattice constants (Å) of Cu and Au
ELEMENTS = (29, 79)
KINDS = ("bulk_cubic_2x2x2", "bulk_prim_3x3x3", "bulk_cubic_1x1x2", "fcc111", "fcc100")


def _template(kind: str, a: float) -> ase.Atoms:
    if kind == "bulk_cubic_2x2x2":
        return ase.build.bulk("Cu", "fcc", a=a, cubic=True).repeat((2, 2, 2))  # 32 atoms
    if kind == "bulk_prim_3x3x3":
        return ase.build.bulk("Cu", "fcc", a=a).repeat((3, 3, 3))  # 27 atoms
    if kind == "bulk_cubic_1x1x2":
        return ase.build.bulk("Cu", "fcc", a=a, cubic=True).repeat((1, 1, 2))  # 8 atoms
    if kind == "fcc111":
        slab = ase.build.fcc111("Cu", (2, 2, 4), a=a, vacuum=5.0)  # 16 atoms
    else:
        slab = ase.build.fcc100("Cu", (2, 2, 4), a=a, vacuum=5.0)  # 16 atoms
    slab.pbc = True
    return slab


def random_alloy_structure(index: int, seed: int = 0) -> ase.Atoms:
    """Structure ``index``: a strained, rattled Cu/Au cell (no labels)."""
    rng = np.random.default_rng([seed, index])
    kind = KINDS[index % len(KINDS)]
    gold_fraction = float(rng.choice([0.0, 1.0, rng.uniform(0.0, 1.0)], p=[0.2, 0.2, 0.6]))
    a = (1 - gold_fraction) * LATTICE[29] + gold_fraction * LATTICE[79]
    atoms = _template(kind, a)
    numbers = np.where(rng.uniform(size=len(atoms)) < gold_fraction, 79, 29)
    atoms.numbers = numbers
    strain = rng.uniform(-0.03, 0.03, size=(3, 3))
    strain = 0.5 * (strain + strain.T)
    atoms.set_cell(atoms.cell.array @ (np.eye(3) + strain), scale_atoms=True)
    atoms.positions += rng.normal(scale=rng.uniform(0.03, 0.12), size=atoms.positions.shape)
    atoms.wrap()
    atoms.positions = np.round(atoms.positions, 8)  # what the extxyz file keeps
    atoms.info.clear()
    atoms.info["kind"] = kind
    return atoms


def label_with_emt(atoms: ase.Atoms) -> ase.Atoms:
    """Attach EMT energy (eV), forces (eV/Å) and stress (eV/Å^3) as calculator results."""
    atoms.calc = EMT()
    results = {
        "energy": atoms.get_potential_energy(),
        "forces": atoms.get_forces(),
        "stress": atoms.get_stress(),
    }
    atoms.calc = SinglePointCalculator(atoms, **results)
    return atoms


def generate_emt_structures(n_structures: int, seed: int = 0) -> list[ase.Atoms]:
    """``n_structures`` labelled structures (deterministic in ``seed``)."""
    return [label_with_emt(random_alloy_structure(i, seed)) for i in range(n_structures)]
