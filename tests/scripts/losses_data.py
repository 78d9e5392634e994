"""Batches of TensorMaps for the loss tests (shared by the test files and the DDP script).

Everything is built from a ``torch.Generator`` so that the same seed gives the same
batch in every process.
"""

from __future__ import annotations

import torch
from metatensor.torch import Labels, TensorBlock, TensorMap
from metatomic.torch import System

XYZ = Labels(["xyz"], torch.arange(3).reshape(-1, 1))
XYZ_1 = Labels(["xyz_1"], torch.arange(3).reshape(-1, 1))
XYZ_2 = Labels(["xyz_2"], torch.arange(3).reshape(-1, 1))


def labels(names: list[str], values) -> Labels:
    values = torch.as_tensor(values, dtype=torch.int32)
    return Labels(names, values.reshape(-1, len(names)))


def structure_samples(n_systems: int) -> Labels:
    return labels(["system"], torch.arange(n_systems))


def atom_samples(n_atoms: list[int]) -> Labels:
    rows = [(s, a) for s, n in enumerate(n_atoms) for a in range(n)]
    return labels(["system", "atom"], rows)


def positions_samples(n_atoms: list[int]) -> Labels:
    """Gradient samples ``sample, system, atom`` of a per-structure target."""
    rows = [(s, s, a) for s, n in enumerate(n_atoms) for a in range(n)]
    return labels(["sample", "system", "atom"], rows)


def systems_for(n_atoms: list[int], generator: torch.Generator, dtype=torch.float64):
    systems = []
    for n in n_atoms:
        types = torch.tensor([1, 6, 8], dtype=torch.int32)[
            torch.randint(0, 3, (n,), generator=generator)
        ]
        positions = torch.rand(n, 3, generator=generator, dtype=dtype) * 5
        cell = torch.eye(3, dtype=dtype) * 5
        systems.append(System(types, positions, cell, torch.ones(3, dtype=torch.bool)))
    return systems


def energy_map(
    energies: torch.Tensor,
    n_atoms: list[int],
    forces: torch.Tensor | None = None,
    strain: torch.Tensor | None = None,
    properties: Labels | None = None,
) -> TensorMap:
    """Energy-like TensorMap: one block, optional positions/strain gradients.

    ``energies`` has shape (n_systems, P); ``forces`` (n_atoms_total, 3, P) holds the
    positions gradient values, ``strain`` (n_systems, 3, 3, P) the strain gradient.
    """
    n_systems, n_properties = energies.shape
    if properties is None:
        properties = (
            Labels(["energy"], torch.tensor([[0]]))
            if n_properties == 1
            else labels(["property"], torch.arange(n_properties))
        )
    block = TensorBlock(energies, structure_samples(n_systems), [], properties)
    if forces is not None:
        block.add_gradient(
            "positions",
            TensorBlock(forces, positions_samples(n_atoms), [XYZ], properties),
        )
    if strain is not None:
        block.add_gradient(
            "strain",
            TensorBlock(
                strain, labels(["sample"], torch.arange(n_systems)), [XYZ_1, XYZ_2], properties
            ),
        )
    return TensorMap(Labels.single(), [block])


def random_energy(
    n_atoms: list[int],
    generator: torch.Generator,
    *,
    n_properties: int = 1,
    gradients: bool = True,
    dtype=torch.float64,
    requires_grad: bool = False,
) -> TensorMap:
    n_systems, total = len(n_atoms), sum(n_atoms)

    def rand(*shape):
        tensor = torch.randn(*shape, generator=generator, dtype=dtype)
        return tensor.requires_grad_(requires_grad)

    return energy_map(
        rand(n_systems, n_properties),
        n_atoms,
        rand(total, 3, n_properties) if gradients else None,
        rand(n_systems, 3, 3, n_properties) if gradients else None,
    )


def multi_block_map(
    n_atoms: list[int],
    generator: torch.Generator,
    *,
    dtype=torch.float64,
    members: int = 1,
    requires_grad: bool = False,
    with_gradient: bool = True,
) -> TensorMap:
    """Per-atom two-block target (keys ``o3_lambda`` 0 and 1; 2 and 3 properties) with a
    custom ``positions`` gradient; ``members > 1`` gives the LLPR ensemble layout
    (``members x P`` properties, member-major)."""
    blocks = []
    samples = atom_samples(n_atoms)
    n = len(samples)
    for lam, n_properties in ((0, 2), (1, 3)):
        components = [labels(["o3_mu"], torch.arange(-lam, lam + 1))]
        properties = labels(["n"], torch.arange(members * n_properties))
        values = torch.randn(
            n, 2 * lam + 1, members * n_properties, generator=generator, dtype=dtype
        )
        block = TensorBlock(values.requires_grad_(requires_grad), samples, components, properties)
        if with_gradient:
            gradient_samples = labels(
                ["sample", "system", "atom"],
                [(i, s, a) for i, (s, a) in enumerate(samples.values.tolist())],
            )
            gradient_values = torch.randn(
                n, 3, 2 * lam + 1, members * n_properties, generator=generator, dtype=dtype
            )
            block.add_gradient(
                "positions",
                TensorBlock(
                    gradient_values.requires_grad_(requires_grad),
                    gradient_samples,
                    [XYZ, *components],
                    properties,
                ),
            )
        blocks.append(block)
    return TensorMap(labels(["o3_lambda"], [[0], [1]]), blocks)


def map_like(tensor_map: TensorMap, transform) -> TensorMap:
    """Same metadata, values (and gradient values) replaced by ``transform(values)``."""
    blocks = []
    for block in tensor_map.blocks():
        new = TensorBlock(
            transform(block.values), block.samples, block.components, block.properties
        )
        for name, gradient in block.gradients():
            new.add_gradient(
                name,
                TensorBlock(
                    transform(gradient.values),
                    gradient.samples,
                    gradient.components,
                    gradient.properties,
                ),
            )
        blocks.append(new)
    return TensorMap(tensor_map.keys, blocks)


def with_nans(tensor_map: TensorMap, generator: torch.Generator, fraction: float = 0.2):
    """A copy with about ``fraction`` of all entries (values and gradients) set to NaN."""

    def put_nans(values):
        values = values.detach().clone()
        nan = torch.rand(values.shape, generator=generator) < fraction
        return values.masked_fill(nan, float("nan"))

    return map_like(tensor_map, put_nans)


def random_mask(tensor_map: TensorMap, generator: torch.Generator, dtype=torch.float64):
    """A mask TensorMap with the same metadata: values in {0, 1, 0.5, -2} (nonzero counts)."""
    choices = torch.tensor([0.0, 1.0, 0.5, -2.0], dtype=dtype)

    def draw(values):
        return choices[torch.randint(0, 4, values.shape, generator=generator)]

    return map_like(tensor_map, draw)


def shuffled_energy(positions_value: float, strain_value: float, atoms: tuple[int, int]):
    """Energy TensorMap with value rows [system 1, system 0] (energies 50 and 30), one
    positions-gradient row per system (atom ``atoms[i]`` of row ``i``'s system) filled
    with ``positions_value``, and strain-gradient rows filled with ``strain_value``."""
    block = TensorBlock(
        torch.tensor([[50.0], [30.0]], dtype=torch.float64),
        labels(["system"], [[1], [0]]),
        [],
        labels(["energy"], [[0]]),
    )
    block.add_gradient(
        "positions",
        TensorBlock(
            torch.full((2, 3, 1), positions_value, dtype=torch.float64),
            labels(["sample", "system", "atom"], [[0, 1, atoms[0]], [1, 0, atoms[1]]]),
            [XYZ],
            labels(["energy"], [[0]]),
        ),
    )
    block.add_gradient(
        "strain",
        TensorBlock(
            torch.full((2, 3, 3, 1), strain_value, dtype=torch.float64),
            labels(["sample"], [[0], [1]]),
            [XYZ_1, XYZ_2],
            labels(["energy"], [[0]]),
        ),
    )
    return TensorMap(Labels.single(), [block])


def structure_weights(values: torch.Tensor, order: list[int] | None = None) -> TensorMap:
    """Per-structure sample weights: one block, samples ``system`` (rows in ``order``,
    default 0..B-1), one property; ``values[s]`` is the weight of structure ``s``."""
    order = list(range(len(values))) if order is None else list(order)
    return TensorMap(
        Labels.single(),
        [
            TensorBlock(
                values[order].reshape(-1, 1),
                labels(["system"], order),
                [],
                labels(["weight"], [[0]]),
            )
        ],
    )


def atom_weights(values: torch.Tensor, n_atoms: list[int]) -> TensorMap:
    """Per-atom sample weights: samples ``system, atom`` in batch order, one property."""
    return TensorMap(
        Labels.single(),
        [TensorBlock(values.reshape(-1, 1), atom_samples(n_atoms), [], labels(["weight"], [[0]]))],
    )


def random_weights(shape, generator: torch.Generator, dtype=torch.float64) -> torch.Tensor:
    """Weights drawn from {0, 0.5, 1, 2.5, 3.75}: zeros included (they count for nothing)."""
    choices = torch.tensor([0.0, 0.5, 1.0, 2.5, 3.75], dtype=dtype)
    return choices[torch.randint(0, 5, tuple(shape), generator=generator)]
