"""The pipeline of pl_mtt.scaling: division by atoms, loss units, metrics, inference."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch
from metatensor.torch import Labels, TensorBlock, TensorMap
from metatomic.torch import System

sys.path.insert(0, str(Path(__file__).parent / "scripts"))

from scaler_data import batches, layouts, random_structures

from pl_mtt import scaling
from pl_mtt.composition import CompositionModel
from pl_mtt.fit_pass import fit_pass
from pl_mtt.scaler import Scaler

TYPES = [1, 6, 8]
TARGETS = ("energy", "mtt::charge", "mtt::multi", "mtt::dos", "mtt::pair")


def _labels(names, values):
    return Labels(names, torch.tensor(values, dtype=torch.int32).reshape(-1, len(names)))


def _system(n):
    return System(
        types=torch.ones(n, dtype=torch.int32),
        positions=torch.zeros(n, 3, dtype=torch.float64),
        cell=torch.zeros(3, 3, dtype=torch.float64),
        pbc=torch.tensor([False, False, False]),
    )


@pytest.fixture(scope="module")
def data():
    structures = random_structures(40, TYPES, seed=4, nan_fraction=0.05, mask_fraction=0.1)
    return batches(structures, 8, TARGETS)


@pytest.fixture(scope="module")
def fitted(data):
    scaler = Scaler(TYPES, layouts(TARGETS), no_per_property_scales=["mtt::dos"])
    composition = CompositionModel(TYPES, layouts(TARGETS), exclude=["mtt::dos"])
    fit_pass(data, scaler, composition)
    return scaler, composition


def _energy_with_gradients():
    """Two systems (3 and 5 atoms), value rows in the order [system 1, system 0]."""
    block = TensorBlock(
        torch.tensor([[50.0], [30.0]], dtype=torch.float64),
        _labels(["system"], [[1], [0]]),
        [],
        _labels(["energy"], [[0]]),
    )
    block.add_gradient(
        "positions",
        TensorBlock(
            torch.full((2, 3, 1), 7.0, dtype=torch.float64),
            _labels(["sample", "system", "atom"], [[0, 1, 0], [1, 0, 2]]),
            [_labels(["xyz"], [[0], [1], [2]])],
            _labels(["energy"], [[0]]),
        ),
    )
    block.add_gradient(
        "strain",
        TensorBlock(
            torch.full((2, 3, 3, 1), 15.0, dtype=torch.float64),
            _labels(["sample"], [[0], [1]]),
            [_labels(["xyz_1"], [[0], [1], [2]]), _labels(["xyz_2"], [[0], [1], [2]])],
            _labels(["energy"], [[0]]),
        ),
    )
    return TensorMap(Labels.single(), [block])


def test_division_rule_energy_forces_virial():
    systems = [_system(3), _system(5)]
    energy = _energy_with_gradients()
    per_atom = TensorMap(
        Labels.single(),
        [
            TensorBlock(
                torch.ones(2, 1, dtype=torch.float64),
                _labels(["system", "atom"], [[0, 0], [1, 0]]),
                [],
                _labels(["q"], [[0]]),
            )
        ],
    )
    pair = TensorMap(
        Labels.single(),
        [
            TensorBlock(
                torch.ones(1, 1, dtype=torch.float64),
                _labels(
                    [
                        "system",
                        "first_atom",
                        "second_atom",
                        "cell_shift_a",
                        "cell_shift_b",
                        "cell_shift_c",
                    ],
                    [[0, 0, 1, 0, 0, 0]],
                ),
                [],
                _labels(["p"], [[0]]),
            )
        ],
    )
    tensors = {"energy": energy, "q": per_atom, "pair": pair}
    out = scaling.divide_by_atoms(systems, tensors)
    block = out["energy"].block_by_id(0)
    assert block.values[:, 0].tolist() == [50.0 / 5, 30.0 / 3]  # by the row's own system
    assert torch.all(block.gradient("positions").values == 7.0)  # forces: not divided
    strain = block.gradient("strain").values
    assert torch.all(strain[0] == 15.0 / 5)  # virial: divided, via the sample column
    assert torch.all(strain[1] == 15.0 / 3)
    assert out["q"] is per_atom
    assert out["pair"] is pair
    # inputs untouched, inverse exact
    assert energy.block_by_id(0).values[:, 0].tolist() == [50.0, 30.0]
    back = scaling.multiply_by_atoms(systems, out)["energy"].block_by_id(0)
    assert back.values[:, 0].tolist() == [50.0, 30.0]
    assert torch.all(back.gradient("strain").values == 15.0)
    # opt-out: the target and its ensemble output are left alone
    ensemble = TensorMap(
        Labels.single(),
        [
            TensorBlock(
                torch.ones(2, 4, dtype=torch.float64),
                _labels(["system"], [[0], [1]]),
                [],
                _labels(["member"], [[0], [1], [2], [3]]),
            )
        ],
    )
    kept = scaling.divide_by_atoms(
        systems, {"energy": energy, "energy_ensemble": ensemble}, ["energy"]
    )
    assert kept["energy"] is energy
    assert kept["energy_ensemble"] is ensemble
    divided = scaling.divide_by_atoms(systems, {"energy_ensemble": ensemble})
    assert divided["energy_ensemble"].block_by_id(0).values[:, 0].tolist() == [1 / 3, 1 / 5]


def _values(tensor_map):
    return [block.values for block in tensor_map.blocks()]


def _assert_same(a, b, rtol=1e-13):
    for name in a:
        for x, y in zip(_values(a[name]), _values(b[name]), strict=True):
            torch.testing.assert_close(x, y, rtol=rtol, atol=1e-12, equal_nan=True)


def test_targets_round_trip(fitted, data):
    scaler, composition = fitted
    systems, targets, _ = data[1]
    loss_units = scaling.targets_for_loss(systems, targets, scaler, composition)
    back = scaling.targets_from_loss(systems, loss_units, scaler, composition)
    _assert_same(targets, back)
    # loss units by hand for the energy: (E - counts . w) / N / sigma
    w = composition.weights["energy"].block_by_id(0).values[:, 0]
    counts = torch.tensor(
        [[sum(1 for t in s.types.tolist() if t == z) for z in TYPES] for s in systems],
        dtype=torch.float64,
    )
    n = torch.tensor([len(s) for s in systems], dtype=torch.float64)
    sigma = scaler.per_target_scales["energy"].block_by_id(0).values.item()
    energy = targets["energy"].block_by_id(0)
    expected = (energy.values[:, 0] - counts @ w) / n / sigma
    got = loss_units["energy"].block_by_id(0)
    torch.testing.assert_close(got.values[:, 0], expected, rtol=1e-13, atol=0)
    forces = got.gradient("positions").values
    torch.testing.assert_close(forces, energy.gradient("positions").values / sigma)
    virial = got.gradient("strain").values
    torch.testing.assert_close(
        virial, energy.gradient("strain").values / n[:, None, None, None] / sigma
    )
    # per-atom and atom-pair targets: baseline and per-target scale only
    assert (
        scaling.targets_for_loss(systems, {"mtt::pair": targets["mtt::pair"]}, scaler)["mtt::pair"]
        is targets["mtt::pair"]
    )


def test_perfect_model_gives_equal_loss_inputs_and_physical_outputs(fitted, data):
    """A model whose raw output is (y - baseline) / full scale (total units) is perfect:
    the loss sees equal predictions and targets, metrics and inference give y back."""
    scaler, composition = fitted
    systems, targets, _ = data[2]
    names = ("energy", "mtt::charge", "mtt::multi", "mtt::dos")
    physical = {k: targets[k] for k in names}
    raw = scaler(systems, composition(systems, physical, remove=True), remove=True)
    # inference
    _assert_same(physical, scaling.to_physical(systems, raw, scaler, composition))
    # training: what the LossModule compares (it applies the per-property scales itself)
    predictions, loss_targets = scaling.prepare_for_loss(
        _Module(scaler, composition), systems, raw, physical
    )
    as_loss_module_sees = scaler(
        systems,
        predictions,
        remove=False,
        use_per_target_scales=False,
        use_per_property_scales=True,
    )
    _assert_same(loss_targets, as_loss_module_sees)
    # metrics: both in physical units, per atom where divided
    metric_predictions, metric_targets = scaling.for_metrics(
        systems, predictions, loss_targets, scaler
    )
    _assert_same(metric_targets, metric_predictions)
    w = composition.weights["energy"].block_by_id(0).values[:, 0]
    counts = torch.tensor(
        [[sum(1 for t in s.types.tolist() if t == z) for z in TYPES] for s in systems],
        dtype=torch.float64,
    )
    n = torch.tensor([len(s) for s in systems], dtype=torch.float64)
    expected = (targets["energy"].block_by_id(0).values[:, 0] - counts @ w) / n  # eV/atom
    torch.testing.assert_close(
        metric_targets["energy"].block_by_id(0).values[:, 0], expected, rtol=1e-13, atol=1e-13
    )
    torch.testing.assert_close(
        metric_targets["energy"].block_by_id(0).gradient("positions").values,
        targets["energy"].block_by_id(0).gradient("positions").values,  # eV/A
    )


class _Module(torch.nn.Module):
    def __init__(self, scaler=None, composition=None):
        super().__init__()
        self.scaler = scaler
        self.composition = composition


def test_without_scaler_only_division(data):
    systems, targets, _ = data[0]
    predictions, loss_targets = scaling.prepare_for_loss(
        torch.nn.Module(), systems, {"energy": targets["energy"]}, targets
    )
    expected = scaling.divide_by_atoms(systems, targets)
    _assert_same(expected, loss_targets)
    _assert_same({"energy": expected["energy"]}, predictions)
    _assert_same(targets, scaling.to_physical(systems, targets))


def test_not_divided_targets_from_the_scaler(data):
    scaler = Scaler(TYPES, layouts(("energy",)), per_structure_targets=["energy"])
    systems, targets, _ = data[0]
    out = scaling.targets_for_loss(systems, {"energy": targets["energy"]}, scaler)
    # unfitted scaler: scales 1, and energy is not divided
    torch.testing.assert_close(
        out["energy"].block_by_id(0).values, targets["energy"].block_by_id(0).values
    )
