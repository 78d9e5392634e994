"""``python -m pl_mtt.train options=<metatrain options.yaml>`` end to end in subprocesses:
today's outputs for a metatrain architecture (SOAP-BPNN), and a 2-process gloo DDP run."""

from __future__ import annotations

import csv
from pathlib import Path

import ase.io
import lightning.pytorch as pl
import pytest
import torch
import yaml

from pl_mtt import AtomisticTask
from pl_mtt.data import AtomisticDataModule, collate, embedded_dataset

pytest.importorskip("metatrain")
pytestmark = pytest.mark.slow

QUIET = ["trainer.enable_progress_bar=false", "trainer.enable_model_summary=false"]


@pytest.fixture(scope="module")
def workdir(tmp_path_factory):
    """A directory with a 16-structure extxyz file and a tiny SOAP-BPNN options file."""
    directory = tmp_path_factory.mktemp("options_app")
    data = embedded_dataset("emt", n_structures=16, directory=directory / "cache")
    ase.io.write(directory / "emt.xyz", ase.io.read(data.path, index=":"), format="extxyz")
    options = {
        "seed": 2,
        "base_precision": 64,
        "print_stats": False,
        "architecture": {
            "name": "soap_bpnn",
            "model": {
                "soap": {"max_angular": 2, "max_radial": 2},
                "bpnn": {"num_hidden_layers": 1, "num_neurons_per_layer": 8},
            },
            "training": {"batch_size": 4, "num_epochs": 5, "log_interval": 1},
        },
        "training_set": {
            "systems": {"read_from": "emt.xyz", "length_unit": "angstrom"},
            "targets": {"energy": {"key": "energy", "unit": "eV"}},
        },
        "validation_set": 0.25,
        "test_set": 0.25,
    }
    (directory / "options.yaml").write_text(yaml.safe_dump(options))
    return directory


def run_dirs(root: Path) -> list[Path]:
    return sorted(p.parent for p in root.glob("outputs/*/*/.hydra"))


def epoch_rows(metrics_csv: Path, key: str) -> list[float]:
    with open(metrics_csv, newline="") as handle:
        return [float(row[key]) for row in csv.DictReader(handle) if row.get(key)]


def test_options_file_end_to_end(workdir, run_python):
    before = set(run_dirs(workdir))
    result = run_python(
        ["-m", "pl_mtt.train", "options=options.yaml", "trainer.max_epochs=2", *QUIET],
        cwd=workdir,
        env={"OMP_NUM_THREADS": "1"},
    )
    assert result.returncode == 0, result.stderr[-4000:]
    (run_dir,) = set(run_dirs(workdir)) - before
    # the keys not acted on, listed once at start-up
    assert result.stdout.count("keys pl_mtt does not act on") == 1
    assert "architecture.training.log_interval" in result.stdout
    assert "print_stats" in result.stdout
    # today's outputs, for 2 epochs (the command line over num_epochs: 5)
    metrics = run_dir / "metrics.csv"
    assert len(epoch_rows(metrics, "val/forces/MAE")) == 2
    assert len(epoch_rows(metrics, "train/energy_per_atom/RMSE")) == 2
    assert len(epoch_rows(metrics, "val/loss")) == 2
    assert epoch_rows(metrics, "test/stress/MAE")
    assert (run_dir / "checkpoints" / "last.ckpt").is_file()
    assert (run_dir / "model-metatomic.pt").is_file()  # the metatomic export, SOAP-BPNN inside
    assert "was not written" not in result.stderr
    assert {"parity_forces.png", "learning_curve_loss.png"} <= {
        p.name for p in (run_dir / "plots").glob("*.png")
    }
    assert "| forces | eV/Å |" in (run_dir / "test_metrics.md").read_text()
    sizes = {
        name: len((run_dir / "indices" / f"{name}.txt").read_text().split())
        for name in ("training", "validation", "test")
    }
    assert sizes == {"training": 8, "validation": 4, "test": 4}
    # model.pt (pickled, with SOAP-BPNN inside) loads and predicts as the checkpoint
    inference = torch.load(run_dir / "model.pt", weights_only=False)
    task = AtomisticTask.load_from_checkpoint(run_dir / "checkpoints" / "last.ckpt")
    assert task.model.architecture == "soap_bpnn"
    frames = ase.io.read(workdir / "emt.xyz", index=":3")
    module = AtomisticDataModule(
        path=str(workdir / "emt.xyz"), targets={"energy": {}}, val_fraction=0, test_fraction=0
    )
    module.setup()
    systems, targets, _ = collate([module.train_dataset[i] for i in range(3)])
    assert len(frames) == 3
    physical = inference(systems)["energy"].block().values.detach()
    torch.testing.assert_close(physical, task(systems)["energy"].block().values.detach())
    error = (physical - targets["energy"].block().values).abs()
    assert float(error.max()) < 5.0  # eV: physical units, baseline included


def test_options_file_takes_weights_and_a_schedule(workdir, run_python, tmp_path):
    """An options file whose extra_data reads config_weight from the extxyz info, with
    pl_mtt's sample_weights and loss_schedule given on the command line (metatrain's
    schema has neither): both reach the resolved configuration (dry run)."""
    frames = ase.io.read(workdir / "emt.xyz", index=":")
    for index, atoms in enumerate(frames):
        atoms.info["config_weight"] = 0.5 + index % 3
    ase.io.write(tmp_path / "emt.xyz", frames, format="extxyz")
    options = yaml.safe_load((workdir / "options.yaml").read_text())
    options["training_set"]["extra_data"] = {"config_weight": {"key": "config_weight"}}
    (tmp_path / "options.yaml").write_text(yaml.safe_dump(options))
    result = run_python(
        [
            "-m",
            "pl_mtt.train",
            "options=options.yaml",
            "+loss.energy.sample_weights=config_weight",
            "+loss.energy.forces.type_weights={Cu: 2.0}",
            "loss_schedule=[{epoch: 2, loss: {energy: {weight: 10.0}}}]",
            "dry_run=true",
        ],
        cwd=tmp_path,
        env={"OMP_NUM_THREADS": "1"},
    )
    assert result.returncode == 0, result.stderr[-4000:]
    assert "energy (mse, weights config_weight)" in result.stdout
    assert "energy/forces (mse, weights type weights {29: 2.0})" in result.stdout
    assert "\nloss_schedule: [{epoch: 2, loss: {energy: {weight: 10.0}}}]\n" in result.stdout


def test_options_file_ddp_two_processes(workdir, run_python):
    """trainer.devices=2 trainer.strategy=ddp on CPU (gloo): the logged validation metrics
    equal a single-process validation of the saved checkpoint."""
    before = set(run_dirs(workdir))
    result = run_python(
        [
            "-m",
            "pl_mtt.train",
            "options=options.yaml",
            "trainer.max_epochs=1",
            "trainer.devices=2",
            "trainer.strategy=ddp",
            *QUIET,
        ],
        cwd=workdir,
        env={"OMP_NUM_THREADS": "1"},
        timeout=400,
    )
    assert result.returncode == 0, result.stderr[-4000:]
    assert result.stdout.count("keys pl_mtt does not act on") == 1
    (run_dir,) = set(run_dirs(workdir)) - before
    logged = {
        key: epoch_rows(run_dir / "metrics.csv", key)[-1]
        for key in ("val/forces/MAE", "val/energy_per_atom/RMSE", "val/loss")
    }
    task = AtomisticTask.load_from_checkpoint(run_dir / "checkpoints" / "last.ckpt")
    module = AtomisticDataModule(
        path=str(workdir / "emt.xyz"),
        targets={"energy": {"key": "energy", "unit": "eV"}},
        val_set={"indices": str(run_dir / "indices" / "validation.txt")},
        test_fraction=0.0,
        batch_size=4,
    )
    trainer = pl.Trainer(
        accelerator="cpu", devices=1, logger=False, inference_mode=False, enable_progress_bar=False
    )
    (single,) = trainer.validate(task, module, verbose=False)
    for key, value in logged.items():
        assert single[key] == pytest.approx(value, rel=1e-9), key
