"""Forces of ``pl_mtt.calculator(MODEL)`` against central finite differences of its
energy, in a process that imported nothing else (prints the largest difference).

    python calculator_forces.py MODEL.pt
"""

import sys

import ase.build
import numpy as np

import pl_mtt


def main() -> None:
    calculator = pl_mtt.calculator(sys.argv[1])
    atoms = ase.build.bulk("Cu", "fcc", a=3.6, cubic=True) * (2, 1, 1)
    atoms.numbers[[1, 5]] = 79
    atoms.rattle(0.05, seed=1)
    atoms.calc = calculator
    forces = atoms.get_forces()

    def energy(positions: np.ndarray) -> float:
        moved = atoms.copy()
        moved.positions = positions
        moved.calc = calculator
        return moved.get_potential_energy()

    h, errors = 1e-4, []
    for atom in (0, 1):
        for xyz in range(3):
            plus, minus = atoms.positions.copy(), atoms.positions.copy()
            plus[atom, xyz] += h
            minus[atom, xyz] -= h
            numeric = -(energy(plus) - energy(minus)) / (2 * h)
            errors.append(abs(numeric - forces[atom, xyz]))
    print(max(errors), np.abs(forces).max())


if __name__ == "__main__":
    main()
