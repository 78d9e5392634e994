"""The pipeline of pl_mtt.scaling: division by atoms, loss units, metrics, inference."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch
from metatensor.torch import Labels, TensorBlock, TensorMap
from metatomic.torch import System

sys.path.insert(0, str(Path(__file__).parent / "scripts"))

from losses_data import shuffled_energy
from scaler_data import ALL_TARGETS, batches, layouts, random_structures

from pl_mtt import scaling
from pl_mtt.scaling.composition import CompositionModel
from pl_mtt.scaling.fit import fit_pass
from pl_mtt.scaling.scaler import Scaler
from pl_mtt.tensormaps import ensemble_output_name

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


def test_division_rule_energy_forces_virial():
    systems = [_system(3), _system(5)]
    energy = shuffled_energy(7.0, 15.0, (0, 2))
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


def _by_key(tensor_map):
    """Key (tuple) -> block values of a public weights/scales TensorMap."""
    keys = [tuple(key) for key in tensor_map.keys.values.tolist()]
    return {key: block.values for key, block in zip(keys, tensor_map.blocks(), strict=True)}


def test_every_kind_of_target_matches_a_row_loop_reference():
    """targets_for_loss and to_physical, for every kind of target (per-structure with
    gradients, per-atom, non-invariant blocks, blocks keyed by atom_type, DOS, atom pairs)
    and ensemble outputs, equal a loop over sample rows with the public weights and
    scales."""
    structures = random_structures(24, TYPES, seed=7, nan_fraction=0.05)
    data = batches(structures, 8, ALL_TARGETS, atomic_types=TYPES)
    scaler = Scaler(TYPES, layouts(ALL_TARGETS, TYPES), no_per_property_scales=["mtt::dos"])
    composition = CompositionModel(TYPES, layouts(ALL_TARGETS, TYPES), exclude=["mtt::dos"])
    fit_pass(data, scaler, composition)
    systems, targets, _ = data[1]
    types = [s.types.tolist() for s in systems]
    weights = {name: _by_key(t) for name, t in composition.weights.items()}
    per_target = {name: _by_key(t) for name, t in scaler.per_target_scales.items()}
    full = {name: _by_key(t) for name, t in scaler.scales.items()}

    def reference(name, tensor, scales, *, to_loss):
        """Per block: the expected values and gradient values. To loss units:
        ``(y - base) / (scale x atoms)``; else (inference) ``y x scale + base``."""
        expected = []
        for key, block in zip(tensor.keys.values.tolist(), tensor.blocks(), strict=True):
            w, scale = weights.get(name, {}).get(tuple(key)), scales[name][tuple(key)]
            members = block.values.shape[-1] // scale.shape[1]
            values, row_scales, row_atoms = block.values.clone(), [], []
            for row, sample in enumerate(block.samples.values.tolist()):
                system = sample[0]
                if len(sample) == 1:  # per structure: counts . w, divided by atoms
                    counts = [float(types[system].count(z)) for z in TYPES]
                    base = torch.tensor(counts, dtype=torch.float64) @ w if w is not None else 0
                    factor, atoms = scale[0], float(len(types[system])) if to_loss else 1.0
                else:  # per atom: w and scale of the atom's type
                    z = TYPES.index(types[system][sample[1]])
                    base = w[z] if w is not None else 0
                    factor, atoms = scale[z], 1.0
                base = base.repeat(members) if w is not None else 0
                factor = factor.repeat(members)
                if to_loss:
                    values[row] = (values[row] - base) / (factor * atoms)
                else:
                    values[row] = values[row] * factor + base
                row_scales.append(factor)
                row_atoms.append(atoms)
            gradients = {}
            for parameter, gradient in block.gradients():
                g = gradient.values.clone()
                for row, (parent, *_) in enumerate(gradient.samples.values.tolist()):
                    factor = row_scales[parent]
                    if parameter == "strain":  # virials are divided by atoms, forces not
                        factor = factor * row_atoms[parent]
                    g[row] = g[row] / factor if to_loss else g[row] * factor
                gradients[parameter] = g
            expected.append((values, gradients))
        return expected

    def compare(got, expected):
        for block, (values, gradients) in zip(got.blocks(), expected, strict=True):
            torch.testing.assert_close(block.values, values, rtol=1e-12, atol=1e-12, equal_nan=True)
            for parameter, g in gradients.items():
                torch.testing.assert_close(
                    block.gradient(parameter).values, g, rtol=1e-12, atol=1e-12, equal_nan=True
                )

    loss_units = scaling.targets_for_loss(systems, targets, scaler, composition)
    assert loss_units["mtt::pair"] is targets["mtt::pair"]
    for name in ("energy", "mtt::charge", "mtt::multi", "mtt::dos", "mtt::typed"):
        compare(loss_units[name], reference(name, targets[name], per_target, to_loss=True))

    # inference on raw outputs (here: the loss-unit targets) and 2-member ensembles
    raw = {name: loss_units[name] for name in ("energy", "mtt::multi", "mtt::typed")}
    for name in ("energy", "mtt::multi"):
        blocks = []
        for block in raw[name].blocks():
            values = torch.cat([block.values, 2 * block.values], -1)
            properties = Labels(["member"], torch.arange(values.shape[-1]).reshape(-1, 1))
            blocks.append(TensorBlock(values, block.samples, block.components, properties))
        raw[ensemble_output_name(name)] = TensorMap(raw[name].keys, blocks)
    physical = scaling.to_physical(systems, raw, scaler, composition)
    for name, tensor in raw.items():
        target = name if name in weights or name in full else name.replace("aux::", "")
        target = target.removesuffix("_ensemble")
        compare(physical[name], reference(target, tensor, full, to_loss=False))
