"""Physical-unit metrics: accumulated batches equal the formula on the concatenation."""

from __future__ import annotations

import math

import pytest
import torch
from metatensor.torch import Labels, TensorBlock, TensorMap
from metatomic.torch import System

from pl_mtt.training.metrics import PhysicalMetrics, metric_specs

OPTIONS = {"energy": {"quantity": "energy", "unit": "eV", "forces": True, "stress": True}}


def energy_map(energies, forces, strain) -> TensorMap:
    """Energy TensorMap with positions/strain gradients (values as given)."""
    n_structures = len(energies)
    block = TensorBlock(
        values=torch.tensor(energies, dtype=torch.float64).reshape(-1, 1),
        samples=Labels(["system"], torch.arange(n_structures).reshape(-1, 1)),
        components=[],
        properties=Labels(["energy"], torch.tensor([[0]])),
    )
    atoms = [(s, a) for s, f in enumerate(forces) for a in range(len(f))]
    block.add_gradient(
        "positions",
        TensorBlock(
            values=torch.tensor([a for f in forces for a in f], dtype=torch.float64).reshape(
                -1, 3, 1
            ),
            samples=Labels(
                ["sample", "system", "atom"], torch.tensor([[s, s, a] for s, a in atoms])
            ),
            components=[Labels(["xyz"], torch.arange(3).reshape(-1, 1))],
            properties=block.properties,
        ),
    )
    block.add_gradient(
        "strain",
        TensorBlock(
            values=torch.tensor(strain, dtype=torch.float64).reshape(-1, 3, 3, 1),
            samples=Labels(["sample"], torch.arange(n_structures).reshape(-1, 1)),
            components=[
                Labels(["xyz_1"], torch.arange(3).reshape(-1, 1)),
                Labels(["xyz_2"], torch.arange(3).reshape(-1, 1)),
            ],
            properties=block.properties,
        ),
    )
    return TensorMap(Labels.single(), [block])


def system(n_atoms: int, box: float | None) -> System:
    cell = (
        torch.eye(3, dtype=torch.float64) * box if box else torch.zeros(3, 3, dtype=torch.float64)
    )
    return System(
        types=torch.full((n_atoms,), 29, dtype=torch.int32),
        positions=torch.rand(n_atoms, 3, dtype=torch.float64),
        cell=cell,
        pbc=torch.tensor([bool(box)] * 3),
    )


def random_batch(generator, sizes, boxes):
    def values(*shape):
        return torch.randn(*shape, generator=generator, dtype=torch.float64).tolist()

    pred = energy_map(values(len(sizes)), [values(n, 3) for n in sizes], values(len(sizes), 9))
    target = energy_map(values(len(sizes)), [values(n, 3) for n in sizes], values(len(sizes), 9))
    systems = [system(n, box) for n, box in zip(sizes, boxes, strict=True)]
    return pred, target, systems


def test_names_and_units():
    specs = metric_specs(
        OPTIONS, per_atom_normalized=["energy"], gradients={"energy": ["positions", "strain"]}
    )
    assert [(s.name, s.unit) for s in specs] == [
        ("energy_per_atom", "eV/atom"),
        ("forces", "eV/Å"),
        ("virial_per_atom", "eV/atom"),
        ("stress", "eV/Å^3"),
    ]
    assert metric_specs({"mtt::dipole": {}}, gradients={"mtt::dipole": ["field"]})[1].name == (
        "mtt::dipole/field"
    )


def test_accumulated_batches_equal_formula_on_concatenation():
    generator = torch.Generator().manual_seed(0)
    specs = metric_specs(
        OPTIONS, per_atom_normalized=["energy"], gradients={"energy": ["positions", "strain"]}
    )
    metrics = PhysicalMetrics(specs, "val")
    batches = [random_batch(generator, [3, 5], [4.0, None]), random_batch(generator, [2], [5.0])]
    # NaN stress entries of the non-periodic structure are part of real data
    batches[0][1].block().gradient("strain").values[1] = torch.nan
    residuals = {"energy_per_atom": [], "forces": [], "virial_per_atom": [], "stress": []}
    for pred, target, systems in batches:
        metrics.update({"energy": pred}, {"energy": target}, systems)
        p, t = pred.block(), target.block()
        residuals["energy_per_atom"] += (p.values - t.values).reshape(-1).tolist()
        residuals["forces"] += (
            (p.gradient("positions").values - t.gradient("positions").values).reshape(-1).tolist()
        )
        strain = (p.gradient("strain").values - t.gradient("strain").values).reshape(-1, 9)
        for i, s in enumerate(systems):
            volume = abs(float(torch.linalg.det(s.cell)))
            for value in strain[i].tolist():
                residuals["virial_per_atom"].append(value)
                residuals["stress"].append(value * len(s) / volume if volume > 0 else math.nan)
    result = metrics.compute()
    for name, values in residuals.items():
        finite = [v for v in values if not math.isnan(v)]
        mae = sum(abs(v) for v in finite) / len(finite)
        rmse = math.sqrt(sum(v * v for v in finite) / len(finite))
        assert float(result[f"val/{name}/MAE"]) == pytest.approx(mae, rel=1e-12)
        assert float(result[f"val/{name}/RMSE"]) == pytest.approx(rmse, rel=1e-12)
    metrics.reset()
    pred, target, systems = batches[1]
    metrics.update({"energy": pred}, {"energy": target}, systems)
    expected = (pred.block().values - target.block().values).abs().mean()
    assert float(metrics.compute()["val/energy_per_atom/MAE"]) == pytest.approx(float(expected))


def test_hand_computed_stress():
    specs = metric_specs(OPTIONS, per_atom_normalized=[], gradients={"energy": ["strain"]})
    metrics = PhysicalMetrics(specs, "train")
    pred = energy_map([0.0], [[[0.0, 0.0, 0.0]] * 2], [[8.0] + [0.0] * 8])
    target = energy_map([1.0], [[[0.0, 0.0, 0.0]] * 2], [[0.0] * 9])
    metrics.update(
        {"energy": pred}, {"energy": target}, [system(2, 2.0)]
    )  # V = 8 Å^3, not divided by atoms
    result = metrics.compute()
    assert float(result["train/stress/MAE"]) == pytest.approx(1.0 / 9)  # |8 / 8| on 1 of 9
    assert float(result["train/virial/MAE"]) == pytest.approx(8.0 / 9)
    assert float(result["train/energy/RMSE"]) == pytest.approx(1.0)


def _charge_map(values) -> TensorMap:
    values = torch.tensor(values, dtype=torch.float64).reshape(-1, 1)
    samples = Labels(["system", "atom"], torch.tensor([[0, a] for a in range(len(values))]))
    block = TensorBlock(values, samples, [], Labels(["charge"], torch.tensor([[0]])))
    return TensorMap(Labels.single(), [block])


def test_single_quantity_and_targets_absent_from_a_batch():
    """One quantity gives scalar results; a target missing from a batch adds nothing."""
    single = PhysicalMetrics(metric_specs({"mtt::q": {}}), "val")
    single.update({"mtt::q": _charge_map([1.0, 2.0])}, {"mtt::q": _charge_map([0.0, 0.0])}, [])
    result = single.compute()
    assert set(result) == {"val/mtt::q/MAE", "val/mtt::q/RMSE"}
    assert float(result["val/mtt::q/MAE"]) == pytest.approx(1.5)
    assert float(result["val/mtt::q/RMSE"]) == pytest.approx(math.sqrt(2.5))

    options = {"energy": OPTIONS["energy"], "mtt::q": {}}
    specs = metric_specs(options, per_atom_normalized=["energy"])
    metrics = PhysicalMetrics(specs, "train")
    forces = [[[0.0, 0.0, 0.0]], [[0.0, 0.0, 0.0]]]
    energy = {"energy": energy_map([1.0, 3.0], forces, [[0.0] * 9] * 2)}
    zero = {"energy": energy_map([0.0, 0.0], forces, [[0.0] * 9] * 2)}
    systems = [system(1, 2.0), system(1, 2.0)]
    metrics.update(energy, zero, systems)  # no charge in this batch
    metrics.update({"mtt::q": _charge_map([4.0])}, {"mtt::q": _charge_map([0.0])}, [system(1, 2.0)])
    result = metrics.compute()
    assert float(result["train/energy_per_atom/MAE"]) == pytest.approx(2.0)
    assert float(result["train/mtt::q/MAE"]) == pytest.approx(4.0)
    assert float(result["train/mtt::q/RMSE"]) == pytest.approx(4.0)
