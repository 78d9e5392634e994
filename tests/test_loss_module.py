"""LossModule: the spec's MLIP example, logging, epoch aggregates, scales, DDP, Lightning."""

from __future__ import annotations

import math

import pytest
import torch
import yaml
from metatensor.torch import TensorBlock, TensorMap

from pl_mtt.loss_module import LossAggregate, LossModule
from pl_mtt.losses import create_loss
from pl_mtt.losses.base import ValueCache, read_values
from pl_mtt.registry import register_loss_type, unregister_loss_type
from tests.conftest import REPO_ROOT
from tests.scripts.losses_data import (
    map_like,
    multi_block_map,
    random_energy,
    systems_for,
    with_nans,
)
from tests.test_ensemble_losses import ensemble_of
from tests.test_ensemble_losses import reference as ensemble_reference
from tests.test_pointwise_losses import reference as pointwise_reference

MLIP_TARGETS = {"energy": {"quantity": "energy", "forces": True, "stress": True}}
SPEC_MLIP = yaml.safe_load(
    """
loss:
  energy:
    type: mse
    weight: 1.0
    reduction: mean
    forces:
      type: mse
      weight: 1.0
      reduction: mean
    stress:
      type: mse
      weight: 1.0
      reduction: mean
"""
)["loss"]
WEIGHTED = {
    "energy": {
        "type": "mse",
        "weight": 2.0,
        "forces": {"type": "mae", "weight": 0.1},
        "stress": {"type": "huber", "weight": 0.5, "reduction": "sum", "delta": 0.3},
    }
}


def mlip_batch(n_atoms, generator, requires_grad=False):
    predictions = {"energy": random_energy(n_atoms, generator, requires_grad=requires_grad)}
    targets = {"energy": with_nans(random_energy(n_atoms, generator), generator, 0.2)}
    return predictions, targets


def weighted_reference(config, predictions, targets):
    """Per-term values and their weighted sum, from the loop references."""
    values, total = {}, 0.0
    entry = config["energy"]
    for name, gradient, term in [
        ("energy", None, entry),
        ("energy/forces", "positions", entry["gradients"]["positions"]),
        ("energy/stress", "strain", entry["gradients"]["strain"]),
    ]:
        values[name] = pointwise_reference(
            term["type"],
            predictions["energy"],
            targets["energy"],
            None,
            gradient,
            term.get("delta", 1.0),
            term["reduction"],
        )
        total += term["weight"] * values[name]
    return values, total


@pytest.fixture
def generator():
    return torch.Generator().manual_seed(7)


# --- the spec's MLIP example --------------------------------------------------------------
@pytest.mark.parametrize("loss", [SPEC_MLIP, "mse", WEIGHTED])
def test_mlip_total_is_weighted_sum_of_terms(generator, loss):
    module = LossModule(loss, MLIP_TARGETS)
    assert module.term_names == ["energy", "energy/forces", "energy/stress"]
    predictions, targets = mlip_batch([3, 5, 4], generator, requires_grad=True)
    total = module(predictions, targets)
    values, expected_total = weighted_reference(module.config, predictions, targets)
    assert total.item() == pytest.approx(expected_total, rel=1e-10)
    assert set(module.last_values) == set(values)
    for name, value in module.last_values.items():
        assert not value.requires_grad
        assert value.item() == pytest.approx(values[name], rel=1e-10)
    weights = {name: term.weight for name, term in module.terms.items()}
    recombined = sum(weights[n] * v for n, v in module.last_values.items())
    assert recombined.item() == pytest.approx(total.item(), rel=1e-12)
    total.backward()
    assert predictions["energy"].block_by_id(0).gradient("positions").values.grad is not None


def test_term_names_virial_and_custom_gradients():
    module = LossModule(
        {"mtt::etot": {"forces": "mae", "virial": "mse"}},
        {
            "mtt::etot": {"quantity": "energy", "forces": True, "virial": True},
            "mtt::x": {"gradients": ["positions", "alchemical"]},
        },
    )
    assert module.term_names == [
        "mtt::etot",
        "mtt::etot/forces",
        "mtt::etot/virial",
        "mtt::x",
        "mtt::x/positions",
        "mtt::x/alchemical",
    ]
    assert module.terms["mtt::x/alchemical"].gradient == "alchemical"


def test_compute_and_reset(generator):
    module = LossModule(WEIGHTED, MLIP_TARGETS)
    batches = [mlip_batch(n, generator) for n in ([3, 4], [2], [5, 1, 2])]
    sums = {"energy": 0.0, "energy/forces": 0.0, "energy/stress": 0.0}
    counts = dict.fromkeys(sums, 0)
    config = module.config["energy"]
    terms = {
        "energy": (None, config),
        "energy/forces": ("positions", config["gradients"]["positions"]),
        "energy/stress": ("strain", config["gradients"]["strain"]),
    }
    for predictions, targets in batches:
        module(predictions, targets)
        for name, (gradient, term) in terms.items():
            sums[name] += pointwise_reference(
                term["type"],
                predictions["energy"],
                targets["energy"],
                None,
                gradient,
                term.get("delta", 1.0),
                reduction="sum",
            )
            block = targets["energy"].block_by_id(0)
            values = block.values if gradient is None else block.gradient(gradient).values
            counts[name] += int((~torch.isnan(values)).sum())
    epoch = module.compute()
    assert epoch["energy"].item() == pytest.approx(sums["energy"] / counts["energy"], 1e-10)
    assert epoch["energy/forces"].item() == pytest.approx(
        sums["energy/forces"] / counts["energy/forces"], 1e-10
    )
    # sum term: the epoch's sum divided by the number of batches
    assert epoch["energy/stress"].item() == pytest.approx(sums["energy/stress"] / 3, 1e-10)
    module.reset()
    assert module.last_values == {}
    assert all(v.item() == 0.0 for v in module.compute().values())
    module(*batches[0])
    assert module.compute()["energy"].item() == pytest.approx(
        module.last_values["energy"].item(), rel=1e-12
    )


def test_instances_do_not_share_state(generator):
    train, val = LossModule("mse", MLIP_TARGETS), LossModule("mse", MLIP_TARGETS)
    train(*mlip_batch([3, 4], generator))
    val(*mlip_batch([2], generator))
    val(*mlip_batch([2, 2], generator))
    assert train.aggregate.batches.tolist() == [1.0, 1.0, 1.0]
    assert val.aggregate.batches.tolist() == [2.0, 2.0, 2.0]
    assert train.compute()["energy"].item() != val.compute()["energy"].item()


# --- fused terms, shared reads, queued aggregates --------------------------------------------
def test_fused_groups_equal_direct_terms(generator):
    """Pointwise terms of one kind are computed together (one autograd node per group);
    every term value, the total and its gradients equal those of the terms called
    directly, whatever the grouping (mse x3, masked_mae x2, an ensemble term alone)."""
    targets_options = {
        "energy": {"quantity": "energy", "forces": True, "stress": True},
        "mtt::x": {"gradients": ["positions"]},
        "mtt::y": {},
    }
    loss = {
        "energy": {"type": "mse", "weight": 2.0, "forces": "mse", "stress": {"weight": 0.3}},
        "mtt::x": {
            "type": "masked_mae",
            "reduction": "sum",
            "gradients": {"positions": {"type": "masked_mae", "weight": 0.1}},
        },
        "mtt::y": {"type": "empirical_crps_ensemble", "weight": 0.5},
    }
    module = LossModule(loss, targets_options)
    energy_pred, energy_target = mlip_batch([3, 4, 2], generator, requires_grad=True)
    x_pred = multi_block_map([3, 4, 2], generator, requires_grad=True)
    x_target = with_nans(multi_block_map([3, 4, 2], generator), generator)
    x_mask = map_like(x_target, lambda v: (torch.rand(v.shape, generator=generator) > 0.4).double())
    y_target = with_nans(multi_block_map([3, 4, 2], generator, with_gradient=False), generator)
    y_ensemble = ensemble_of(y_target, 3, generator)
    predictions = {**energy_pred, "mtt::x": x_pred, "mtt::aux::y_ensemble": y_ensemble}
    targets = {**energy_target, "mtt::x": x_target, "mtt::y": y_target}
    extra = {"mtt::x_mask": x_mask}

    total = module(predictions, targets, extra)
    direct = {name: term(predictions, targets, extra) for name, term in module.terms.items()}
    assert set(module.last_values) == set(direct)
    for name, value in direct.items():
        assert module.last_values[name].item() == pytest.approx(value.item(), rel=1e-13)
    expected = sum(term.weight * direct[name] for name, term in module.terms.items())
    assert total.item() == pytest.approx(expected.item(), rel=1e-13)
    leaves = [
        energy_pred["energy"].block_by_id(0).gradient("positions").values,
        x_pred.block_by_id(1).values,
        x_pred.block_by_id(0).gradient("positions").values,
    ]
    got = torch.autograd.grad(total, leaves)
    wanted = torch.autograd.grad(expected, leaves)
    for a, b in zip(got, wanted, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-15)
    step = module._steps[(0, 1, 2, 3, 4, 5)]
    assert [len(terms) for _, terms in step.groups] == [
        3,
        2,
        1,
    ]  # energy terms, masked mtt::x terms, the ensemble term


def test_epoch_aggregates_across_queue_flushes(generator, monkeypatch):
    """Steps are queued and added in one update every QUEUE_LENGTH steps or when read;
    compute() is exact whatever the queue holds, reset() drops it."""
    monkeypatch.setattr(LossAggregate, "QUEUE_LENGTH", 3)
    targets_options = {"energy": {"quantity": "energy", "forces": True}, "mtt::d": {}}
    module = LossModule({"energy": {"forces": "mae"}, "mtt::d": "mse"}, targets_options)
    sums, counts, batches = [0.0] * 3, [0] * 3, [0] * 3
    for step in range(8):
        predictions, targets = mlip_batch([2 + step % 3, 3], generator)
        if step % 2:  # mtt::d present every other step
            predictions["mtt::d"] = random_energy(
                [2, 1], generator, n_properties=3, gradients=False
            )
            targets["mtt::d"] = with_nans(
                random_energy([2, 1], generator, n_properties=3, gradients=False), generator
            )
        module(predictions, targets)
        for i, (name, kind, gradient) in enumerate(
            [("energy", "mse", None), ("energy", "mae", "positions"), ("mtt::d", "mse", None)]
        ):
            if name not in targets:
                continue
            sums[i] += pointwise_reference(
                kind, predictions[name], targets[name], None, gradient, reduction="sum"
            )
            block = targets[name].block_by_id(0)
            values = block.values if gradient is None else block.gradient(gradient).values
            counts[i] += int((~torch.isnan(values)).sum())
            batches[i] += 1
        if step == 3:
            assert len(module.aggregate._queue) == 1  # 3 steps were added, 1 is queued
    assert module.aggregate.batches.tolist() == batches  # reading adds the queue
    assert module.aggregate._queue == []
    epoch = module.compute()
    for i, name in enumerate(["energy", "energy/forces", "mtt::d"]):
        assert epoch[name].item() == pytest.approx(sums[i] / counts[i], rel=1e-12)
    module(*mlip_batch([2], generator))
    module.reset()
    assert all(v.item() == 0.0 for v in module.compute().values())
    assert module.aggregate.batches.tolist() == [0.0, 0.0, 0.0]


def test_read_values_returns_the_block_tensors(generator):
    tensor_map = multi_block_map([2, 3], generator, requires_grad=True)
    values, gradients = read_values(tensor_map)
    assert set(gradients) == {"positions"}
    for i, block in enumerate(tensor_map.blocks()):
        assert values[i] is block.values  # same tensors: gradients flow to the blocks
        assert gradients["positions"][i] is block.gradient("positions").values
    cache = ValueCache()
    cache.prefetch([tensor_map, tensor_map])
    assert cache.get(tensor_map)[0][1] is tensor_map.block_by_id(1).values


# --- absent and missing targets --------------------------------------------------------------
def test_absent_target_is_exact_zero(generator):
    targets = {"energy": {"quantity": "energy", "forces": True}, "mtt::dipole": {}}
    module = LossModule({"energy": {"forces": "mae"}, "mtt::dipole": "mse"}, targets)
    predictions, batch_targets = mlip_batch([3, 2], generator, requires_grad=True)
    total = module(predictions, batch_targets)
    expected = module.terms["energy"](predictions, batch_targets) + module.terms["energy/forces"](
        predictions, batch_targets
    )
    assert total.item() == pytest.approx(expected.item(), rel=1e-14)
    assert set(module.last_values) == {"energy", "energy/forces"}
    assert module.aggregate.batches.tolist() == [1.0, 1.0, 0.0]
    # nothing present at all: an exact zero connected to the predictions
    only_dipole = LossModule("mse", {"mtt::dipole": {}})
    zero = only_dipole(predictions, batch_targets)
    assert zero.item() == 0.0
    zero.backward()
    assert only_dipole.last_values == {}


def test_target_missing_from_predictions(generator):
    module = LossModule("mse", MLIP_TARGETS)
    _, targets = mlip_batch([3], generator)
    with pytest.raises(ValueError, match=r"'energy' is missing from predictions"):
        module({}, targets)


def test_ensemble_output_missing(generator):
    module = LossModule("gaussian_crps_ensemble", {"energy": {}})
    predictions, targets = mlip_batch([3], generator)
    with pytest.raises(ValueError, match=r"'energy_ensemble' is missing from predictions"):
        module(predictions, targets)


def test_reduction_none_is_rejected():
    with pytest.raises(ValueError, match=r"loss.mtt::dos.reduction: 'none'.*scalar"):
        LossModule(
            {"mtt::dos": {"type": "masked_dos", "extra_targets": 4, "reduction": "none"}},
            {"mtt::dos": {}},
        )

    @register_loss_type("per_sample_test", reductions=("mean", "sum", "none"))
    class PerSample(torch.nn.Module):
        def __init__(self, **kwargs):
            super().__init__()

    try:
        with pytest.raises(ValueError, match=r"loss.energy.gradients.positions.reduction"):
            LossModule(
                {"energy": {"forces": {"type": "per_sample_test", "reduction": "none"}}},
                {"energy": {"forces": True}},
            )
    finally:
        unregister_loss_type("per_sample_test")


def test_masked_terms_and_custom_gradient(generator):
    targets = {"mtt::x": {"gradients": ["positions"]}}
    module = LossModule(
        {
            "mtt::x": {
                "type": "masked_mse",
                "gradients": {
                    "positions": {"type": "masked_mae", "weight": 0.1, "reduction": "sum"}
                },
            }
        },
        targets,
    )
    prediction = multi_block_map([2, 3], generator, requires_grad=True)
    target = with_nans(multi_block_map([2, 3], generator), generator)
    mask = map_like(target, lambda v: (torch.rand(v.shape, generator=generator) > 0.4).double())
    total = module({"mtt::x": prediction}, {"mtt::x": target}, {"mtt::x_mask": mask})
    expected = pointwise_reference("mse", prediction, target, mask) + 0.1 * pointwise_reference(
        "mae", prediction, target, mask, "positions", reduction="sum"
    )
    assert total.item() == pytest.approx(expected, rel=1e-10)
    assert module.term_names == ["mtt::x", "mtt::x/positions"]


# --- per-property scales ------------------------------------------------------------------
class StubScaler(torch.nn.Module):
    """Scaler stand-in with known per-property scales (Scaler.forward's signature).

    ``scales[target][block]`` is a list of per-property scales for per-structure targets,
    or ``{atomic_type: [per-property scales]}`` for per-atom targets.
    """

    def __init__(self, scales):
        super().__init__()
        self.scales = scales
        self.calls = []

    def forward(self, systems, outputs, remove, use_per_target_scales, use_per_property_scales):
        assert (remove, use_per_target_scales, use_per_property_scales) == (False, False, True)
        self.calls.append(sorted(outputs))
        return {name: self._scale(systems, name, tm) for name, tm in outputs.items()}

    def _factors(self, systems, name, index, block):
        table = self.scales[name][index]
        rows = block.samples.values.tolist()
        if isinstance(table, dict):
            factors = [table[int(systems[s].types[a])] for s, a in rows]
        else:
            factors = [table for _ in rows]
        return torch.tensor(factors, dtype=block.values.dtype)

    def _scale(self, systems, name, tensor_map):
        blocks = []
        for index, block in enumerate(tensor_map.blocks()):
            factors = self._factors(systems, name, index, block)  # (samples, P)
            shape = (len(factors), *([1] * len(block.components)), factors.shape[-1])
            new = TensorBlock(
                block.values * factors.reshape(shape),
                block.samples,
                block.components,
                block.properties,
            )
            for parameter, gradient in block.gradients():
                parent = gradient.samples.column("sample").long()
                gshape = (len(parent), *([1] * len(gradient.components)), factors.shape[-1])
                new.add_gradient(
                    parameter,
                    TensorBlock(
                        gradient.values * factors[parent].reshape(gshape),
                        gradient.samples,
                        gradient.components,
                        gradient.properties,
                    ),
                )
            blocks.append(new)
        return TensorMap(tensor_map.keys, blocks)


def _scaled_by_loops(tensor_map, systems, table, n_members=1):
    """Reference scaling written with explicit loops over entries."""
    blocks = []
    for index, block in enumerate(tensor_map.blocks()):
        values = block.values.detach().clone()
        n_properties = values.shape[-1] // n_members
        rows = block.samples.values.tolist()
        for r, (s, a) in enumerate(rows):
            for column in range(values.shape[-1]):
                scale = table[index][int(systems[s].types[a])][column % n_properties]
                values[r, ..., column] *= scale
        new = TensorBlock(values, block.samples, block.components, block.properties)
        for parameter, gradient in block.gradients():
            gvalues = gradient.values.detach().clone()
            for r, (parent, _, _) in enumerate(gradient.samples.values.tolist()):
                s, a = rows[parent]
                for column in range(gvalues.shape[-1]):
                    gvalues[r, ..., column] *= table[index][int(systems[s].types[a])][
                        column % n_properties
                    ]
            new.add_gradient(
                parameter,
                TensorBlock(gvalues, gradient.samples, gradient.components, gradient.properties),
            )
        blocks.append(new)
    return TensorMap(tensor_map.keys, blocks)


PER_TYPE = [
    {1: [2.0, 0.5], 6: [3.0, 1.5], 8: [0.25, 4.0]},
    {1: [1.0, 2.0, 3.0], 6: [0.5, 0.5, 7.0], 8: [1.5, 2.5, 0.1]},
]


def test_per_property_scales_with_stub_scaler(generator):
    n_atoms = [3, 4]
    systems = systems_for(n_atoms, generator)
    targets_options = {
        "energy": {"quantity": "energy", "forces": True},
        "mtt::multi": {"per_atom": True, "gradients": ["positions"]},
    }
    loss = {
        "energy": {"forces": "mse"},
        "mtt::multi": {"type": "mse", "gradients": {"positions": "mae"}},
    }
    energy_pred, energy_target = mlip_batch(n_atoms, generator)
    multi_pred = multi_block_map(n_atoms, generator)
    multi_target = with_nans(multi_block_map(n_atoms, generator), generator)
    predictions = {**energy_pred, "mtt::multi": multi_pred}
    targets = {**energy_target, "mtt::multi": multi_target}

    scaler = StubScaler({"mtt::multi": PER_TYPE, "energy": [[10.0]]})
    module = LossModule(loss, targets_options, scaler=scaler)
    total = module(predictions, targets, None, systems)
    assert scaler.calls == [["mtt::multi"]]  # the single-property energy is untouched

    scaled = _scaled_by_loops(multi_pred, systems, PER_TYPE)
    expected = (
        pointwise_reference("mse", energy_pred["energy"], energy_target["energy"])
        + pointwise_reference(
            "mse", energy_pred["energy"], energy_target["energy"], None, "positions"
        )
        + pointwise_reference("mse", scaled, multi_target)
        + pointwise_reference("mae", scaled, multi_target, None, "positions")
    )
    assert total.item() == pytest.approx(expected, rel=1e-10)
    unscaled = LossModule(loss, targets_options)(predictions, targets)
    assert abs(unscaled.item() - expected) > 1e-3  # the scales matter
    with pytest.raises(ValueError, match="systems"):
        module(predictions, targets)


def test_per_structure_scales_need_no_systems(generator):
    scaler = StubScaler({"mtt::dipole": [[2.0, 0.5, 10.0]]})
    module = LossModule("mae", {"mtt::dipole": {}}, scaler=scaler)
    prediction = random_energy([2, 3, 1], generator, n_properties=3, gradients=False)
    target = with_nans(
        random_energy([2, 3, 1], generator, n_properties=3, gradients=False), generator
    )
    total = module({"mtt::dipole": prediction}, {"mtt::dipole": target})
    scales = torch.tensor([2.0, 0.5, 10.0], dtype=torch.float64)
    scaled = map_like(prediction, lambda v: v * scales)
    assert total.item() == pytest.approx(pointwise_reference("mae", scaled, target), rel=1e-12)


def test_ensemble_output_scaled_per_member(generator):
    n_atoms = [2, 3]
    systems = systems_for(n_atoms, generator)
    target = with_nans(multi_block_map(n_atoms, generator), generator)
    ensemble = ensemble_of(multi_block_map(n_atoms, generator), 4, generator)
    scaler = StubScaler({"mtt::multi": PER_TYPE})
    module = LossModule(
        {
            "mtt::multi": {
                "type": "empirical_crps_ensemble",
                "gradients": {"positions": "gaussian_nll_ensemble"},
            }
        },
        {"mtt::multi": {"gradients": ["positions"]}},
        scaler=scaler,
    )
    total = module({"mtt::aux::multi_ensemble": ensemble}, {"mtt::multi": target}, None, systems)
    scaled = _scaled_by_loops(ensemble, systems, PER_TYPE, n_members=4)
    expected = ensemble_reference("empirical_crps_ensemble", scaled, target) + ensemble_reference(
        "gaussian_nll_ensemble", scaled, target, "positions"
    )
    assert total.item() == pytest.approx(expected, rel=1e-10)


def test_dos_targets_are_not_property_scaled(generator):
    n_atoms = [2, 2]
    systems = systems_for(n_atoms, generator)
    scaler = StubScaler({"mtt::dos": PER_TYPE, "mtt::multi": PER_TYPE})
    module = LossModule(
        {"mtt::dos": {"type": "masked_dos", "extra_targets": 0}, "mtt::multi": "mse"},
        {"mtt::dos": {}, "mtt::multi": {}},
        scaler=scaler,
    )
    seen = {}

    def fake_dos(predictions, targets, extra_data=None):
        seen["prediction"] = predictions["mtt::dos"]
        return predictions["mtt::dos"].block_by_id(0).values.sum() * 0, torch.tensor(1)

    module.terms["mtt::dos"].sum_and_count = fake_dos  # the DOS loss is built elsewhere
    dos = multi_block_map(n_atoms, generator, with_gradient=False)
    multi = multi_block_map(n_atoms, generator, with_gradient=False)
    module(
        {"mtt::dos": dos, "mtt::multi": multi},
        {"mtt::dos": dos, "mtt::multi": multi},
        None,
        systems,
    )
    assert scaler.calls == [["mtt::multi"]]
    assert seen["prediction"] is dos


# --- global mean ------------------------------------------------------------------------------
def test_global_mean_single_process_equals_plain(generator):
    predictions, targets = mlip_batch([3, 1], generator)
    plain = LossModule(WEIGHTED, MLIP_TARGETS)(predictions, targets)
    global_ = LossModule(WEIGHTED, MLIP_TARGETS, global_mean=True)(predictions, targets)
    assert global_.item() == plain.item()


@pytest.mark.slow
def test_ddp_global_mean_gradient_equals_single_process(run_python):
    result = run_python(["tests/scripts/losses_ddp.py"], cwd=REPO_ROOT, timeout=300)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "DDP global mean OK" in result.stdout, result.stdout + result.stderr


# --- Lightning ------------------------------------------------------------------------------
@pytest.mark.parametrize(
    ("precision", "dtype"), [("64-true", torch.float64), ("32-true", torch.float32)]
)
def test_lightning_training_precision(precision, dtype):
    import lightning

    n_atoms = [3, 2, 4]
    generator = torch.Generator().manual_seed(0)
    batches = []
    for _ in range(3):
        features = torch.randn(sum(n_atoms), 4, generator=generator)
        targets = {
            "energy": with_nans(
                random_energy(n_atoms, generator, dtype=dtype), generator, fraction=0.1
            )
        }
        batches.append((features, targets))

    class Task(lightning.LightningModule):
        def __init__(self):
            super().__init__()
            self.linear = torch.nn.Linear(4, 4)
            self.loss = LossModule({"energy": {"forces": "mae", "stress": "huber"}}, MLIP_TARGETS)
            self.epoch_values = []

        def training_step(self, batch, _):
            features, targets = batch
            out = self.linear(features)
            system = torch.tensor([s for s, n in enumerate(n_atoms) for _ in range(n)])
            energy = torch.zeros(len(n_atoms), 1, dtype=out.dtype).index_add(0, system, out[:, :1])
            forces = out[:, 1:].unsqueeze(-1)
            strain = out[: len(n_atoms), :3, None, None].expand(-1, 3, 3, 1) * 1.0
            template = targets["energy"].block_by_id(0)
            block = TensorBlock(energy, template.samples, [], template.properties)
            for name, values in (("positions", forces), ("strain", strain)):
                g = template.gradient(name)
                block.add_gradient(name, TensorBlock(values, g.samples, g.components, g.properties))
            predictions = {"energy": TensorMap(targets["energy"].keys, [block])}
            total = self.loss(predictions, targets)
            assert total.dtype == dtype
            self.log_dict(
                {f"train/{k}": v for k, v in self.loss.last_values.items()}, batch_size=len(n_atoms)
            )
            return total

        def on_train_epoch_end(self):
            self.epoch_values.append(self.loss.compute())
            self.loss.reset()

        def configure_optimizers(self):
            return torch.optim.SGD(self.parameters(), lr=1e-2)

    task = Task()
    before = task.linear.weight.detach().clone()
    trainer = lightning.Trainer(
        precision=precision,
        max_epochs=2,
        accelerator="cpu",
        devices=1,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
    )
    trainer.fit(task, torch.utils.data.DataLoader(batches, batch_size=None))
    assert task.linear.weight.dtype == dtype
    assert not torch.equal(task.linear.weight.detach().to(before.dtype), before)
    assert len(task.epoch_values) == 2
    for values in task.epoch_values:
        assert set(values) == {"energy", "energy/forces", "energy/stress"}
        assert all(math.isfinite(v.item()) for v in values.values())
    assert "train/energy/forces" in trainer.callback_metrics


def test_create_loss_terms_match_module_terms(generator):
    module = LossModule(WEIGHTED, MLIP_TARGETS)
    predictions, targets = mlip_batch([2, 2], generator)
    direct = create_loss("huber", name="energy", gradient="strain", reduction="sum", delta=0.3)
    assert module.terms["energy/stress"](predictions, targets).item() == pytest.approx(
        direct(predictions, targets).item(), rel=1e-15
    )


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_no_host_device_sync_on_cuda():
    """After the first call (full metadata checks), a step makes no host-device sync."""
    generator = torch.Generator().manual_seed(3)
    device = torch.device("cuda")
    module = LossModule(WEIGHTED, MLIP_TARGETS).to(device)
    ensemble_module = LossModule(
        {"energy": {"type": "empirical_crps_ensemble", "forces": "gaussian_nll_ensemble"}},
        {"energy": {"quantity": "energy", "forces": True}},
    ).to(device)
    batches = []
    for n_atoms in ([3, 4], [5, 2, 2]):
        predictions, targets = mlip_batch(n_atoms, generator, requires_grad=False)
        ensemble = ensemble_of(predictions["energy"], 4, generator)
        batches.append(
            (
                {k: v.to(device) for k, v in {**predictions, "energy_ensemble": ensemble}.items()},
                {k: v.to(device) for k, v in targets.items()},
            )
        )
    module(*batches[0])
    ensemble_module(*batches[0])
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        module(*batches[1])
        ensemble_module(*batches[1])
    finally:
        torch.cuda.set_sync_debug_mode("default")
