"""Synthetic atomistic data for the scaler tests, benchmark and DDP scripts.

Random structures carry raw per-structure tensors; :func:`collate` turns a list of them
into a ``(systems, targets, extra_data)`` batch with the project's conventions (sample
column ``system`` = position in the batch). Targets:

- ``energy``: per-structure, gradients ``positions`` and ``strain``;
- ``mtt::charge``: per-atom scalar;
- ``mtt::multi``: per-atom, 3 blocks (``o3_lambda`` 0, 1, 2 with 1, 3, 5 components) x
  8 properties, with a mask ``mtt::multi_mask``;
- ``mtt::dos``: per-structure, one block of ``N_DOS`` points;
- ``mtt::pair``: atom pairs (never fitted);
- ``mtt::typed``: per-atom, blocks keyed by ``atom_type`` (1 property each).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from metatensor.torch import Labels, TensorBlock, TensorMap
from metatomic.torch import System

N_DOS = 6
N_MULTI = 8
LAMBDAS = (0, 1, 2)
ALL_TARGETS = ("energy", "mtt::charge", "mtt::multi", "mtt::dos", "mtt::pair", "mtt::typed")


@dataclass
class Structure:
    types: torch.Tensor
    positions: torch.Tensor
    cell: torch.Tensor
    energy: torch.Tensor  # [1]
    forces: torch.Tensor  # dE/dr [n, 3]
    strain: torch.Tensor  # dE/de [3, 3]
    charge: torch.Tensor  # [n, 1]
    multi: list[torch.Tensor] = field(default_factory=list)  # [n, 2l+1, 8]
    multi_mask: list[torch.Tensor] = field(default_factory=list)
    dos: torch.Tensor | None = None  # [N_DOS]
    pair: torch.Tensor | None = None  # [n_pairs, 1]
    typed: torch.Tensor | None = None  # [n, 1]


def random_structures(
    n: int,
    atomic_types: list[int],
    *,
    seed: int = 0,
    n_atoms: tuple[int, int] = (2, 9),
    energy_per_type: dict[int, float] | None = None,
    energy_noise: float = 0.5,
    nan_fraction: float = 0.0,
    mask_fraction: float = 0.0,
    max_types_per_structure: int | None = None,
    dtype: torch.dtype = torch.float64,
) -> list[Structure]:
    """``n`` random structures whose targets have per-type means and scales."""
    g = torch.Generator().manual_seed(seed)
    types_t = torch.tensor(atomic_types)
    n_types = len(atomic_types)
    if energy_per_type is None:
        energy_per_type = {t: float(torch.randn(1, generator=g) * 3) for t in atomic_types}
    charge_mean = torch.randn(n_types, generator=g, dtype=dtype)
    charge_scale = 0.1 + torch.rand(n_types, generator=g, dtype=dtype)
    multi_mean0 = torch.randn(n_types, N_MULTI, generator=g, dtype=dtype)
    multi_scale = [
        0.1 + 3 * torch.rand(n_types, N_MULTI, generator=g, dtype=dtype) for _ in LAMBDAS
    ]
    structures = []
    for _ in range(n):
        size = int(torch.randint(n_atoms[0], n_atoms[1], (1,), generator=g))
        if max_types_per_structure is not None:
            subset = torch.randperm(n_types, generator=g)[:max_types_per_structure]
            index = subset[torch.randint(0, len(subset), (size,), generator=g)]
        else:
            index = torch.randint(0, n_types, (size,), generator=g)
        types = types_t[index].to(torch.int32)
        positions = torch.rand(size, 3, generator=g, dtype=dtype) * 5
        cell = torch.eye(3, dtype=dtype) * 5
        per_type = torch.tensor([energy_per_type[int(t)] for t in types], dtype=dtype)
        energy = per_type.sum() + energy_noise * torch.randn(1, generator=g, dtype=dtype)
        forces = torch.randn(size, 3, generator=g, dtype=dtype)
        strain = torch.randn(3, 3, generator=g, dtype=dtype) * size
        charge = (charge_mean[index] + charge_scale[index] * torch.randn(size, generator=g)).to(
            dtype
        )[:, None]
        multi, masks = [], []
        for b, lam in enumerate(LAMBDAS):
            values = torch.randn(size, 2 * lam + 1, N_MULTI, generator=g, dtype=dtype)
            values = values * multi_scale[b][index][:, None, :]
            if lam == 0:
                values = values + multi_mean0[index][:, None, :]
            if nan_fraction > 0:
                nan = torch.rand(values.shape, generator=g) < nan_fraction
                values = torch.where(nan, torch.full_like(values, float("nan")), values)
            multi.append(values)
            keep = (torch.rand(values.shape, generator=g) >= mask_fraction).to(dtype)
            masks.append(keep)
        dos = torch.randn(N_DOS, generator=g, dtype=dtype) * torch.arange(1, N_DOS + 1)
        pair = torch.randn(size, 1, generator=g, dtype=dtype)
        typed = (charge_mean[index] * 2 + torch.randn(size, generator=g)).to(dtype)[:, None]
        structures.append(
            Structure(
                types,
                positions,
                cell,
                energy,
                forces,
                strain,
                charge,
                multi,
                masks,
                dos,
                pair,
                typed,
            )
        )
    return structures


def _labels(names: list[str], values) -> Labels:
    return Labels(names, torch.as_tensor(values, dtype=torch.int32).reshape(-1, len(names)))


def _energy_properties() -> Labels:
    return _labels(["energy"], [[0]])


def collate(
    structures: list[Structure],
    targets: tuple[str, ...] = ("energy", "mtt::charge", "mtt::multi"),
    *,
    gradients: bool = True,
    atomic_types: list[int] | None = None,
) -> tuple[list[System], dict[str, TensorMap], dict[str, TensorMap]]:
    """A batch ``(systems, targets, extra_data)`` of ``structures``."""
    systems = [
        System(
            types=s.types,
            positions=s.positions,
            cell=s.cell,
            pbc=torch.tensor([True, True, True]),
        )
        for s in structures
    ]
    sizes = torch.tensor([len(s.types) for s in structures])
    system_of_atom = torch.repeat_interleave(torch.arange(len(structures)), sizes)
    atom_index = torch.cat([torch.arange(n) for n in sizes.tolist()])
    atom_samples = _labels(["system", "atom"], torch.stack([system_of_atom, atom_index], 1))
    structure_samples = _labels(["system"], torch.arange(len(structures))[:, None])
    out: dict[str, TensorMap] = {}
    extra: dict[str, TensorMap] = {}
    if "energy" in targets:
        block = TensorBlock(
            torch.cat([s.energy for s in structures])[:, None],
            structure_samples,
            [],
            _energy_properties(),
        )
        if gradients:
            block.add_gradient(
                "positions",
                TensorBlock(
                    torch.cat([s.forces for s in structures])[:, :, None],
                    _labels(
                        ["sample", "system", "atom"],
                        torch.stack([system_of_atom, system_of_atom, atom_index], 1),
                    ),
                    [_labels(["xyz"], [[0], [1], [2]])],
                    _energy_properties(),
                ),
            )
            block.add_gradient(
                "strain",
                TensorBlock(
                    torch.stack([s.strain for s in structures])[:, :, :, None],
                    _labels(["sample"], torch.arange(len(structures))[:, None]),
                    [_labels(["xyz_1"], [[0], [1], [2]]), _labels(["xyz_2"], [[0], [1], [2]])],
                    _energy_properties(),
                ),
            )
        out["energy"] = TensorMap(Labels.single(), [block])
    if "mtt::charge" in targets:
        out["mtt::charge"] = TensorMap(
            Labels.single(),
            [
                TensorBlock(
                    torch.cat([s.charge for s in structures]),
                    atom_samples,
                    [],
                    _labels(["charge"], [[0]]),
                )
            ],
        )
    if "mtt::multi" in targets:
        blocks, masks = [], []
        for b, lam in enumerate(LAMBDAS):
            components = [_labels(["o3_mu"], torch.arange(-lam, lam + 1)[:, None])]
            properties = _labels(["n"], torch.arange(N_MULTI)[:, None])
            values = torch.cat([s.multi[b] for s in structures])
            mask = torch.cat([s.multi_mask[b] for s in structures])
            blocks.append(TensorBlock(values, atom_samples, components, properties))
            masks.append(TensorBlock(mask, atom_samples, components, properties))
        keys = _labels(["o3_lambda", "o3_sigma"], [[lam, 1] for lam in LAMBDAS])
        out["mtt::multi"] = TensorMap(keys, blocks)
        extra["mtt::multi_mask"] = TensorMap(keys, masks)
    if "mtt::dos" in targets:
        out["mtt::dos"] = TensorMap(
            Labels.single(),
            [
                TensorBlock(
                    torch.stack([s.dos for s in structures]),
                    structure_samples,
                    [],
                    _labels(["point"], torch.arange(N_DOS)[:, None]),
                )
            ],
        )
    if "mtt::pair" in targets:
        pair_samples = _labels(
            ["system", "first_atom", "second_atom", "cell_shift_a", "cell_shift_b", "cell_shift_c"],
            torch.stack(
                [system_of_atom, atom_index, atom_index] + [torch.zeros_like(atom_index)] * 3,
                1,
            ),
        )
        out["mtt::pair"] = TensorMap(
            Labels.single(),
            [
                TensorBlock(
                    torch.cat([s.pair for s in structures]),
                    pair_samples,
                    [],
                    _labels(["p"], [[0]]),
                )
            ],
        )
    if "mtt::typed" in targets:
        if atomic_types is None:
            raise ValueError("mtt::typed needs atomic_types (one block per type)")
        types = torch.cat([s.types for s in structures])
        values = torch.cat([s.typed for s in structures])
        blocks = []
        for t in atomic_types:
            rows = torch.nonzero(types == t)[:, 0]
            blocks.append(
                TensorBlock(
                    values[rows],
                    _labels(
                        ["system", "atom"],
                        torch.stack([system_of_atom[rows], atom_index[rows]], 1),
                    ),
                    [],
                    _labels(["t"], [[0]]),
                )
            )
        out["mtt::typed"] = TensorMap(_labels(["atom_type"], [[t] for t in atomic_types]), blocks)
    return systems, out, extra


def layouts(
    targets: tuple[str, ...] = ("energy", "mtt::charge", "mtt::multi"),
    atomic_types: list[int] | None = None,
) -> dict[str, TensorMap]:
    """Zero-sample layouts of ``targets``."""
    s = random_structures(2, atomic_types or [1, 8], seed=123)
    _, batch, _ = collate(s, targets, gradients=False, atomic_types=atomic_types)
    result = {}
    for name, tensor in batch.items():
        blocks = []
        for block in tensor.blocks():
            empty = Labels(
                block.samples.names,
                torch.zeros(0, len(block.samples.names), dtype=torch.int32),
            )
            values = block.values[:0]
            blocks.append(TensorBlock(values, empty, block.components, block.properties))
        result[name] = TensorMap(tensor.keys, blocks)
    return result


def batches(
    structures: list[Structure],
    batch_size: int,
    targets=("energy", "mtt::charge", "mtt::multi"),
    **kwargs,
):
    """The structures in consecutive batches."""
    return [
        collate(structures[i : i + batch_size], targets, **kwargs)
        for i in range(0, len(structures), batch_size)
    ]
