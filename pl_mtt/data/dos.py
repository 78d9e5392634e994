"""The embedded ``dos`` dataset: tight-binding densities of states with masks.

Structures are the Cu/Au cells of :mod:`pl_mtt.data.emt`. Each has one s orbital per
atom (on-site energy per element, hopping ``-t0 exp(-beta (r - r0))`` with a smooth
cutoff, Γ point of the periodic cell); its DOS is the sum of Gaussians (width
``DOS_SIGMA``) at the eigenvalues, on a grid of spacing ``DOS_GRID_SPACING`` (0.05 eV),
in states/eV (extensive: it integrates to the number of states included).

Two difficulties of real DOS data are built in:

- energy references: the DOS of structure ``i`` is reported relative to its own
  reference, shifted by ``s_i`` grid points (``0 <= s_i <= DOS_EXTRA_TARGETS``), so a
  model predicting ``n + DOS_EXTRA_TARGETS`` points on the common grid matches the
  target at ``prediction[s_i : s_i + n]`` (what the ``masked_dos`` loss searches);
- truncation: some structures include only their lowest eigenvalues (as a DFT run with
  few empty bands); their DOS is wrong above the highest included eigenvalue, and the
  mask ``mtt::dos_mask`` (1 = trusted) is 0 there (from 4 sigma below it).
"""

from __future__ import annotations

import ase
import numpy as np
import torch
from ase.neighborlist import neighbor_list
from metatensor.torch import Labels, TensorBlock, TensorMap

from pl_mtt.data.emt import random_alloy_structure

__all__ = [
    "DOS_EXTRA_TARGETS",
    "DOS_GRID_SPACING",
    "DOS_N_POINTS",
    "DOS_SIGMA",
    "dos_energy_grid",
    "generate_dos_structures",
    "mask_tensor_map",
    "tight_binding_eigenvalues",
]

DOS_GRID_SPACING = 0.05  # eV
DOS_EXTRA_TARGETS = 20  # extra points the model predicts (the largest reference shift)
DOS_SIGMA = 0.2  # Gaussian broadening (eV)
DOS_E_MIN = -4.7  # first point of the model's grid (eV, common reference)
DOS_N_POINTS = 130  # points of a target (the model predicts DOS_N_POINTS + extra)

ONSITE = {29: 0.0, 79: -0.6}  # eV
HOPPING_T0 = 0.5  # eV at r0
HOPPING_R0 = 2.55  # Å
HOPPING_BETA = 1.5  # 1/Å
HOPPING_CUTOFF = 4.5  # Å


def dos_energy_grid(n_points: int = DOS_N_POINTS + DOS_EXTRA_TARGETS) -> torch.Tensor:
    """The model's energy grid (common reference), float64, eV."""
    return DOS_E_MIN + DOS_GRID_SPACING * torch.arange(n_points, dtype=torch.float64)


def tight_binding_eigenvalues(atoms: ase.Atoms) -> np.ndarray:
    """Sorted Γ-point eigenvalues (eV) of the s-orbital tight-binding Hamiltonian."""
    i, j, d = neighbor_list("ijd", atoms, HOPPING_CUTOFF)
    smooth = 0.5 * (np.cos(np.pi * d / HOPPING_CUTOFF) + 1.0)
    hopping = -HOPPING_T0 * np.exp(-HOPPING_BETA * (d - HOPPING_R0)) * smooth
    hamiltonian = np.diag([ONSITE[int(z)] for z in atoms.numbers]).astype(np.float64)
    np.add.at(hamiltonian, (i, j), hopping)
    return np.linalg.eigvalsh(0.5 * (hamiltonian + hamiltonian.T))


def _broadened(eigenvalues: np.ndarray, energies: np.ndarray) -> np.ndarray:
    diff = energies[:, None] - eigenvalues[None, :]
    gauss = np.exp(-0.5 * (diff / DOS_SIGMA) ** 2) / (DOS_SIGMA * np.sqrt(2 * np.pi))
    return gauss.sum(axis=1)


def generate_dos_structures(n_structures: int, seed: int = 0) -> tuple[list[ase.Atoms], np.ndarray]:
    """Structures with ``info["dos"]`` (``DOS_N_POINTS`` values) and their masks.

    Returns ``(frames, masks)`` with ``masks`` of shape ``(n_structures, DOS_N_POINTS)``;
    ``info["dos_shift"]`` holds each structure's reference shift in grid points and
    ``info["dos_n_states"]`` the number of eigenvalues included.
    """
    frames, masks = [], []
    for index in range(n_structures):
        atoms = random_alloy_structure(index, seed)
        rng = np.random.default_rng([seed, index, 1])
        eigenvalues = tight_binding_eigenvalues(atoms)
        shift = int(rng.integers(0, DOS_EXTRA_TARGETS + 1))
        # energies of this target's points on the common reference
        energies = DOS_E_MIN + DOS_GRID_SPACING * (shift + np.arange(DOS_N_POINTS))
        n_states = len(eigenvalues)
        mask = np.ones(DOS_N_POINTS)
        if rng.uniform() < 0.5:
            n_states = int(np.ceil(rng.uniform(0.5, 0.9) * len(eigenvalues)))
            mask = (energies < eigenvalues[n_states - 1] - 4 * DOS_SIGMA).astype(np.float64)
        atoms.info["dos"] = _broadened(eigenvalues[:n_states], energies)
        atoms.info["dos_shift"] = shift
        atoms.info["dos_n_states"] = n_states
        frames.append(atoms)
        masks.append(mask)
    return frames, np.array(masks)


def mask_tensor_map(masks: np.ndarray) -> TensorMap:
    """The ``mtt::dos_mask`` TensorMap of a whole dataset (samples ``system`` = index)."""
    n_structures, n_points = masks.shape
    block = TensorBlock(
        torch.from_numpy(np.ascontiguousarray(masks, dtype=np.float64)),
        Labels(["system"], torch.arange(n_structures, dtype=torch.int32).reshape(-1, 1)),
        [],
        Labels(["properties"], torch.arange(n_points, dtype=torch.int32).reshape(-1, 1)),
    )
    return TensorMap(Labels.single(), [block])
