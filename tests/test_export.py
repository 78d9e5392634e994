"""metatomic export: round trips in a fresh process equal AtomisticTask.forward, forces and
stress against finite differences, NVE energy conservation, the ASE calculator, metadata
and bad input."""

from __future__ import annotations

import warnings
from pathlib import Path

import ase
import ase.build
import ase.io
import numpy as np
import pytest
import torch
from metatensor.torch import Labels, TensorBlock, TensorMap
from metatomic.torch import System, load_atomistic_model

import pl_mtt
from pl_mtt import AtomisticTask, ScalerCallback
from pl_mtt.data import AtomisticDataModule, atoms_to_system, system_to_atoms
from pl_mtt.interop import atomistic_model, export_model, exported_output_names
from pl_mtt.interop.export import main as export_main
from pl_mtt.models import RadialMLP
from tests.conftest import python_subprocess, quiet_trainer

SCRIPTS = Path(__file__).parent / "scripts"
SMALL = {"cutoff": 4.0, "n_radial": 6, "type_dim": 3, "hidden": [16]}
DOS_POINTS, DOS_EXTRA = 130, 10


@pytest.fixture(autouse=True)
def _quiet():
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        yield


def _train(
    data: AtomisticDataModule,
    model: dict,
    loss,
    checkpoint: Path | None = None,
    steps: int = 3,
) -> AtomisticTask:
    """Real training steps with ScalerCallback (fitted scales and baseline); the model is
    built from its config, so that a checkpoint loads on its own."""
    data.setup()
    config = {"_target_": "pl_mtt.models.RadialMLP", **SMALL, **model}
    task = AtomisticTask(None, loss, data.target_options, lr=3e-2, model_config=config)
    trainer = quiet_trainer(
        max_steps=steps, limit_val_batches=0, num_sanity_val_steps=0, callbacks=[ScalerCallback()]
    )
    trainer.fit(task, data)
    if checkpoint is not None:
        trainer.save_checkpoint(checkpoint)
    return task.eval()


def _emt(dtype: str = "float64") -> AtomisticDataModule:
    return AtomisticDataModule("emt", n_structures=24, batch_size=4, dtype=dtype)


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("checkpoints")


@pytest.fixture(scope="module")
def tasks(checkpoints) -> dict[str, tuple[AtomisticTask, AtomisticDataModule]]:
    """Trained reference model, ensemble head, DOS head, float32 model (checkpoints of
    the first and the DOS head in ``checkpoints``). The reference model trains long
    enough for realistic forces (RMS ~0.5 eV/Å, as the EMT data): the NVE test needs them."""
    torch.manual_seed(0)
    result = {}
    data = _emt()
    reference = _train(data, {}, "mse", checkpoints / "energy.ckpt", steps=100)
    result["energy"] = (reference, data)
    data = _emt()
    ensemble = {"energy": {"type": "gaussian_crps_ensemble", "forces": "mse", "stress": "mse"}}
    result["ensemble"] = (_train(data, {"ensemble_size": 4}, ensemble), data)
    data = AtomisticDataModule("dos", n_structures=8, batch_size=4)
    dos_model = {"target": "mtt::dos", "quantity": "dos", "num_properties": DOS_POINTS + DOS_EXTRA}
    dos_loss = {"mtt::dos": {"type": "masked_dos", "extra_targets": DOS_EXTRA}}
    result["dos"] = (_train(data, dos_model, dos_loss, checkpoints / "dos.ckpt"), data)
    data = _emt("float32")
    result["float32"] = (_train(data, {"dtype": "float32"}, "mse"), data)
    return result


def _reference(task: AtomisticTask, systems: list[System]) -> dict[str, TensorMap]:
    with torch.enable_grad():
        return {name: t.to("cpu") for name, t in task(systems).items()}


def _test_systems(data: AtomisticDataModule) -> list[System]:
    return [data.test_dataset[i][0] for i in range(len(data.test_dataset))] + [
        data.train_dataset[0][0]
    ]


def _close(actual, expected, rtol: float, what: str) -> None:
    actual = torch.as_tensor(actual, dtype=torch.float64)
    expected = torch.as_tensor(expected, dtype=torch.float64)
    scale = float(expected.abs().max()) or 1.0
    torch.testing.assert_close(actual, expected, rtol=rtol, atol=rtol * scale, msg=what)


@pytest.fixture(scope="module")
def exported(tasks, tmp_path_factory):
    """Every task exported, then evaluated by one fresh process through metatomic's ASE
    calculator (only metatomic, no pl_mtt, imported there)."""
    root = tmp_path_factory.mktemp("exported")
    paths, structures = {}, {}
    for name, (task, data) in tasks.items():
        paths[name] = export_model(task, root / f"{name}.pt")
        frames = [system_to_atoms(s) for s in _test_systems(data)]
        structures[name] = root / f"{name}.xyz"
        ase.io.write(structures[name], frames, format="extxyz")
    out = root / "predictions.pt"
    pairs = [f"{paths[name]}:{structures[name]}" for name in tasks]
    result = python_subprocess(
        [str(SCRIPTS / "exported_predictions.py"), str(out), *pairs], cwd=root
    )
    assert result.returncode == 0, result.stderr[-3000:]
    assert result.stdout.split()[-1] == "[]"  # neither pl_mtt nor metatrain imported
    predictions = torch.load(out, weights_only=False)
    outputs = {name: predictions[str(paths[name])] for name in tasks}
    return paths, structures, outputs


def _systems_of(path: Path, dtype: torch.dtype) -> list[System]:
    return [atoms_to_system(a, dtype) for a in ase.io.read(path, index=":")]


@pytest.mark.parametrize(("name", "rtol"), [("energy", 1e-10), ("float32", 1e-5)])
def test_round_trip_energy_forces_stress(tasks, exported, name, rtol):
    task, _ = tasks[name]
    _, structures, outputs = exported
    dtype = torch.float64 if name == "energy" else torch.float32
    systems = _systems_of(structures[name], dtype)
    for system, predicted in zip(systems, outputs[name], strict=True):
        block = _reference(task, [system])["energy"].block()
        _close(predicted["energy"], block.values[0, 0], rtol, "energy")
        _close(predicted["forces"], -block.gradient("positions").values[:, :, 0], rtol, "forces")
        per_atom = predicted["energy/atom"][:, 0]
        _close(per_atom.sum(), block.values[0, 0], rtol, "sum of per-atom energies")
        if "stress" in predicted:
            volume = abs(float(torch.linalg.det(system.cell.double())))
            expected = block.gradient("strain").values[0, :, :, 0] / volume
            _close(predicted["stress"], expected, rtol, "stress")


def test_round_trip_ensemble_head(tasks, exported):
    task, _ = tasks["ensemble"]
    _, structures, outputs = exported
    systems = _systems_of(structures["ensemble"], torch.float64)
    for system, predicted in zip(systems, outputs["ensemble"], strict=True):
        reference = _reference(task, [system])
        members = reference["energy_ensemble"].block().values[0]
        _close(predicted["energy_ensemble/system"][0], members, 1e-10, "members")
        _close(predicted["energy_uncertainty/system"][0, 0], members.std(), 1e-10, "std")
        assert predicted["energy_ensemble/system/properties"].tolist() == [[0], [1], [2], [3]]
        _close(predicted["energy"], reference["energy"].block().values[0, 0], 1e-10, "mean")
        gradient = reference["energy"].block().gradient("positions").values[:, :, 0]
        _close(predicted["forces"], -gradient, 1e-10, "forces of the mean")
        # per-atom members sum to the structure's members
        _close(predicted["energy_ensemble/atom"].sum(0), members, 1e-10, "per-atom members")


def test_round_trip_dos_head(tasks, exported):
    task, _ = tasks["dos"]
    paths, structures, outputs = exported
    systems = _systems_of(structures["dos"], torch.float64)
    model = load_atomistic_model(paths["dos"])
    assert "mtt::dos" in model.capabilities().outputs
    assert model.capabilities().outputs["mtt::dos"].unit == ""  # states/eV: no metatomic unit
    assert "states/eV" in model.capabilities().outputs["mtt::dos"].description
    for system, predicted in zip(systems, outputs["dos"], strict=True):
        expected = _reference(task, [system])["mtt::dos"].block().values[0]
        assert expected.shape == (DOS_POINTS + DOS_EXTRA,)
        _close(predicted["mtt::dos/system"][0], expected, 1e-10, "dos")
        assert "energy" not in predicted


def test_capabilities_and_metadata(tasks):
    task, data = tasks["ensemble"]
    metadata = {
        "name": "Cu/Au EMT test",
        "description": "a test",
        "authors": ["A. Author"],
        "references": {"model": "https://example.org/model"},
    }
    model = atomistic_model(task, metadata=metadata)
    capabilities = model.capabilities()
    assert sorted(capabilities.outputs) == ["energy", "energy_ensemble", "energy_uncertainty"]
    assert capabilities.outputs["energy"].unit == "eV"
    assert capabilities.outputs["energy"].sample_kind == "atom"
    assert capabilities.atomic_types == data.atomic_types == [29, 79]
    assert capabilities.interaction_range == SMALL["cutoff"]
    assert capabilities.length_unit == "angstrom"
    assert capabilities.dtype == "float64"
    [requested] = model.requested_neighbor_lists()
    assert (requested.cutoff, requested.full_list, requested.strict) == (4.0, True, True)
    info = model.metadata()
    assert (info.name, info.description, info.authors) == (
        "Cu/Au EMT test",
        "a test",
        ["A. Author"],
    )
    assert info.references["model"] == ["https://example.org/model"]
    default = atomistic_model(task).metadata()
    assert default.name == "pl_mtt RadialMLP (energy)"
    # the task's own model is untouched (AtomisticModel froze a copy)
    assert all(p.requires_grad for p in task.model.parameters())
    assert exported_output_names("mtt::dos") == {
        "value": "mtt::dos",
        "ensemble": "mtt::aux::dos_ensemble",
        "uncertainty": "mtt::aux::dos_uncertainty",
    }
    assert exported_output_names("charges")["value"] == "mtt::charges"


def _rattled_cell() -> ase.Atoms:
    atoms = ase.build.bulk("Cu", "fcc", a=3.62, cubic=True) * (2, 2, 1)
    atoms.numbers[[1, 6, 11]] = 79
    atoms.rattle(0.08, seed=3)
    atoms.set_cell(
        atoms.cell.array @ np.array([[1.0, 0.02, 0], [0, 0.99, 0.01], [0, 0, 1.01]]),
        scale_atoms=True,
    )
    return atoms


def test_forces_and_stress_are_finite_differences_of_the_exported_energy(tasks, exported):
    paths, _, _ = exported
    calculator = pl_mtt.calculator(paths["energy"])
    atoms = _rattled_cell()
    atoms.calc = calculator
    forces, stress = atoms.get_forces(), atoms.get_stress(voigt=False)

    def energy(positions=None, cell=None) -> float:
        moved = atoms.copy()
        if cell is not None:
            moved.set_cell(cell, scale_atoms=True)
        if positions is not None:
            moved.positions = positions
        moved.calc = calculator
        return moved.get_potential_energy()

    h = 1e-5
    for atom in (0, 1, 6):
        for xyz in range(3):
            plus, minus = atoms.positions.copy(), atoms.positions.copy()
            plus[atom, xyz] += h
            minus[atom, xyz] -= h
            numeric = -(energy(positions=plus) - energy(positions=minus)) / (2 * h)
            assert forces[atom, xyz] == pytest.approx(numeric, abs=1e-7)
    volume = atoms.get_volume()
    for a in range(3):
        for b in range(3):
            step = np.zeros((3, 3))
            step[a, b] = h
            cells = [atoms.cell.array @ (np.eye(3) + sign * step) for sign in (1, -1)]
            numeric = (energy(cell=cells[0]) - energy(cell=cells[1])) / (2 * h) / volume
            assert stress[a, b] == pytest.approx(numeric, abs=1e-8)
    assert np.abs(forces).max() > 1e-3  # not a trivially flat model


def test_nve_conserves_energy(tasks, exported):
    """500 steps of 1 fs (velocity Verlet, float64): |E(t) - E(0)| <= 1 meV/atom."""
    from ase.md.velocitydistribution import MaxwellBoltzmannDistribution
    from ase.md.verlet import VelocityVerlet
    from ase.units import fs

    paths, _, _ = exported
    atoms = _rattled_cell()
    atoms.calc = pl_mtt.calculator(paths["energy"])
    MaxwellBoltzmannDistribution(atoms, temperature_K=600, rng=np.random.default_rng(0))
    dynamics = VelocityVerlet(atoms, timestep=1.0 * fs)
    total, potential = [], []

    def record() -> None:
        total.append(atoms.get_total_energy())
        potential.append(atoms.get_potential_energy())

    dynamics.attach(record, interval=10)
    dynamics.run(500)
    n_atoms = len(atoms)
    drift = np.abs(np.array(total) - total[0]).max() / n_atoms
    assert drift <= 1e-3
    # the test can fail: energy flows between kinetic and potential by much more
    assert (max(potential) - min(potential)) / n_atoms > 10 * drift
    assert (max(potential) - min(potential)) / n_atoms > 1e-3


def test_calculator_of_a_checkpoint_equals_the_exported_file(tasks, exported, checkpoints):
    task, _ = tasks["energy"]
    paths, _, _ = exported
    atoms = _rattled_cell()
    results = []
    for source in (paths["energy"], checkpoints / "energy.ckpt"):
        atoms.calc = pl_mtt.calculator(source)
        results.append((atoms.get_potential_energy(), atoms.get_forces()))
    assert results[0][0] == pytest.approx(results[1][0], rel=1e-12)
    np.testing.assert_allclose(results[0][1], results[1][1], rtol=1e-10, atol=1e-12)
    reference = _reference(task, [atoms_to_system(atoms)])["energy"].block().values
    assert results[0][0] == pytest.approx(float(reference), rel=1e-10)


def test_command_line_exports_a_checkpoint(checkpoints, tmp_path):
    path = export_main(
        [str(checkpoints / "dos.ckpt"), "-o", str(tmp_path / "dos.pt"), "--name", "DOS"]
    )
    model = load_atomistic_model(path)
    assert model.metadata().name == "DOS"
    assert sorted(model.capabilities().outputs) == ["mtt::dos"]


# -- bad input ------------------------------------------------------------------------------
def test_a_model_without_fitted_scales_is_an_error(tasks, tmp_path):
    task, data = tasks["energy"]
    unscaled = AtomisticTask(RadialMLP(**SMALL), "mse", data.target_options)  # no scaler
    with pytest.raises(ValueError, match=r"no fitted scales .* unscaled=True"):
        export_model(unscaled, tmp_path / "x.pt")
    unfitted = AtomisticTask(RadialMLP(**SMALL), "mse", data.target_options)
    unfitted.scaler = type(task.scaler)(data.atomic_types, data.layouts())
    with pytest.raises(ValueError, match="scales of this model are not fitted"):
        export_model(unfitted, tmp_path / "x.pt")
    # trained without scales: exported as raw outputs on request
    model = atomistic_model(unscaled, unscaled=True, atomic_types=[29, 79])
    assert model.capabilities().atomic_types == [29, 79]
    with pytest.raises(ValueError, match="give atomic_types"):
        atomistic_model(unscaled, unscaled=True)


class _TwoBlocks(RadialMLP):
    """An output with two blocks: the export cannot describe it."""

    def raw_outputs(self, systems, outputs, selected_atoms=None):
        result = super().raw_outputs(systems, outputs, selected_atoms)
        block = result[self.target].block()
        keys = Labels(["k"], torch.tensor([[0], [1]]))
        blocks = [TensorBlock(block.values, block.samples, [], block.properties) for _ in keys]
        return {self.target: TensorMap(keys, blocks)}


def test_outputs_the_export_cannot_describe(tasks, tmp_path):
    task, data = tasks["energy"]
    two_blocks = AtomisticTask(_TwoBlocks(**SMALL), "mse", data.target_options)
    two_blocks.scaler, two_blocks.composition = task.scaler, task.composition
    with pytest.raises(ValueError, match="output 'energy' has 2 block"):
        export_model(two_blocks, tmp_path / "x.pt")
    plain = AtomisticTask(torch.nn.Linear(2, 2), "mse", data.target_options)
    plain.scaler, plain.composition = task.scaler, task.composition
    with pytest.raises(ValueError, match="Linear has no raw_outputs"):
        export_model(plain, tmp_path / "x.pt")
    other = AtomisticTask(RadialMLP(**SMALL, target="mtt::other"), "mse", data.target_options)
    other.scaler, other.composition = task.scaler, task.composition
    with pytest.raises(ValueError, match="output 'mtt::other' of the model is neither"):
        export_model(other, tmp_path / "x.pt")


def test_unwritable_paths_and_missing_checkpoints(tasks, tmp_path):
    task, _ = tasks["energy"]
    with pytest.raises(ValueError, match=r"directory .* does not exist"):
        export_model(task, tmp_path / "missing" / "model.pt")
    with pytest.raises(ValueError, match="is a directory"):
        export_model(task, tmp_path)
    (tmp_path / "file").write_text("")
    with pytest.raises(ValueError, match="does not exist"):
        export_model(task, tmp_path / "file" / "model.pt")
    with pytest.raises(ValueError, match=r"checkpoint .* does not exist"):
        export_main([str(tmp_path / "nothing.ckpt")])
    (tmp_path / "bad.ckpt").write_text("not a checkpoint")
    with pytest.raises(ValueError, match=r"could not load .* as a checkpoint"):
        export_model(tmp_path / "bad.ckpt", tmp_path / "x.pt")
    with pytest.raises(ValueError, match="does not exist"):
        pl_mtt.calculator(tmp_path / "nothing.pt")


@pytest.mark.slow
def test_a_model_with_torchscript_extensions_has_exact_forces_in_a_fresh_process(tmp_path):
    """SOAP-BPNN (metatrain) needs sphericart's extension, whose autograd formulas its
    Python package registers: pl_mtt.calculator imports it, so forces are the gradient
    of the energy in a process that imported nothing (metatomic's loader alone gives
    forces 0.02 eV/Å off here)."""
    pytest.importorskip("metatrain")
    path = tmp_path / "soap.pt"
    result = python_subprocess([str(SCRIPTS / "soap_bpnn_export.py"), str(path)], cwd=tmp_path)
    assert result.returncode == 0, result.stderr[-3000:]
    assert result.stdout.split("\n")[-2] == "['sphericart_torch']"
    assert (tmp_path / "extensions").is_dir()
    result = python_subprocess([str(SCRIPTS / "calculator_forces.py"), str(path)], cwd=tmp_path)
    assert result.returncode == 0, result.stderr[-3000:]
    error, largest = map(float, result.stdout.split())
    assert largest > 1e-3
    assert error < 1e-6 * max(largest, 1.0)


def test_a_per_atom_target_gets_its_per_type_scales_and_baseline():
    """Per-atom target (charges-like, two properties): the exported values equal
    AtomisticTask.forward atom by atom (per-type scales and baselines), and summed per
    structure when the engine asks for one value per structure."""
    from metatomic.torch import ModelEvaluationOptions, ModelOutput

    from pl_mtt import CompositionModel, Scaler, fit_pass
    from pl_mtt.data import attach_neighbor_lists, collate
    from pl_mtt.tensormaps import atomistic_tensor_map, range_labels, zero_sample_layout

    frames = [ase.build.bulk("Cu", "fcc", a=3.6, cubic=True), _rattled_cell()]
    systems = [atoms_to_system(a) for a in frames]
    generator = torch.Generator().manual_seed(1)
    targets = []
    for system in systems:  # per-type offsets and spreads the fit must pick up
        n = len(system)
        values = torch.randn(n, 2, generator=generator, dtype=torch.float64)
        values = values * (1 + (system.types[:, None] == 79)) + 3.0 * (system.types[:, None] == 79)
        targets.append(
            atomistic_tensor_map(
                values,
                range_labels("properties", 2),
                per_atom=True,
                atom_system=torch.zeros(n, dtype=torch.int64),
                atom_index=torch.arange(n),
            )
        )
    name = "mtt::charges"
    batch = collate([(s, {name: t}, {}) for s, t in zip(systems, targets, strict=True)])
    layouts = {name: zero_sample_layout(batch[1][name])}
    scaler, composition = Scaler([29, 79], layouts), CompositionModel([29, 79], layouts)
    fit_pass([batch], scaler, composition)
    model = RadialMLP(**SMALL, target=name, quantity="charge", num_properties=2, per_atom=True)
    task = AtomisticTask(model, "mse", {name: {"per_atom": True}}).eval()
    task.scaler, task.composition = scaler, composition
    scaled = scaler.scales[name].block().values
    assert not torch.allclose(scaled[0], scaled[1])  # really per type
    exported = torch.jit.script(atomistic_model(task))
    assert exported.capabilities().outputs[name].sample_kind == "atom"
    attach_neighbor_lists(systems, exported.requested_neighbor_lists())
    expected = _reference(task, systems)[name].block().values
    for kind in ("atom", "system"):
        options = ModelEvaluationOptions(
            length_unit="angstrom", outputs={name: ModelOutput(sample_kind=kind)}
        )
        values = exported(systems, options, check_consistency=True)[name].block().values
        if kind == "atom":
            _close(values, expected, 1e-12, "per atom")
        else:
            sums = torch.stack([expected[:4].sum(0), expected[4:].sum(0)])
            _close(values, sums, 1e-12, "per structure")
