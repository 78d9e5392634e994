"""metatrain's architectures (SOAP-BPNN, PET) behind pl_mtt's model contract: raw
outputs, forces and stress by autograd (against finite differences, float64), a real
Lightning training step with the trainer's own optimizer and schedule, pickling."""

from __future__ import annotations

import importlib
import io
import math
from pathlib import Path

import ase.build
import lightning.pytorch as pl
import pytest
import torch
import yaml
from metatomic.torch import System

from pl_mtt import AtomisticTask, ScalerCallback
from pl_mtt.data import (
    AtomisticDataModule,
    atoms_to_system,
    collate,
    embedded_dataset,
    system_to_atoms,
)
from pl_mtt.interop import calculator, export_model
from pl_mtt.models import MetatrainModel
from pl_mtt.models import metatrain as adapter
from pl_mtt.training.optim import warmup_cosine_factor

pytest.importorskip("metatrain")

CONF = Path(__file__).resolve().parent.parent / "conf"
ENERGY = {
    "energy": {
        "quantity": "energy",
        "unit": "eV",
        "per_atom": False,
        "num_subtargets": 1,
        "forces": True,
        "stress": True,
    }
}
TINY = {
    "soap_bpnn": {
        "soap": {"max_angular": 2, "max_radial": 2},
        "bpnn": {"num_hidden_layers": 1, "num_neurons_per_layer": 8},
    },
    "pet": {
        "d_pet": 8,
        "d_head": 8,
        "d_node": 8,
        "d_feedforward": 8,
        "num_heads": 1,
        "num_attention_layers": 1,
        "num_gnn_layers": 1,
        "cutoff": 4.0,
    },
}
ARCHITECTURES = list(TINY)


def tiny_model(architecture: str, **kwargs) -> MetatrainModel:
    options = {"targets": ENERGY, "atomic_types": [29, 79], **kwargs}
    return MetatrainModel(architecture, TINY[architecture], **options)


def structures() -> list[System]:
    bulk = ase.build.bulk("Cu", "fcc", a=3.6, cubic=True).repeat((2, 1, 1))
    bulk.numbers[[1, 4]] = 79
    bulk.rattle(0.05, seed=1)
    slab = ase.build.fcc111("Cu", (2, 2, 2), a=3.6, vacuum=4.0)
    slab.pbc = [True, True, False]
    slab.numbers[0] = 79
    slab.rattle(0.05, seed=2)
    return [atoms_to_system(bulk), atoms_to_system(slab)]


def energy_of(model: MetatrainModel, system: System, positions, cell) -> float:
    moved = System(types=system.types, positions=positions, cell=cell, pbc=system.pbc)
    with torch.no_grad():
        return float(model([moved])["energy"].block().values.sum())


@pytest.mark.parametrize("architecture", ARCHITECTURES)
def test_forces_and_stress_are_gradients_of_the_energy(architecture):
    """positions gradient = dE/dr and strain gradient = dE/d(strain), central finite
    differences in float64 (the strain acts on positions and cell: x (1 + ε))."""
    model = tiny_model(architecture)
    systems = structures()
    block = model(systems)["energy"].block()
    positions_gradient = block.gradient("positions")
    assert positions_gradient.samples.names == ["sample", "system", "atom"]
    assert positions_gradient.values.shape == (len(systems[0]) + len(systems[1]), 3, 1)
    assert block.gradient("strain").values.shape == (2, 3, 3, 1)
    step = 1e-5
    offset = 0
    for index, system in enumerate(systems):
        analytic = positions_gradient.values[offset : offset + len(system), :, 0]
        offset += len(system)
        for atom, axis in [(0, 0), (1, 2), (len(system) - 1, 1)]:
            plus, minus = system.positions.clone(), system.positions.clone()
            plus[atom, axis] += step
            minus[atom, axis] -= step
            numeric = (
                energy_of(model, system, plus, system.cell)
                - energy_of(model, system, minus, system.cell)
            ) / (2 * step)
            assert analytic[atom, axis].item() == pytest.approx(numeric, rel=1e-6, abs=1e-8)
        if index == 0:  # the periodic one: strain gradient
            eye = torch.eye(3, dtype=torch.float64)
            for a, b in [(0, 0), (0, 1), (2, 1)]:
                strain = torch.zeros(3, 3, dtype=torch.float64)
                strain[a, b] = step
                up = energy_of(
                    model, system, system.positions @ (eye + strain), system.cell @ (eye + strain)
                )
                down = energy_of(
                    model, system, system.positions @ (eye - strain), system.cell @ (eye - strain)
                )
                expected = (up - down) / (2 * step)
                value = block.gradient("strain").values[0, a, b, 0].item()
                assert value == pytest.approx(expected, rel=1e-6, abs=1e-8)


@pytest.mark.parametrize("architecture", ARCHITECTURES)
def test_raw_outputs_in_train_and_eval_mode(architecture):
    """metatrain adds its composition model and scaler in eval mode only; the adapter
    removes the composition model (pl_mtt's does the baseline) and leaves the scaler at
    1, so both modes give the same raw outputs."""
    model = tiny_model(architecture)
    names = [type(m).__name__ for m in model.module.additive_models]
    assert "CompositionModel" not in names
    systems = structures()
    train = model.train()(systems)["energy"]
    evaluation = model.eval()(systems)["energy"]
    torch.testing.assert_close(evaluation.block().values, train.block().values, rtol=0, atol=0)
    gradient = evaluation.block().gradient("positions").values
    torch.testing.assert_close(gradient, train.block().gradient("positions").values)


@pytest.mark.parametrize("architecture", ARCHITECTURES)
def test_pickles_and_loads_with_the_same_predictions(architecture):
    """``torch.save`` of the model (e.g. inside the app's model.pt): metatrain's modules
    hold TorchScript functions that pickle refuses; the adapter pickles its arguments
    and weights and is rebuilt on load."""
    model = tiny_model(architecture).eval()
    for parameter in model.parameters():  # not the initial weights
        parameter.data.add_(0.01)
    systems = structures()
    buffer = io.BytesIO()
    torch.save(model, buffer)
    buffer.seek(0)
    loaded = torch.load(buffer, weights_only=False)
    assert not loaded.training
    expected = model(systems)["energy"].block()
    got = loaded(systems)["energy"].block()
    torch.testing.assert_close(got.values, expected.values, rtol=0, atol=0)
    torch.testing.assert_close(
        got.gradient("strain").values, expected.gradient("strain").values, rtol=0, atol=0
    )


@pytest.mark.parametrize("architecture", ARCHITECTURES)
def test_conf_model_hypers_are_metatrain_defaults(architecture):
    defaults = adapter.architecture_defaults(architecture)["model"]
    config = yaml.safe_load((CONF / "model" / f"{architecture}.yaml").read_text())
    assert config["model"]["hypers"] == defaults
    assert config["model"]["architecture"] == architecture


def test_bad_hypers_name_the_key():
    with pytest.raises(ValueError, match=r"model\.hypers\.d_pett: unknown option.*'d_pet'"):
        MetatrainModel("pet", {"d_pett": 8}, targets=ENERGY, atomic_types=[29])
    with pytest.raises(ValueError, match=r"model\.hypers\.d_pet: expected an integer, got '8'"):
        MetatrainModel("pet", {"d_pet": "8"}, targets=ENERGY, atomic_types=[29])
    with pytest.raises(ValueError, match=r"model\.hypers\.soap\.cutoff\.radius: expected a number"):
        MetatrainModel(
            "soap_bpnn", {"soap": {"cutoff": {"radius": True}}}, targets=ENERGY, atomic_types=[29]
        )
    with pytest.raises(ValueError, match=r"model\.hypers\.zbl: only False is supported"):
        MetatrainModel("pet", {"zbl": True}, targets=ENERGY, atomic_types=[29])
    with pytest.raises(ValueError, match=r"not one of metatrain's architectures.*'soap_bpnn'"):
        MetatrainModel("soap_bpn", targets=ENERGY, atomic_types=[29])
    with pytest.raises(ValueError, match="needs `targets`"):
        MetatrainModel("pet")


@pytest.mark.usefixtures("without_metatrain")
def test_missing_metatrain_says_what_to_install():
    with pytest.raises(ImportError, match=r"pip install 'pl_mtt\[metatrain\]'"):
        MetatrainModel("pet", targets=ENERGY, atomic_types=[29])


def test_an_architecture_whose_dependencies_are_missing():
    architectures = importlib.import_module("metatrain.utils.architectures")
    missing = []
    for name in architectures.find_all_architectures():
        try:
            architectures.import_architecture(name)
        except ImportError:
            missing.append(name)
    if not missing:
        pytest.skip("every architecture of metatrain imports here")
    with pytest.raises(
        ImportError, match=rf"(?s)architecture '{missing[0]}' cannot be imported.*pip install"
    ):
        adapter.import_architecture(missing[0])


def test_warmup_cosine_matches_metatrain_schedule():
    trainer = importlib.import_module("metatrain.soap_bpnn.trainer")
    for epochs, steps, warmup in [(10, 7, 0.1), (3, 5, 0.01), (1, 1, 0.0)]:
        parameter = torch.nn.Parameter(torch.zeros(1))
        optimizer = torch.optim.Adam([parameter], lr=1.0)
        theirs = trainer.get_scheduler(
            optimizer, {"num_epochs": epochs, "warmup_fraction": warmup}, steps
        )
        ours = warmup_cosine_factor(epochs * steps, warmup)
        for step in range(epochs * steps + 1):
            assert ours(step) == pytest.approx(theirs.lr_lambdas[0](step), abs=1e-15)


@pytest.fixture(scope="module")
def emt_data(tmp_path_factory):
    data = embedded_dataset("emt", n_structures=12, directory=tmp_path_factory.mktemp("emt"))
    module = AtomisticDataModule(
        path=data.path, targets=data.targets, val_fraction=0.25, test_fraction=0.0, batch_size=4
    )
    module.setup()
    return module


@pytest.mark.parametrize(
    ("architecture", "optimizer"),
    [
        ("soap_bpnn", {"lr": 1e-3, "schedule": "warmup_cosine", "warmup_fraction": 0.0}),
        (
            "pet",
            {
                "lr": 1e-4,
                "schedule": "warmup_cosine",
                "warmup_fraction": 0.5,
                "grad_clip_norm": 1e-3,
                "optimizer": "adamw",
                "weight_decay": 0.1,
            },
        ),
    ],
)
def test_one_training_step_under_lightning(architecture, optimizer, emt_data, tmp_path):
    """A real Trainer step on CPU: scales fitted by the ScalerCallback, the trainer's
    optimizer and per-step warmup + cosine schedule, gradient clipping for PET; then the
    metatomic export (scales and baseline inside) predicts what the task predicts."""
    model = MetatrainModel(
        architecture,
        TINY[architecture],
        targets=emt_data.target_options,
        atomic_types=emt_data.atomic_types,
    )
    task = AtomisticTask(model, "mse", emt_data.target_options, **optimizer)
    before = {k: v.detach().clone() for k, v in model.named_parameters()}
    clipped = []
    if "grad_clip_norm" in optimizer:

        def record(module, opt, gradient_clip_val=None, gradient_clip_algorithm=None):
            AtomisticTask.configure_gradient_clipping(module, opt, None, None)
            norms = [p.grad.norm() for p in module.model.parameters() if p.grad is not None]
            clipped.append(float(torch.linalg.vector_norm(torch.stack(norms))))

        task.configure_gradient_clipping = record.__get__(task)
    trainer = pl.Trainer(
        accelerator="cpu",
        max_epochs=2,
        limit_train_batches=1,
        limit_val_batches=0,
        callbacks=[ScalerCallback(progress_bar=False)],
        inference_mode=False,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
    )
    trainer.fit(task, emt_data)
    assert task.scaler.fitted
    # the lists the architecture reads were attached to the data's structures (once)
    (requested,) = model.requested_neighbor_lists()
    for system in emt_data.train_dataset.systems:
        assert any(requested == known for known in system.known_neighbor_lists())
    changed = [not torch.equal(before[k], v) for k, v in model.named_parameters()]
    assert any(changed)
    optimizer_used = trainer.optimizers[0]
    expected_class = (
        torch.optim.AdamW if optimizer.get("optimizer") == "adamw" else torch.optim.Adam
    )
    assert type(optimizer_used) is expected_class
    # two steps of warmup_cosine over 2 epochs x 1 batch: step 0 -> factor 0 with a
    # warmup of one step, else 1; after both steps the cosine reaches 0
    factor = warmup_cosine_factor(2, optimizer["warmup_fraction"])
    assert optimizer_used.param_groups[0]["lr"] == pytest.approx(optimizer["lr"] * factor(2))
    assert math.isclose(factor(2), 0.0, abs_tol=1e-15)
    if clipped:
        assert all(norm <= 1e-3 * (1 + 1e-6) for norm in clipped)
    # the exported model (TorchScript, through raw_outputs) in an ASE calculator
    path = export_model(task, tmp_path / "model.pt")
    ase_calculator = calculator(path)
    task.eval()
    systems, _, _ = collate([emt_data.train_dataset[i] for i in range(2)])
    expected = task(systems)["energy"].block()
    forces = -expected.gradient("positions").values[:, :, 0].detach()
    offset = 0
    for index, system in enumerate(systems):
        atoms = system_to_atoms(system)
        atoms.calc = ase_calculator
        energy = expected.values[index, 0]
        assert atoms.get_potential_energy() == pytest.approx(float(energy), rel=1e-10)
        got = torch.from_numpy(atoms.get_forces())
        torch.testing.assert_close(got, forces[offset : offset + len(atoms)], rtol=1e-8, atol=1e-10)
        offset += len(atoms)
