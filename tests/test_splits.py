"""Explicit splits of AtomisticDataModule: index lists and files (metatrain's indices/
format), validation/test sets from the same or another file, drop_last."""

from __future__ import annotations

import ase.io
import pytest

from pl_mtt.data import AtomisticDataModule, embedded_dataset, read_indices, write_indices


@pytest.fixture(scope="module")
def emt(tmp_path_factory):
    directory = tmp_path_factory.mktemp("emt")
    data = embedded_dataset("emt", n_structures=12, directory=directory)
    frames = ase.io.read(data.path, index=":")
    other = directory / "other.xyz"
    ase.io.write(other, frames[:5], format="extxyz")
    return data, other


def energies(dataset) -> list[float]:
    return [float(dataset[i][1]["energy"].block().values) for i in range(len(dataset))]


def test_index_files_round_trip_and_errors(tmp_path):
    path = tmp_path / "indices" / "validation.txt"
    write_indices(path, [3, 0, 7])
    assert path.read_text() == "3\n0\n7\n"
    assert read_indices(path, "x") == [3, 0, 7]
    (tmp_path / "empty.txt").write_text("")
    assert read_indices(tmp_path / "empty.txt", "x") == []
    (tmp_path / "bad.txt").write_text("1\n2.5\n")
    with pytest.raises(ValueError, match=r"data\.indices: line 2 of .*bad\.txt' is '2\.5'"):
        read_indices(tmp_path / "bad.txt", "data.indices")
    with pytest.raises(ValueError, match=r"data\.val_set\.indices: index file .* does not exist"):
        read_indices(tmp_path / "missing.txt", "data.val_set.indices")


def test_indices_select_training_and_validation_structures(emt, tmp_path):
    data, _ = emt
    write_indices(tmp_path / "training.txt", [0, 2, 4, 6, 8])
    module = AtomisticDataModule(
        path=data.path,
        targets=data.targets,
        indices=str(tmp_path / "training.txt"),
        val_set={"indices": [1, 3]},
        test_set={"indices": [5]},
    )
    module.setup()
    assert sorted(module.split["train"]) == [0, 2, 4, 6, 8]
    assert module.split["val"] == [1, 3]
    assert module.split["test"] == [5]
    full = AtomisticDataModule(
        path=data.path,
        targets=data.targets,
        val_fraction=0.0,
        test_fraction=0.0,
        indices=list(range(12)),
    )
    full.setup()
    by_index = dict(zip(full.split["train"], energies(full.train_dataset), strict=True))
    assert energies(module.val_dataset) == [by_index[1], by_index[3]]
    assert sorted(energies(module.train_dataset)) == sorted(by_index[i] for i in [0, 2, 4, 6, 8])


def test_a_fraction_splits_the_indexed_training_structures(emt):
    data, _ = emt
    module = AtomisticDataModule(
        path=data.path,
        targets=data.targets,
        indices=list(range(10)),
        val_fraction=0.2,
        test_fraction=0.0,
    )
    module.setup()
    assert len(module.split["val"]) == 2
    assert sorted(module.split["train"] + module.split["val"]) == list(range(10))
    assert module.split["test"] == []


def test_validation_set_from_another_file(emt):
    data, other = emt
    module = AtomisticDataModule(
        path=data.path,
        targets=data.targets,
        val_set={"path": str(other), "indices": [4, 0]},
        test_fraction=0.25,
    )
    module.setup()
    assert module.split["val"] == [4, 0]
    assert len(module.train_dataset) + len(module.test_dataset) == 12
    val_options = module.val_dataset.target_options["energy"]
    train_options = module.train_dataset.target_options["energy"]
    assert val_options.pop("read_from") == str(other)
    assert train_options.pop("read_from") == data.path
    assert val_options == train_options


def test_bad_explicit_sets_name_the_key(emt, tmp_path):
    data, _ = emt
    with pytest.raises(ValueError, match=r"data\.val_set\.indice: unknown key.*'indices'"):
        AtomisticDataModule(path=data.path, targets=data.targets, val_set={"indice": [1]})
    module = AtomisticDataModule(path=data.path, targets=data.targets, val_set={"indices": [12]})
    with pytest.raises(ValueError, match=r"data\.val_set\.indices: index 12 is out of range"):
        module.setup()
    nostress = tmp_path / "nostress.xyz"
    frames = ase.io.read(data.path, index=":3")
    for atoms in frames:
        atoms.calc.results.pop("stress")
    ase.io.write(nostress, frames, format="extxyz")
    module = AtomisticDataModule(path=data.path, targets=data.targets, test_set={"path": nostress})
    with pytest.raises(ValueError, match=r"data\.test_set: target 'energy' has stress in the"):
        module.setup()


def test_drop_last_drops_the_incomplete_training_batch(emt):
    data, _ = emt
    for drop_last, batches in ((False, 3), (True, 2)):
        module = AtomisticDataModule(
            path=data.path,
            targets=data.targets,
            val_fraction=0.0,
            test_fraction=0.0,
            batch_size=5,
            drop_last=drop_last,
        )
        assert len(module.train_dataloader()) == batches
