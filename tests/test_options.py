"""metatrain options files read by pl_mtt: dataset and target forms, precedence of the
command line, keys not acted on, misspelt and ill-typed keys (checked against
metatrain's own validator), missing files and architectures."""

from __future__ import annotations

import copy
import importlib
import re

import ase.io
import pytest
import torch
import yaml
from hydra import compose, initialize_config_dir
from omegaconf import OmegaConf

from pl_mtt.config import expand_loss_config
from pl_mtt.data import AtomisticDataModule, embedded_dataset, open_dataset, write_dataset
from pl_mtt.interop import format_not_acted_on, translate_options
from pl_mtt.training.app import (
    config_dir,
    merge_loss_shorthand_overrides,
    options_argument,
    register_options_config,
)
from pl_mtt.training.schema import register_configs

pytest.importorskip("metatrain")

SOAP = {"soap": {"max_angular": 2, "max_radial": 2}, "bpnn": {"num_neurons_per_layer": 8}}


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    """A structure file, a second one without stress, and index files."""
    directory = tmp_path_factory.mktemp("options")
    data = embedded_dataset("emt", n_structures=8, directory=directory)
    frames = ase.io.read(data.path, index=":")
    train = directory / "train.xyz"
    ase.io.write(train, frames, format="extxyz")
    nostress = directory / "nostress.xyz"
    for atoms in frames:
        atoms.calc.results.pop("stress")
    ase.io.write(nostress, frames, format="extxyz")
    (directory / "validation.txt").write_text("1\n5\n")
    return {"dir": directory, "train": str(train), "nostress": str(nostress)}


def base(files, **extra) -> dict:
    options = {
        "architecture": {"name": "soap_bpnn", "model": copy.deepcopy(SOAP)},
        "training_set": {"systems": {"read_from": files["train"]}, "targets": {"energy": {}}},
        "validation_set": 0.25,
    }
    options.update(extra)
    return options


def write(files, options, name="options.yaml") -> str:
    path = files["dir"] / name
    path.write_text(yaml.safe_dump(options))
    return str(path)


def translate(files, options):
    return translate_options(write(files, options), ["pet", "soap_bpnn", "metatrain"])


def composed(path: str, *overrides: str):
    """The app's composition (as ``python -m pl_mtt.train options=<path> ...``)."""
    args = merge_loss_shorthand_overrides([f"options={path}", *overrides])
    register_configs()
    register_options_config(args)
    try:
        with initialize_config_dir(config_dir=config_dir(), version_base="1.3"):
            return compose(config_name="config", overrides=args)
    finally:
        register_options_config([])  # forget the translated file


# -- dataset and target forms -----------------------------------------------------------
def test_dataset_forms(files):
    as_file = translate(files, base(files, training_set=files["train"])).config["data"]
    assert as_file["path"] == files["train"]
    assert as_file["targets"] == {"energy": {}}  # forces/stress: read when the file has them
    one = base(files)
    listed = copy.deepcopy(one)
    listed["training_set"] = [one["training_set"]]
    assert translate(files, listed).config["data"] == translate(files, one).config["data"]
    two = copy.deepcopy(one)
    two["training_set"] = [one["training_set"], one["training_set"]]
    with pytest.raises(ValueError, match="training_set: 2 datasets; pl_mtt trains on one"):
        translate(files, two)


def test_validation_and_test_forms(files):
    data = translate(files, base(files)).config["data"]
    assert (data["val_fraction"], data["val_set"]) == (0.25, None)
    assert (data["test_fraction"], data["test_set"]) == (0.0, None)  # metatrain's default
    indices = str(files["dir"] / "validation.txt")
    data = translate(
        files,
        base(
            files,
            validation_set={"indices": indices},
            test_set={
                "systems": files["nostress"],
                "targets": {"energy": {"key": "energy", "stress": False}},
                "indices": [0, 2],
            },
        ),
    ).config["data"]
    assert data["val_set"] == {"indices": indices}
    assert data["val_fraction"] == 0.0
    assert data["test_set"] == {
        "path": files["nostress"],
        "targets": {"energy": {"key": "energy", "stress": False}},
        "indices": [0, 2],
    }
    data = translate(files, base(files, validation_set=files["nostress"])).config["data"]
    assert data["val_set"] == {"path": files["nostress"], "targets": {"energy": {}}}
    indexed = base(files)
    indexed["training_set"]["indices"] = [0, 2, 3]
    assert translate(files, indexed).config["data"]["indices"] == [0, 2, 3]


@pytest.mark.parametrize("form", ["train.zip", "train_dir/"])
def test_read_from_takes_metatrains_disk_formats(files, form):
    """``read_from`` of a DiskDataset zip or a MemmapDataset directory reaches the
    datamodule as ``data.path``, and the same structures and targets are read."""
    xyz = open_dataset(files["train"], {"energy": {}})
    disk = str(files["dir"] / form) + ("/" if form.endswith("/") else "")
    write_dataset(disk, xyz)
    options = base(files)
    options["training_set"] = {"systems": disk, "targets": {"energy": {}}}
    options["architecture"]["training"] = {"atomic_baseline": {"energy": {29: -3.5}}}
    config = translate(files, options).config
    assert config["data"]["path"] == disk
    assert config["scaler"]["fixed_baseline"] == {"energy": {29: -3.5}}
    data = AtomisticDataModule(**config["data"])
    data.setup()
    assert data.target_options["energy"]["forces"]
    assert data.target_options["energy"]["stress"]
    assert len(data.full_dataset) == len(xyz)
    _, targets, _ = data.full_dataset[3]
    _, expected, _ = xyz[3]
    values = targets["energy"].block().values  # float32: metatrain's base_precision
    assert values.dtype == torch.float32
    torch.testing.assert_close(values, expected["energy"].block().values.float())


def test_target_forms(files):
    dos = str(files["dir"] / "dos.xyz")
    options = base(files)
    options["training_set"]["targets"] = {
        "energy": {
            "key": "E",
            "unit": "eV",
            "forces": "forces.xyz",  # metatrain: a file to read the forces from
            "virial": {"key": "V"},
        },
        "mtt::charges": {"read_from": dos, "key": "q", "per_atom": True},
        "mtt::gap": {"key": "gap", "sample_kind": "system", "num_subtargets": 1},
        "mtt::dos": dos,  # a file
    }
    translation = translate(files, options)
    targets = translation.config["data"]["targets"]
    assert targets["energy"] == {
        "key": "E",
        "unit": "eV",
        "forces": {"read_from": "forces.xyz"},
        "virial": {"key": "V"},
    }
    assert targets["mtt::charges"] == {"read_from": dos, "key": "q", "per_atom": True}
    assert targets["mtt::gap"] == {"key": "gap", "per_atom": False, "num_subtargets": 1}
    assert targets["mtt::dos"] == {"read_from": dos}
    # metatrain's default loss: mse on every target and on the energy's gradients
    loss = translation.config["loss"]
    assert set(loss["energy"]) == {"type", "weight", "reduction", "forces", "virial"}
    assert set(loss["mtt::gap"]) == {"type", "weight", "reduction"}
    for bad, match in (
        ({"type": {"cartesian": {"rank": 1}}}, "only scalar targets"),
        ({"sample_kind": "atom_pair"}, "atom_pair targets are not supported"),
        ({"per_atom": True, "sample_kind": "system"}, "per_atom: True means sample_kind 'atom'"),
        ({"stress": True, "virial": True}, "either 'stress' or 'virial'"),
    ):
        options = base(files)
        options["training_set"]["targets"] = {"energy": bad}
        with pytest.raises(ValueError, match=match):
            translate(files, options)


# -- precedence: command line > options file > pl_mtt defaults -----------------------------
def test_precedence_of_the_command_line(files):
    options = base(files, seed=3)
    options["architecture"]["training"] = {
        "num_epochs": 7,
        "batch_size": 2,
        "learning_rate": 0.01,
        "loss": {"energy": {"type": "mse", "forces": "mse", "stress": {"weight": 0.5}}},
    }
    path = write(files, options)
    cfg = composed(path)
    assert cfg.trainer.max_epochs == 7  # options file over pl_mtt's 40
    assert cfg.data.batch_size == 2
    assert cfg.optimizer.lr == 0.01
    assert cfg.optimizer.schedule == "warmup_cosine"  # SOAP-BPNN's trainer
    assert cfg.seed == 3 and cfg.data.split_seed == 3  # noqa: PT018
    assert cfg.model.architecture == "soap_bpnn"
    assert cfg.model.hypers.soap.max_angular == 2  # the file's, over the defaults
    assert cfg.model.hypers.soap.cutoff.radius == 5.0  # metatrain's default
    assert cfg.trainer.log_every_n_steps == 10  # pl_mtt's default where the file is silent
    cfg = composed(
        path, "trainer.max_epochs=3", "loss.energy.forces=mae", "model.hypers.soap.max_radial=3"
    )
    assert cfg.trainer.max_epochs == 3
    assert cfg.model.hypers.soap.max_radial == 3
    targets = {"energy": {"quantity": "energy", "forces": True, "stress": True}}
    loss = expand_loss_config(cfg.loss, targets)["energy"]
    assert loss["gradients"]["positions"]["type"] == "mae"  # that term only
    assert loss["gradients"]["strain"] == {"type": "mse", "weight": 0.5, "reduction": "mean"}
    assert loss["type"] == "mse"
    # PET: AdamW when weight_decay is set, gradient clipping, the model=pet config
    options = base(files)
    options["architecture"] = {
        "name": "pet",
        "model": {"d_pet": 8},
        "training": {"weight_decay": 0.01, "grad_clip_norm": 0.5},
    }
    cfg = composed(write(files, options, "pet.yaml"), "optimizer.lr=0.2")
    assert OmegaConf.to_container(cfg.optimizer) == {
        "name": "adamw",
        "lr": 0.2,
        "weight_decay": 0.01,
        "schedule": "warmup_cosine",
        "lr_decay": 1.0,
        "warmup_fraction": 0.01,
        "grad_clip_norm": 0.5,
    }
    assert cfg.trainer.max_epochs == 1000  # PET's num_epochs default
    assert cfg.data.batch_size == 16
    assert cfg.model.hypers.d_pet == 8
    assert cfg.model.hypers.d_head == 128


def test_options_argument_is_found_in_every_form():
    assert options_argument(["a=1", "options=x.yaml"]) == "x.yaml"
    assert options_argument(["++options='y.yaml'"]) == "y.yaml"
    assert options_argument(["loss.options=3"]) is None


# -- keys not acted on ---------------------------------------------------------------
def test_keys_not_acted_on_are_listed_with_their_reason(files):
    options = base(files, print_stats=True, wandb={"project": "x"})
    options["architecture"]["training"] = {
        "log_interval": 3,
        "checkpoint_interval": 10,
        "best_model_metric": "loss",
        "batch_size": 4,
        "atomic_baseline": {"energy": -3.0},
        "min_atoms_per_batch": 10,  # without max_atoms_per_batch
    }
    translation = translate(files, options)
    listed = dict(translation.not_acted_on)
    assert set(listed) == {
        "print_stats",
        "wandb",
        "architecture.training.log_interval",
        "architecture.training.checkpoint_interval",
        "architecture.training.best_model_metric",
        "architecture.training.min_atoms_per_batch",
    }
    assert "Lightning logger" in listed["wandb"]
    assert "needs max_atoms_per_batch" in listed["architecture.training.min_atoms_per_batch"]
    options["architecture"]["training"]["max_atoms_per_batch"] = 200
    config = translate(files, options).config
    data = config["data"]
    assert (data["max_atoms_per_batch"], data["min_atoms_per_batch"]) == (200, 10)
    assert config["scaler"]["fixed_baseline"] == {"energy": -3.0}  # metatrain's atomic_baseline
    text = format_not_acted_on(translation.path, translation.not_acted_on)
    assert text.count("\n") == len(listed)
    assert re.search(r"\n  architecture\.training\.log_interval +pl_mtt logs every epoch", text)


# -- bad files: as metatrain rejects them -----------------------------------------------
BAD = [
    (lambda o: o.update(sead=1), r"sead: unknown key .*Did you mean 'seed'\?"),
    (lambda o: o.update(seed="1"), r"seed: expected an integer, got '1'"),
    (lambda o: o.update(seed=-1), r"seed: expected an integer >= 0, got -1"),
    (lambda o: o.update(validation_set=1.5), r"validation_set: a fraction must be in \[0, 1\)"),
    (lambda o: o.update(training_set=5), r"training_set: expected a file, a dataset mapping"),
    (lambda o: o.update(base_precision="64"), r"base_precision: expected one of 16, 32, 64"),
    (
        lambda o: o["training_set"]["targets"]["energy"].update(forcse=True),
        r"training_set\.targets\.energy\.forcse: unknown option.*Did you mean 'forces'\?",
    ),
    (
        lambda o: o["training_set"]["targets"]["energy"].update(forces={"key": "f", "kye": 1}),
        r"training_set\.targets\.energy\.forces\.kye: unknown option.*Did you mean 'key'\?",
    ),
    (
        lambda o: o["training_set"]["systems"].update(lenght_unit="A"),
        r"training_set\.systems\.lenght_unit: unknown option.*Did you mean 'length_unit'\?",
    ),
    (
        lambda o: o["architecture"].update(training={"batch_sise": 4}),
        r"architecture\.training\.batch_sise: unknown option.*Did you mean 'batch_size'\?",
    ),
    (
        lambda o: o["architecture"].update(training={"learning_rate": "0.001"}),
        r"architecture\.training\.learning_rate: expected a number, got '0\.001'",
    ),
    (
        lambda o: o["architecture"]["model"]["soap"].update(max_angular=2.0),
        r"architecture\.model\.soap\.max_angular: expected an integer, got 2\.0",
    ),
    (
        lambda o: o["architecture"].update(training={"grad_clip_norm": 1.0}),
        r"architecture\.training\.grad_clip_norm: unknown option",  # a PET-only option
    ),
    (lambda o: o["architecture"].update(atomic_types=[29, 79.0]), r"atomic_types\.1"),
]


def metatrain_validate(options: dict) -> None:
    """metatrain's checks of ``mtt train``: the base options, then the architecture
    section merged over the architecture's defaults."""
    pydantic = importlib.import_module("metatrain.utils.pydantic")
    architectures = importlib.import_module("metatrain.utils.architectures")
    pydantic.validate_base_options(copy.deepcopy(options))
    name = options["architecture"]["name"]
    defaults = {"architecture": architectures.get_default_hypers(name)}
    merged = OmegaConf.merge(defaults, {"architecture": options["architecture"]})
    architectures.check_architecture_options(name, OmegaConf.to_container(merged.architecture))


@pytest.mark.parametrize(("change", "message"), BAD)
def test_keys_metatrain_rejects_are_errors(files, change, message):
    options = base(files)
    change(options)
    with pytest.raises(ValueError, match=message):
        translate(files, options)
    # metatrain's own validator rejects the same file
    with pytest.raises(Exception) as caught:  # noqa: PT011  (metatrain's error classes)
        metatrain_validate(options)
    assert "Validation" in type(caught.value).__name__


def test_files_metatrain_accepts_are_accepted(files):
    options = base(files, seed=0, base_precision=64, device="cpu", test_set=0.1)
    options["architecture"]["training"] = {"learning_rate": 1, "num_epochs": 2}  # int: a number
    options["training_set"]["targets"]["energy"] = {"key": "energy", "forces": True, "unit": "eV"}
    metatrain_validate(options)
    translation = translate(files, options)
    assert translation.config["optimizer"]["lr"] == 1
    assert translation.config["data"]["dtype"] == "float64"
    assert translation.config["trainer"]["precision"] == "64-true"


def test_missing_files_and_architectures(files, request):
    with pytest.raises(ValueError, match=r"options file '.*nowhere\.yaml' does not exist"):
        translate_options(files["dir"] / "nowhere.yaml")
    options = base(files)
    options["training_set"]["systems"]["read_from"] = str(files["dir"] / "missing.xyz")
    with pytest.raises(ValueError, match=r"training_set\.systems\.read_from: file .* not exist"):
        translate(files, options)
    options = base(files)
    options["architecture"]["name"] = "soap_bnpn"
    options["architecture"].pop("model")
    with pytest.raises(ValueError, match=r"architecture 'soap_bnpn' is not one of .*'soap_bpnn'"):
        translate(files, options)
    architectures = importlib.import_module("metatrain.utils.architectures")
    for name in architectures.find_all_architectures():
        try:
            architectures.import_architecture(name)
        except ImportError:
            options["architecture"]["name"] = name
            with pytest.raises(ImportError, match=rf"(?s)'{name}' cannot be imported.*pip install"):
                translate(files, options)
            break
    request.getfixturevalue("without_metatrain")
    options["architecture"]["name"] = "pet"
    with pytest.raises(ImportError, match=r"pip install 'pl_mtt\[metatrain\]'"):
        translate(files, options)


def test_dry_run_prints_the_merged_config_and_stops(files, capsys, monkeypatch, tmp_path):
    from pl_mtt.training.app import run

    monkeypatch.chdir(tmp_path)
    options = base(files, print_stats=True)
    options["architecture"]["training"] = {"num_epochs": 9}
    cfg = composed(write(files, options), "trainer.max_epochs=3", "dry_run=true")
    result = run(cfg)
    printed = capsys.readouterr().out
    config_text = printed.split("# expanded loss config")[0]
    start = re.search(r"(?m)^data:\n  dataset:", config_text).start()  # after the summary
    merged = yaml.safe_load(config_text[start:])
    assert merged["trainer"]["max_epochs"] == 3
    assert merged["model"]["architecture"] == "soap_bpnn"
    assert merged["optimizer"]["schedule"] == "warmup_cosine"
    assert printed.count("keys pl_mtt does not act on") == 1
    assert "print_stats" in printed
    assert set(result["loss"]["energy"]["gradients"]) == {"positions", "strain"}
    assert not list(tmp_path.iterdir())  # nothing trained, nothing written
