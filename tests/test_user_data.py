"""A user's own file: the README's own-file commands, the start-up summary, and every bad
input named in an error or a warning (nothing dropped without a word)."""

from __future__ import annotations

import csv
import shlex
import warnings
from pathlib import Path

import ase
import ase.build
import ase.io
import lightning.pytorch as L  # noqa: N812
import numpy as np
import pytest
import torch
from ase.calculators.emt import EMT
from hydra import compose, initialize_config_dir

from pl_mtt.config import expand_loss_config, restrict_loss_to_targets
from pl_mtt.data import AtomisticDataModule, DataWarning, split_indices
from pl_mtt.training.app import (
    UserInputError,
    assumed_targets,
    checkpoint_callbacks,
    config_dir,
    explicit_loss_paths,
    run,
    run_cli,
)
from pl_mtt.training.plots import learning_curve_figure
from pl_mtt.training.schema import register_configs
from tests.test_readme import blocks

KEYS = {"key": "dft_energy", "forces": "dft_forces"}


def cu_ni_frames(n: int = 40, stress: bool = False, seed: int = 0) -> list[ase.Atoms]:
    """Rattled, strained 8-atom Cu/Ni cells labelled with EMT under custom keys:
    ``info["dft_energy"]``, ``arrays["dft_forces"]`` and (optionally) Voigt
    ``info["dft_stress"]``; no calculator attached."""
    rng = np.random.default_rng(seed)
    frames = []
    for index in range(n):
        atoms = ase.build.bulk("Cu", "fcc", a=3.6, cubic=True).repeat((1, 1, 2))
        atoms.numbers[rng.random(len(atoms)) < 0.4] = 28
        strain = np.eye(3) + rng.normal(scale=0.01, size=(3, 3))
        atoms.set_cell(atoms.cell.array @ strain, scale_atoms=True)
        atoms.rattle(0.05, seed=index)
        atoms.calc = EMT()
        labelled = ase.Atoms(atoms.numbers, atoms.positions, cell=atoms.cell, pbc=True)
        labelled.info["dft_energy"] = atoms.get_potential_energy()
        labelled.arrays["dft_forces"] = atoms.get_forces()
        if stress:
            labelled.info["dft_stress"] = atoms.get_stress()
        frames.append(labelled)
    return frames


def write(path: Path, frames: list[ase.Atoms]) -> Path:
    ase.io.write(path, frames, format="extxyz")
    return path


def datamodule(path: Path, **kwargs) -> AtomisticDataModule:
    return AtomisticDataModule(path=str(path), targets={"energy": dict(KEYS)}, **kwargs)


def data_warnings(module: AtomisticDataModule) -> list[str]:
    with pytest.warns(DataWarning) as caught:
        module.setup()
    return [str(warning.message) for warning in caught if warning.category is DataWarning]


# -- the README's own-file commands, end to end ---------------------------------------
SMALL = [
    "experiment=tiny",  # 24 structures (the first 24 of the file), 2 epochs
    "trainer.enable_progress_bar=false",
    "trainer.enable_model_summary=false",
]


def readme_own_file_commands() -> list[list[str]]:
    """The README's commands on ``train.xyz``: [energy+forces, energy+forces+stress]."""
    lines = [
        line.split("#", 1)[0].strip()
        for block in blocks("bash")
        for line in block.splitlines()
        if line.startswith("python -m pl_mtt.train data.path=train.xyz")
    ]
    assert len(lines) == 2, lines
    return [shlex.split(line)[1:] for line in lines]


def _metrics(path: Path) -> list[dict[str, str]]:
    with open(path, newline="") as handle:
        return list(csv.DictReader(handle))


def _table_row(run_dir: Path, quantity: str) -> dict[str, str]:
    """The row of ``quantity`` in test_metrics.md, by column name."""
    lines = (run_dir / "test_metrics.md").read_text().splitlines()
    header = [cell.strip() for cell in lines[0].strip("|").split("|")]
    for line in lines[2:]:
        cells = [cell.strip() for cell in line.strip("|").split("|")]
        if cells[0] == quantity:
            return dict(zip(header, cells, strict=True))
    raise AssertionError(f"{quantity} not in test_metrics.md")


def _rms(values: list[np.ndarray]) -> float:
    return float(np.sqrt(np.mean(np.concatenate([v.reshape(-1) for v in values]) ** 2)))


def _run_readme_command(tmp_path, run_python, frames, command) -> tuple[Path, str]:
    write(tmp_path / "train.xyz", frames)
    result = run_python([*command, *SMALL], cwd=tmp_path, env={"OMP_NUM_THREADS": "1"})
    assert result.returncode == 0, result.stderr[-4000:]
    (run_dir,) = [p.parent for p in tmp_path.glob("outputs/*/*/.hydra")]
    return run_dir, result.stdout


def _check_run(run_dir: Path, frames: list[ase.Atoms]) -> set[str]:
    """Checkpoint, test row and the test set's reference RMS of forces (read from
    ``dft_forces``, in eV/Å); returns the metric names of metrics.csv."""
    last = torch.load(run_dir / "checkpoints" / "last.ckpt", weights_only=False)
    assert last["epoch"] == 1  # the last of 2 epochs
    rows = _metrics(run_dir / "metrics.csv")
    (test_row,) = [row for row in rows if row.get("test/loss")]
    assert float(test_row["epoch"]) == 1.0
    _, _, test = split_indices(24, 0.25, 0.25, seed=0)
    forces = [frames[i].arrays["dft_forces"] for i in test]
    assert float(_table_row(run_dir, "forces")["reference RMS"]) == pytest.approx(
        _rms(forces), rel=1e-3
    )
    return set(rows[0])


@pytest.mark.slow
def test_readme_own_file_command_on_energy_and_forces_without_stress(tmp_path, run_python):
    frames = cu_ni_frames(40)
    command = readme_own_file_commands()[0]
    assert "data.targets.energy.forces=dft_forces" in command
    run_dir, stdout = _run_readme_command(tmp_path, run_python, frames, command)
    assert "data: 40 structures in 'train.xyz', the first 24 used (data.n_structures=24)" in (
        stdout
    )
    assert "split (seed 0): train 12, val 6, test 6\n" in stdout
    assert "    forces: key 'dft_forces'\n" in stdout
    assert "    stress: not read (key 'stress' is not in every periodic structure" in stdout
    assert "loss terms: energy (mse), energy/forces (mse)\n" in stdout
    assert (
        "  left out of the configured loss, the data does not provide them: "
        "loss.energy.stress\n" in stdout
    )
    columns = _check_run(run_dir, frames)
    assert "val/forces/MAE" in columns
    assert not [name for name in columns if "stress" in name]


@pytest.mark.slow
def test_readme_own_file_command_with_custom_forces_and_stress_keys(tmp_path, run_python):
    frames = cu_ni_frames(40, stress=True)
    command = readme_own_file_commands()[1]
    assert "data.targets.energy.stress=dft_stress" in command
    run_dir, stdout = _run_readme_command(tmp_path, run_python, frames, command)
    assert "    forces: key 'dft_forces'\n    stress: key 'dft_stress'\n" in stdout
    assert "loss terms: energy (mse), energy/forces (mse), energy/stress (mse)\n" in stdout
    assert "left out" not in stdout
    columns = _check_run(run_dir, frames)
    assert "val/stress/MAE" in columns
    # stress read from 'dft_stress' (ase's Voigt order, eV/Å^3), reported as 3x3 tensors
    _, _, test = split_indices(24, 0.25, 0.25, seed=0)
    stress = [ase.stress.voigt_6_to_full_3x3_stress(frames[i].info["dft_stress"]) for i in test]
    assert float(_table_row(run_dir, "stress")["reference RMS"]) == pytest.approx(
        _rms(stress), rel=1e-3
    )


# -- the start-up summary --------------------------------------------------------------
def test_summary_lists_files_counts_splits_targets_keys_and_elements(tmp_path):
    frames = cu_ni_frames(20)
    frames[3].numbers[0] = 79  # one Au atom
    path = write(tmp_path / "train.xyz", frames)
    module = datamodule(path, n_structures=16, val_fraction=0.25, test_fraction=0.25)
    module.setup()
    split = dict(zip(("train", "val", "test"), split_indices(16, 0.25, 0.25, 0), strict=True))
    assert module.split == split

    def elements(indices: list[int]) -> str:
        numbers = np.concatenate([frames[i].numbers for i in indices])
        counts = {z: int((numbers == z).sum()) for z in (28, 29, 79)}
        names = {28: "Ni", 29: "Cu", 79: "Au"}
        return ", ".join(f"{names[z]} {n}" for z, n in counts.items() if n)

    assert module.summary() == "\n".join(
        [
            f"data: 20 structures in '{path}', the first 16 used (data.n_structures=16)",
            "split (seed 0): train 8, val 4, test 4",
            "targets:",
            "  energy: key 'dft_energy' (eV, per structure)",
            "    forces: key 'dft_forces'",
            "    stress: not read (key 'stress' is not in every periodic structure; "
            "targets.energy.stress: <key> reads another key)",
            "elements (atoms per split):",
            f"  train: {elements(split['train'])}",
            f"  val: {elements(split['val'])}",
            f"  test: {elements(split['test'])}",
        ]
    )


# -- bad inputs: errors ----------------------------------------------------------------
@pytest.mark.parametrize(
    ("keep_lines", "cut_columns", "expected"),
    [
        # frame 23 = lines 221-230 (count, comment, 8 atoms): cut after its 3rd atom line
        (225, None, "which starts at line 221: it announces 8 atoms, the file has 3 atom"),
        (221, None, "which starts at line 221: it announces 8 atoms, the file has 0 atom"),
        # inside its last atom line, after 4 of the 7 columns
        (229, 4, "its last atom line (line 230) has 4 columns, its first 7"),
    ],
)
def test_truncated_extxyz_is_an_error_naming_file_and_frame(
    tmp_path, keep_lines, cut_columns, expected
):
    lines = write(tmp_path / "full.xyz", cu_ni_frames(40)).read_text().splitlines(True)
    text = "".join(lines[:keep_lines])
    if cut_columns is not None:
        text += " ".join(lines[keep_lines].split()[:cut_columns])
    path = tmp_path / "cut.xyz"
    path.write_text(text)
    with pytest.raises(ValueError, match="ends inside frame 23") as error:
        datamodule(path).setup()
    assert str(error.value).startswith(
        f"structure file '{path}' ends inside frame 23 (index 22)"
    ), error.value
    assert expected in str(error.value)
    assert str(error.value).endswith("the file looks truncated")


def test_a_positive_fraction_never_gives_an_empty_split(tmp_path):
    path = write(tmp_path / "train.xyz", cu_ni_frames(8))
    with pytest.raises(ValueError, match="cannot give a training split") as error:
        datamodule(path, n_structures=2).setup()
    assert str(error.value) == (
        "data: 2 structures cannot give a training split and non-empty splits for "
        "val_fraction=0.1 (1) and test_fraction=0.1 (1); use more structures, or set "
        "data.val_fraction=0 / data.test_fraction=0 to have no such split"
    )
    module = datamodule(path, n_structures=3)
    module.setup()
    assert [len(module.split[s]) for s in ("train", "val", "test")] == [1, 1, 1]
    module = datamodule(path, n_structures=2, val_fraction=0.0, test_fraction=0.0)
    module.setup()
    assert [len(module.split[s]) for s in ("train", "val", "test")] == [2, 0, 0]


def test_n_structures_with_a_file_takes_the_first_structures(tmp_path):
    frames = cu_ni_frames(12)
    path = write(tmp_path / "train.xyz", frames)
    module = datamodule(path, n_structures=10)
    module.setup()
    used = sorted(module.split["train"] + module.split["val"] + module.split["test"])
    assert used == list(range(10))
    first = module.train_dataset.targets["energy"][0].block().values.item()
    assert first == frames[module.split["train"][0]].info["dft_energy"]
    with pytest.raises(ValueError, match="n_structures=13") as error:
        datamodule(path, n_structures=13).setup()
    assert str(error.value) == (
        f"data.n_structures=13: '{path}' has 12 structures; give a number from 1 to 12, "
        f"or null for all of them"
    )


# -- bad inputs: warnings ----------------------------------------------------------------
def test_nan_entries_are_warned_with_counts_and_structures(tmp_path):
    frames = cu_ni_frames(10)
    frames[2].info["dft_energy"] = np.nan
    frames[7].info["dft_energy"] = np.nan
    frames[4].arrays["dft_forces"][[1, 3], 0] = np.nan
    path = write(tmp_path / "train.xyz", frames)
    messages = data_warnings(datamodule(path, val_fraction=0.2, test_fraction=0.2))
    assert messages == [
        f"data: target 'energy': 2 of 10 values are NaN, in 2 structures (indices 2, 7 in "
        f"'{path}'); they are left out of the loss and of the scale fit",
        f"data: target 'energy' forces (key 'dft_forces'): 2 of 240 values are NaN, in 1 "
        f"structure (index 4 in '{path}'); they are left out of the loss and of the "
        f"scale fit",
    ]


def test_stress_of_structures_without_a_cell_is_not_a_warning(tmp_path):
    frames = cu_ni_frames(6, stress=True)
    frames[1].pbc = False
    frames[1].info.pop("dft_stress")
    path = write(tmp_path / "train.xyz", frames)
    targets = {"energy": {**KEYS, "stress": "dft_stress"}}
    module = AtomisticDataModule(path=str(path), targets=targets, val_fraction=0.0)
    with warnings.catch_warnings():
        warnings.simplefilter("error", DataWarning)
        module.setup()
    assert "(1 structures without a periodic cell have no stress/virial" in module.summary()


def test_element_only_in_validation_is_warned(tmp_path):
    frames = cu_ni_frames(12)
    _, val, test = split_indices(12, 0.25, 0.25, seed=0)
    frames[val[0]].numbers[0] = 79
    frames[val[1]].numbers[0] = 79
    frames[test[0]].numbers[0] = 79
    path = write(tmp_path / "train.xyz", frames)
    messages = data_warnings(datamodule(path, val_fraction=0.25, test_fraction=0.25))
    assert messages == [
        "data: element Au (Z=79) is in the val (2 structures), test (1 structure) split but "
        "not in the training split: the model and the composition baseline learn nothing "
        "about it (change data.split_seed or the fractions, or add structures with Au)"
    ]


def test_a_gradient_in_only_some_structures_is_warned_and_not_read(tmp_path):
    frames = cu_ni_frames(10)
    for atoms in frames[:3]:
        atoms.info["stress"] = np.zeros(6)
    path = write(tmp_path / "train.xyz", frames)
    module = datamodule(path, val_fraction=0.2, test_fraction=0.2)
    assert data_warnings(module) == [
        f"targets.energy.stress: key 'stress' is in only 3 of the 10 periodic structures of "
        f"'{path}', so it is not read; set targets.energy.stress: stress to read them (then "
        f"every one of these structures needs it)"
    ]
    assert module.target_options["energy"]["stress"] is False


# -- the default loss follows the data; what the user names does not ------------------
def test_default_loss_entries_for_missing_data_are_left_out():
    mlip = {"energy": {"type": "mse", "forces": "mae", "stress": {"type": "huber"}}}
    no_stress = {"energy": {"quantity": "energy", "forces": True, "stress": False}}
    loss, dropped = restrict_loss_to_targets(mlip, no_stress)
    assert loss == {"energy": {"type": "mse", "forces": "mae"}}
    assert dropped == ["loss.energy.stress"]
    # the internal form, other targets, and a named entry
    internal = {
        "energy": {"gradients": {"positions": "mse", "strain": "mse"}},
        "mtt::dos": "masked_dos",
    }
    loss, dropped = restrict_loss_to_targets(internal, no_stress)
    assert loss == {"energy": {"gradients": {"positions": "mse"}}}
    assert dropped == ["loss.energy.gradients.strain", "loss.mtt::dos"]
    loss, dropped = restrict_loss_to_targets(mlip, no_stress, keep=[("energy", "stress")])
    assert (loss, dropped) == (mlip, [])
    with pytest.raises(ValueError, match=r"^loss\.energy\.stress: target 'energy' does not"):
        expand_loss_config(loss, no_stress)
    # a shorthand covers exactly the targets already
    assert restrict_loss_to_targets("mae", no_stress) == ("mae", [])


@pytest.mark.parametrize(
    ("overrides", "paths"),
    [
        (["loss.energy.stress=huber"], [("energy", "stress")]),
        (["++loss.energy.stress.weight=0.1"], [("energy", "stress", "weight")]),
        (["loss.energy={type:mae}"], [("energy", "type")]),
        (
            ["++loss.energy.forces={type:mae,weight:0.1}"],
            [("energy", "forces", "type"), ("energy", "forces", "weight")],
        ),
        (["loss=mse", "~loss.energy.stress", "trainer.max_epochs=2", "experiment=tiny"], []),
    ],
)
def test_explicit_loss_paths_are_what_the_command_line_writes(overrides, paths):
    assert explicit_loss_paths(overrides) == paths


def _composed(*overrides: str):
    register_configs()
    with initialize_config_dir(config_dir=config_dir(), version_base="1.3"):
        return compose(config_name="config", overrides=list(overrides))


def test_loss_is_checked_against_the_gradients_the_data_may_provide():
    cfg = _composed("data.targets.energy.forces=false")
    assert assumed_targets(cfg)["energy"] == {
        "quantity": "energy",
        "key": "energy",
        "unit": "eV",
        "forces": False,
        "stress": True,
        "virial": None,
    }


# -- user errors: the message, no traceback ---------------------------------------------
def test_user_errors_print_their_message_without_traceback(tmp_path, capsys, monkeypatch):
    monkeypatch.delenv("HYDRA_FULL_ERROR", raising=False)
    cfg = _composed(f"data.path={tmp_path / 'missing.xyz'}")
    with pytest.raises(SystemExit) as exit_info:
        run_cli(cfg)
    assert exit_info.value.code == 1
    assert capsys.readouterr().err == (
        f"Error: structure file '{tmp_path / 'missing.xyz'}' does not exist\n"
        "Set the environment variable HYDRA_FULL_ERROR=1 for the full traceback.\n"
    )
    monkeypatch.setenv("HYDRA_FULL_ERROR", "1")
    with pytest.raises(UserInputError, match=r"missing\.xyz' does not exist") as error:
        run_cli(cfg)
    assert isinstance(error.value.__cause__, ValueError)  # the original, with its traceback


def test_an_explicit_loss_entry_for_missing_data_is_an_error(tmp_path, monkeypatch):
    path = write(tmp_path / "train.xyz", cu_ni_frames(8))
    cfg = _composed(
        f"data.path={path}",
        "data.targets.energy.key=dft_energy",
        "data.targets.energy.forces=dft_forces",
        "++loss.energy.stress=huber",
    )
    monkeypatch.setattr(
        "pl_mtt.training.app.command_line_overrides", lambda: ["++loss.energy.stress=huber"]
    )
    monkeypatch.chdir(tmp_path)
    with pytest.raises(UserInputError) as error:
        run(cfg)
    assert str(error.value).startswith(
        "loss.energy.stress: target 'energy' does not provide gradient 'strain'"
    )
    assert cfg.loss.energy.stress == "huber"  # as the command line wrote it


# -- plots and logs ----------------------------------------------------------------------
def test_a_single_epoch_learning_curve_shows_its_points():
    figure = learning_curve_figure(
        "forces/MAE", {"train": [(0.0, 0.5)], "val": [(0.0, 0.4)], "test": [(0.0, 0.45)]}
    )
    lines = figure.axes[0].lines
    assert [line.get_label() for line in lines] == ["train", "val", "test"]
    for line, value in zip(lines, (0.5, 0.4, 0.45), strict=True):
        assert line.get_marker() == "o"
        assert line.get_markersize() > 0
        assert line.get_xydata().tolist() == [[1.0, value]]


# -- checkpoints: last.ckpt is the last epoch ---------------------------------------------
class _WorseEveryEpoch(L.LightningModule):
    """Validation loss = the epoch index: the best checkpoint is always epoch 0."""

    def __init__(self) -> None:
        super().__init__()
        self.layer = torch.nn.Linear(1, 1)
        self.epochs_run: list[int] = []

    def training_step(self, batch, batch_idx):
        return self.layer(batch[0]).square().mean()

    def validation_step(self, batch, batch_idx):
        self.log("val/loss", float(self.current_epoch))

    def on_train_epoch_start(self) -> None:
        self.epochs_run.append(self.current_epoch)

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.1)

    def train_dataloader(self):
        return torch.utils.data.DataLoader(torch.utils.data.TensorDataset(torch.ones(4, 1)))

    val_dataloader = train_dataloader


def test_last_checkpoint_is_the_last_epoch_and_resuming_continues_after_it(tmp_path):
    def trainer(max_epochs: int, run_dir: Path) -> L.Trainer:
        return L.Trainer(
            max_epochs=max_epochs,
            callbacks=checkpoint_callbacks(run_dir),
            logger=False,
            enable_progress_bar=False,
            enable_model_summary=False,
        )

    first = trainer(3, tmp_path)
    first.fit(_WorseEveryEpoch())
    best, last = first.checkpoint_callbacks
    assert Path(best.best_model_path).name == "epoch=0-step=4.ckpt"
    assert Path(last.best_model_path).name == "last.ckpt"
    saved = torch.load(tmp_path / "checkpoints" / "last.ckpt", weights_only=False)
    assert (saved["epoch"], saved["global_step"]) == (2, 12)
    resumed = _WorseEveryEpoch()
    trainer(5, tmp_path / "resumed").fit(resumed, ckpt_path=tmp_path / "checkpoints" / "last.ckpt")
    assert resumed.epochs_run == [3, 4]
