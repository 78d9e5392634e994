"""The main job end to end: the real entry point, resume, DDP, evaluation, experiments."""

from __future__ import annotations

import csv
import itertools
import math
from pathlib import Path

import ase.io
import pytest
import torch
from hydra import compose, initialize_config_dir

from pl_mtt import AtomisticTask
from pl_mtt.data import AtomisticDataModule, atoms_to_system, collate, embedded_dataset
from pl_mtt.training.app import config_dir, run
from pl_mtt.training.schema import register_configs

pytestmark = pytest.mark.slow

TINY = [
    "data.n_structures=16",
    "data.batch_size=4",
    "data.val_fraction=0.25",
    "data.test_fraction=0.25",
    "model.n_radial=6",
    "model.hidden=[8]",
    "trainer.max_epochs=2",
    "trainer.log_every_n_steps=1",
    "trainer.enable_model_summary=false",
]


def _run_dir(root: Path) -> Path:
    runs = sorted(p.parent for p in root.glob("outputs/*/*/.hydra"))
    assert len(runs) == 1, runs
    return runs[0]


def _epoch_rows(metrics_csv: Path, key: str) -> list[float]:
    with open(metrics_csv, newline="") as handle:
        return [float(row[key]) for row in csv.DictReader(handle) if row.get(key)]


def _composed(*overrides: str):
    register_configs()
    with initialize_config_dir(config_dir=config_dir(), version_base="1.3"):
        return compose(config_name="config", overrides=list(overrides))


@pytest.fixture(scope="module")
def cache(tmp_path_factory):
    """One embedded-data cache for the whole module (generated once)."""
    path = tmp_path_factory.mktemp("cache")
    return {"PL_MTT_CACHE": str(path)}


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory, cache):
    """The real entry point in a subprocess on a tiny config."""
    from tests.conftest import python_subprocess

    root = tmp_path_factory.mktemp("tiny")
    metadata = ["export.name=Tiny EMT", "export.authors=[A. Author]"]
    result = python_subprocess(["-m", "pl_mtt.train", *TINY, *metadata], cwd=root, env=cache)
    assert result.returncode == 0, result.stderr[-4000:]
    return _run_dir(root), result


def test_entry_point_writes_checkpoint_metrics_plots_and_model(tiny_run):
    run_dir, result = tiny_run
    assert (run_dir / "checkpoints" / "last.ckpt").is_file()
    assert (run_dir / "metrics.csv").is_file()
    plots = {p.name for p in (run_dir / "plots").glob("*.png")}
    assert {"parity_energy_per_atom.png", "parity_forces.png", "parity_stress.png"} <= plots
    assert "learning_curve_forces_MAE.png" in plots
    assert "learning_curve_loss.png" in plots
    table = (run_dir / "test_metrics.md").read_text()
    assert "| forces | eV/Å |" in table
    assert "composition-only MAE" in table
    # per-epoch metrics in physical units, for both stages
    assert len(_epoch_rows(run_dir / "metrics.csv", "val/forces/MAE")) == 2
    assert len(_epoch_rows(run_dir / "metrics.csv", "train/energy_per_atom/RMSE")) == 2
    # the test row carries the last training epoch (0-based), not Lightning's counter
    with open(run_dir / "metrics.csv", newline="") as handle:
        rows = list(csv.DictReader(handle))
    assert [float(row["epoch"]) for row in rows if row.get("test/loss")] == [1.0]
    assert {float(row["epoch"]) for row in rows if row.get("train/loss")} == {0.0, 1.0}
    # the start-up summary of the embedded data
    assert "split (seed 0): train 8, val 4, test 4\n" in result.stdout
    assert "    forces: key 'forces'\n    stress: key 'stress'\n" in result.stdout
    assert "Fitting scales" in result.stderr or "Fitting scales" in result.stdout


def test_saved_model_carries_scales_and_baseline(tiny_run, cache, monkeypatch):
    run_dir, _ = tiny_run
    monkeypatch.setenv("PL_MTT_CACHE", cache["PL_MTT_CACHE"])
    inference = torch.load(run_dir / "model.pt", weights_only=False)
    task = AtomisticTask.load_from_checkpoint(run_dir / "checkpoints" / "last.ckpt")
    assert torch.equal(
        inference.scaler.per_target_scales["energy"].block().values,
        task.scaler.per_target_scales["energy"].block().values,
    )
    data = embedded_dataset("emt", n_structures=16)
    datamodule = AtomisticDataModule(
        path=data.path, targets=data.targets, val_fraction=0.25, test_fraction=0.25
    )
    datamodule.setup()
    systems, targets, _ = collate([datamodule.test_dataset[i] for i in range(2)])
    physical = inference(systems)["energy"].block().values.detach()
    torch.testing.assert_close(physical, task(systems)["energy"].block().values)
    # physical units: the error against the EMT energies is that of the test table
    error = (physical - targets["energy"].block().values).abs()
    n_atoms = torch.tensor([[len(s)] for s in systems], dtype=error.dtype)
    assert float((error / n_atoms).max()) < 1.0  # eV/atom: not off by a scale or baseline


def test_run_writes_a_metatomic_model_that_mtt_eval_runs(
    tiny_run, tmp_path, cache, run_python, monkeypatch
):
    """The run's ``model-metatomic.pt``: metatrain's ``mtt eval`` (its second argument is
    an options file) gives the energies and forces of the checkpoint's AtomisticTask."""
    from metatomic.torch import load_atomistic_model

    from pl_mtt.interop.export import main as export_main

    run_dir, _ = tiny_run
    exported = run_dir / "model-metatomic.pt"
    metadata = load_atomistic_model(exported).metadata()
    assert (metadata.name, metadata.authors) == ("Tiny EMT", ["A. Author"])
    # the command line reads the metadata from the run's config
    again = export_main([str(run_dir / "checkpoints" / "last.ckpt"), "-o", str(tmp_path / "x.pt")])
    assert load_atomistic_model(again).metadata().name == "Tiny EMT"
    monkeypatch.setenv("PL_MTT_CACHE", cache["PL_MTT_CACHE"])
    frames = ase.io.read(embedded_dataset("emt", n_structures=16).path, index=":4")
    ase.io.write(tmp_path / "structures.xyz", frames, format="extxyz")
    (tmp_path / "options.yaml").write_text(
        "systems: {read_from: structures.xyz, length_unit: angstrom}\n"
        "targets:\n"
        "  energy: {key: energy, unit: eV, forces: {key: forces}, stress: false}\n"
    )
    result = run_python(
        ["-m", "metatrain", "eval", str(exported), "options.yaml", "-o", "predicted.xyz"],
        cwd=tmp_path,
    )
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    predicted = ase.io.read(tmp_path / "predicted.xyz", index=":")
    task = AtomisticTask.load_from_checkpoint(run_dir / "checkpoints" / "last.ckpt")
    systems = [atoms_to_system(atoms) for atoms in frames]
    with torch.enable_grad():
        expected = task(systems)["energy"].block()
    energies = torch.tensor([atoms.get_potential_energy() for atoms in predicted])
    torch.testing.assert_close(energies, expected.values[:, 0], rtol=1e-10, atol=0)
    gradients = torch.cat(
        [torch.tensor(atoms.info["energy_positions_gradients"]) for atoms in predicted]
    )  # dE/dr (metatrain's name of the gradient of an exported model's energy)
    expected_gradients = expected.gradient("positions").values[:, :, 0]
    torch.testing.assert_close(gradients, expected_gradients, rtol=1e-8, atol=1e-10)


def test_resume_continues_from_the_last_epoch_and_keeps_the_scales(
    tiny_run, tmp_path, cache, run_python
):
    run_dir, _ = tiny_run
    before = torch.load(run_dir / "checkpoints" / "last.ckpt", weights_only=False)
    # last.ckpt is the end of the last epoch (Lightning's save_last on a monitoring
    # checkpoint rewrites it only with a new best), whichever epoch was best
    assert before["epoch"] == 1
    assert before["global_step"] == 2 * 2  # 2 epochs x 2 batches of 4 of 8 structures
    # different data: a refit would change the scales, resuming must keep them
    result = run_python(
        [
            "-m",
            "pl_mtt.train",
            *TINY,
            "data.n_structures=20",
            "trainer.max_epochs=3",
            f"ckpt_path={run_dir / 'checkpoints' / 'last.ckpt'}",
        ],
        cwd=tmp_path,
        env=cache,
    )
    assert result.returncode == 0, result.stderr[-4000:]
    assert "Fitting scales" not in result.stderr + result.stdout
    resumed = _run_dir(tmp_path)
    after = torch.load(resumed / "checkpoints" / "last.ckpt", weights_only=False)
    assert after["epoch"] == before["epoch"] + 1  # one more epoch (0-based index)
    assert after["global_step"] == before["global_step"] + 3  # 10 structures, batches of 4
    with open(resumed / "metrics.csv", newline="") as handle:
        epochs = {float(row["epoch"]) for row in csv.DictReader(handle) if row.get("train/loss")}
    assert epochs == {2.0}  # only the epoch after the checkpoint's
    scale_keys = [k for k in before["state_dict"] if k.startswith(("scaler.", "composition."))]
    assert scale_keys
    for key in scale_keys:
        if isinstance(before["state_dict"][key], torch.Tensor):
            assert torch.equal(before["state_dict"][key], after["state_dict"][key]), key


def test_evaluate_a_checkpoint_on_a_file(tiny_run, tmp_path, cache, run_python, monkeypatch):
    run_dir, _ = tiny_run
    monkeypatch.setenv("PL_MTT_CACHE", cache["PL_MTT_CACHE"])
    frames = ase.io.read(embedded_dataset("emt", n_structures=16).path, index=":5")
    path = tmp_path / "structures.xyz"
    ase.io.write(path, frames, format="extxyz")
    result = run_python(
        [
            "-m",
            "pl_mtt.train",
            "mode=evaluate",
            f"ckpt_path={run_dir / 'checkpoints' / 'last.ckpt'}",
            f"data.path={path}",
        ],
        cwd=tmp_path,
        env=cache,
    )
    assert result.returncode == 0, result.stderr[-4000:]
    out = _run_dir(tmp_path)
    table = (out / "test_metrics.md").read_text()
    assert "| energy_per_atom | eV/atom | 5 |" in table
    assert "| forces | eV/Å | " in table
    assert (out / "plots" / "parity_forces.png").is_file()


def test_ddp_run_logs_global_metrics(tmp_path, cache, run_python, monkeypatch):
    """Two CPU processes (gloo): the logged validation metrics equal a single-process
    evaluation of the saved checkpoint on the whole validation set."""
    overrides = [*TINY, "data.n_structures=20", "trainer.max_epochs=1"]
    result = run_python(
        ["-m", "pl_mtt.train", *overrides, "trainer.devices=2", "trainer.strategy=ddp"],
        cwd=tmp_path,
        env={**cache, "OMP_NUM_THREADS": "1"},
        timeout=300,
    )
    assert result.returncode == 0, result.stderr[-4000:]
    run_dir = _run_dir(tmp_path)
    logged = {
        key: _epoch_rows(run_dir / "metrics.csv", key)[-1]
        for key in ("val/forces/MAE", "val/energy_per_atom/RMSE", "val/loss", "val/stress/MAE")
    }
    monkeypatch.setenv("PL_MTT_CACHE", cache["PL_MTT_CACHE"])
    cfg = _composed(*overrides)
    task = AtomisticTask.load_from_checkpoint(run_dir / "checkpoints" / "last.ckpt")
    datamodule = AtomisticDataModule(**dict(cfg.data))
    import lightning.pytorch as pl

    trainer = pl.Trainer(
        accelerator="cpu", devices=1, logger=False, inference_mode=False, enable_progress_bar=False
    )
    (single,) = trainer.validate(task, datamodule, verbose=False)
    assert len(datamodule.val_dataset) % 2 == 1  # uneven shards: no padding allowed
    for key, value in logged.items():
        assert single[key] == pytest.approx(value, rel=1e-9), key


@pytest.mark.parametrize(
    ("experiment", "extra", "ratio"),
    [
        ("dos", ["data.n_structures=24", "model.hidden=[16]", "optimizer.lr=0.01"], 0.5),
        # forces in units of the per-atom energy scale are ~10: they are learnt slowly,
        # 30 steps give a small but steady decrease
        (
            "ensemble",
            [
                "data.n_structures=24",
                "model.hidden=[16]",
                "model.ensemble_size=4",
                "optimizer.lr=0.01",
            ],
            0.99,
        ),
    ],
)
def test_experiments_run_and_their_losses_decrease(
    experiment, extra, ratio, tmp_path, cache, monkeypatch
):
    monkeypatch.setenv("PL_MTT_CACHE", cache["PL_MTT_CACHE"])
    monkeypatch.chdir(tmp_path)
    cfg = _composed(
        f"experiment={experiment}",
        *extra,
        "data.batch_size=4",
        "model.n_radial=6",
        "trainer.max_epochs=6",
        "trainer.enable_progress_bar=false",
        "trainer.enable_model_summary=false",
    )
    run(cfg)
    losses = _epoch_rows(tmp_path / "metrics.csv", "train/loss")
    assert len(losses) == 6
    assert all(math.isfinite(v) for v in losses)
    assert losses[-1] < ratio * losses[0], losses
    assert all(later < earlier for earlier, later in itertools.pairwise(losses)), losses
    plots = {p.name for p in (tmp_path / "plots").glob("*.png")}
    if experiment == "dos":
        assert "dos_mtt__dos.png" in plots
        assert "parity_mtt__dos.png" in plots
    else:
        assert "parity_forces.png" in plots
        ensemble_term = _epoch_rows(tmp_path / "metrics.csv", "train/loss/energy")
        assert ensemble_term[-1] < ensemble_term[0]  # the Gaussian CRPS of the ensemble
