"""TorchScript kernels of pl_mtt.tensormaps.block_ops: hand-computed cases, and the same results
from their plain-Python versions (what runs if TorchScript cannot compile them)."""

from __future__ import annotations

import sys
from pathlib import Path

import torch
from metatensor.torch import Labels, TensorBlock, TensorMap

sys.path.insert(0, str(Path(__file__).parent / "scripts"))

from losses_data import shuffled_energy

from pl_mtt.tensormaps.block_ops import flat_values, shape_signature, transform_map


def _labels(names, values):
    return Labels(names, torch.tensor(values, dtype=torch.int32).reshape(-1, len(names)))


def _energy():
    """Rows [system 1, system 0]; a positions and a strain gradient."""
    return shuffled_energy(6.0, 12.0, (0, 1))


def _per_atom():
    """Two systems of 2 and 1 atoms, rows out of order; 2 properties."""
    values = torch.tensor([[1.0, 2.0], [3.0, 4.0], [5.0, 6.0]], dtype=torch.float64)
    block = TensorBlock(
        values,
        _labels(["system", "atom"], [[1, 0], [0, 1], [0, 0]]),
        [],
        _labels(["p"], [[0], [1]]),
    )
    return TensorMap(Labels.single(), [block])


def test_hand_computed_energy_and_per_atom():
    counts = torch.tensor([[3.0], [5.0]], dtype=torch.float64)  # atoms of systems 0, 1
    shift = [torch.tensor([[3.0], [10.0]], dtype=torch.float64)]  # per system
    scale = [torch.tensor([[2.0]], dtype=torch.float64)]
    out = transform_map(_energy(), True, shift, scale, counts, None).block()
    assert out.values[:, 0].tolist() == [(50.0 - 10) / (2 * 5), (30.0 - 3) / (2 * 3)]
    assert out.gradient("positions").values.unique().tolist() == [3.0]  # scale only
    strain = out.gradient("strain").values
    assert strain[0].unique().tolist() == [12.0 / 10]
    assert strain[1].unique().tolist() == [2.0]
    back = transform_map(
        transform_map(_energy(), True, shift, scale, counts, None),
        False,
        shift,
        scale,
        counts,
        None,
    ).block()
    assert back.values[:, 0].tolist() == [50.0, 30.0]

    # per atom: one table row per atom of the batch (system 0: atoms 0, 1; system 1: atom 2)
    first_atom = torch.tensor([0, 2])
    table = [torch.tensor([[1.0, 10.0], [2.0, 20.0], [4.0, 40.0]], dtype=torch.float64)]
    out = transform_map(_per_atom(), False, None, table, counts, first_atom).block()
    assert out.values.tolist() == [[4.0, 80.0], [6.0, 80.0], [5.0, 60.0]]  # never by atoms


def test_nothing_to_apply_gives_none():
    assert transform_map(_energy(), True, None, None, None, None) is None
    assert transform_map(_per_atom(), True, [None], [None], torch.ones(2, 1), None) is None


def test_python_versions_give_the_same_results():
    counts = torch.tensor([[3.0], [5.0]], dtype=torch.float64)
    arguments = (
        _energy(),
        True,
        [torch.tensor([[3.0], [10.0]], dtype=torch.float64)],
        [torch.tensor([[2.0]], dtype=torch.float64)],
        counts,
        None,
    )
    compiled, python = transform_map(*arguments), transform_map.__wrapped__(*arguments)
    for a, b in zip(
        flat_values(compiled, ["", "positions", "strain"]),
        flat_values.__wrapped__(python, ["", "positions", "strain"]),
        strict=True,
    ):
        assert torch.equal(a, b)
    assert shape_signature(_energy()) == shape_signature.__wrapped__(_energy())
    assert shape_signature(_energy())[1] == 1
    assert shape_signature(_energy())[0] != shape_signature(_per_atom())[0]
