"""metatrain's disk formats: round trips through real files, metatrain reading what pl_mtt
writes, the one-pass fit on disk-backed data, bad input, training from each format."""

from __future__ import annotations

import io
import zipfile
from pathlib import Path

import ase
import ase.io
import metatensor.torch as mts
import numpy as np
import pytest
import torch
from ase.calculators.emt import EMT
from metatensor.torch import Labels, TensorBlock, TensorMap
from torch.utils.data import DataLoader

from pl_mtt.data import (
    AtomisticDataset,
    MemmapDataset,
    ZipDataset,
    ZipDatasetWriter,
    collate,
    dataset_format,
    open_dataset,
    write_dataset,
)
from pl_mtt.data.convert import convert
from pl_mtt.data.convert import main as convert_main
from pl_mtt.data.emt import generate_emt_structures
from pl_mtt.scaling.composition import CompositionModel
from pl_mtt.scaling.fit import fit_pass
from pl_mtt.scaling.scaler import Scaler

metatrain_data = pytest.importorskip("metatrain.utils.data")

SCRIPTS = Path(__file__).parent / "scripts"
N = 9
TARGETS = {
    "energy": {"quantity": "energy", "unit": "eV", "forces": True, "stress": True},
    "mtt::charges": {"key": "charges", "per_atom": True},
}
TARGETS_YAML = (
    "{energy: {quantity: energy, unit: eV}, mtt::charges: {key: charges, per_atom: true}}"
)
DISK_EXTRA = {"energy_mask": {"key": "energy_mask"}}


def _frames() -> list[ase.Atoms]:
    """EMT-labelled cells, one non-periodic cluster (no stress), per-atom charges."""
    frames = generate_emt_structures(N - 1, seed=3)
    cluster = ase.Atoms("Cu4", positions=[[0, 0, 0], [2.5, 0, 0], [0, 2.5, 0], [0, 0, 2.5]])
    cluster.calc = EMT()
    cluster.get_forces()
    frames.insert(4, cluster)
    rng = np.random.default_rng(0)
    for atoms in frames:
        atoms.arrays["charges"] = rng.normal(size=len(atoms))
    return frames


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    """extxyz + energy mask (.mts), converted to a zip and a directory with the CLI."""
    root = tmp_path_factory.mktemp("disk")
    xyz = root / "data.xyz"
    frames = _frames()
    ase.io.write(xyz, frames, format="extxyz")
    mask = TensorMap(
        Labels.single(),
        [
            TensorBlock(
                torch.tensor([[1.0], [0.0], [1.0], [1.0], [0.0], [1.0], [1.0], [1.0], [0.0]]),
                Labels(["system"], torch.arange(N, dtype=torch.int32)[:, None]),
                [],
                Labels(["energy"], torch.tensor([[0]], dtype=torch.int32)),
            )
        ],
    )
    mts.save(str(root / "mask.mts"), mask)
    extra = f"{{energy_mask: {{read_from: {root / 'mask.mts'}}}}}"
    for output in ("data.zip", "data_dir/"):
        args = [str(xyz), f"{root}/{output}", "--targets", TARGETS_YAML, "--extra-data", extra]
        assert convert_main(args) == 0
    return {
        "xyz": xyz,
        "zip": root / "data.zip",
        "dir": root / "data_dir",
        "extra": {"energy_mask": {"read_from": str(root / "mask.mts")}},
        "n_atoms": [len(a) for a in frames],
    }


def _assert_same(a: torch.Tensor, b: torch.Tensor, what: str) -> None:
    torch.testing.assert_close(a, b, rtol=0, atol=0, equal_nan=True, msg=what)


def _float32(values: torch.Tensor) -> torch.Tensor:
    return values.to(torch.float32).to(torch.float64)


def test_dispatch_by_path(files, tmp_path):
    assert dataset_format("a.zip") == "zip"
    assert dataset_format(files["dir"]) == "memmap"
    assert dataset_format("new_dir/") == "memmap"
    assert dataset_format(files["xyz"]) == "ase"
    assert isinstance(open_dataset(files["zip"], TARGETS, DISK_EXTRA), ZipDataset)
    assert isinstance(open_dataset(files["dir"], TARGETS, DISK_EXTRA), MemmapDataset)
    assert isinstance(open_dataset(files["xyz"], TARGETS, files["extra"]), AtomisticDataset)


def test_round_trip_pl_mtt_reads_what_was_written(files):
    memory = open_dataset(files["xyz"], TARGETS, files["extra"])
    zipped = open_dataset(files["zip"], TARGETS, DISK_EXTRA)
    directory = open_dataset(files["dir"], TARGETS, DISK_EXTRA)
    for dataset in (zipped, directory):
        for name in TARGETS:
            resolved = dict(dataset.target_options[name], read_from=None)
            assert resolved == dict(memory.target_options[name], read_from=None), name
    assert zipped.target_options["energy"]["forces"]
    assert zipped.target_options["energy"]["stress"]
    assert len(memory) == len(zipped) == len(directory) == N
    for index in range(N):
        system, targets, extra = memory[index]
        # the zip stores float64: identical, layout included
        z_system, z_targets, z_extra = zipped[index]
        _assert_same(z_system.positions, system.positions, "positions")
        _assert_same(z_system.cell, system.cell, "cell")
        assert torch.equal(z_system.types, system.types)
        assert torch.equal(z_system.pbc, system.pbc)
        for name, value in {**targets, **extra}.items():
            other = {**z_targets, **z_extra}[name]
            assert mts.equal_metadata(other, value), name
            for a, b in zip(other.blocks(), value.blocks(), strict=True):
                _assert_same(a.values, b.values, f"{name} of structure {index}")
                for g, gradient in b.gradients():
                    _assert_same(a.gradient(g).values, gradient.values, f"{name}/{g}")
        # the directory stores float32: the same values rounded to float32
        d_system, d_targets, d_extra = directory[index]
        _assert_same(d_system.positions, _float32(system.positions), "positions")
        _assert_same(d_system.cell, _float32(system.cell), "cell")
        for name, value in {**targets, **extra}.items():
            other = {**d_targets, **d_extra}[name]
            assert mts.equal_metadata(other, value), name
            block, theirs = value.block(), other.block()
            _assert_same(theirs.values, _float32(block.values), name)
        energy, d_energy = targets["energy"].block(), d_targets["energy"].block()
        _assert_same(
            d_energy.gradient("positions").values,
            _float32(energy.gradient("positions").values),
            "forces",
        )
        strain, d_strain = energy.gradient("strain").values, d_energy.gradient("strain").values
        assert torch.isnan(strain).all() == torch.isnan(d_strain).all() == (index == 4)
        torch.testing.assert_close(d_strain, strain, rtol=2e-6, atol=1e-6, equal_nan=True)
    np.testing.assert_array_equal(zipped.atom_counts(), files["n_atoms"])
    np.testing.assert_array_equal(directory.atom_counts(), files["n_atoms"])
    np.testing.assert_array_equal(memory.atom_counts(), files["n_atoms"])
    assert zipped.atomic_types == directory.atomic_types == memory.atomic_types == [29, 79]


def test_metatrain_reads_identical_values(files):
    from metatrain.utils.data import DiskDataset
    from metatrain.utils.data.dataset import MemmapDataset as MetatrainMemmapDataset

    ours_zip = open_dataset(files["zip"], TARGETS, DISK_EXTRA)
    ours_dir = open_dataset(files["dir"], TARGETS, DISK_EXTRA)
    theirs_zip = DiskDataset(
        str(files["zip"]),
        fields={
            "energy": {"key": "energy"},
            "mtt::charges": {"key": "charges"},
            "energy_mask": {"key": "energy_mask"},
        },
    )
    energy = {
        "quantity": "energy",
        "key": "energy",
        "unit": "eV",
        "sample_kind": "system",
        "num_subtargets": 1,
        "type": "scalar",
        "forces": {"key": "forces"},
        "stress": {"key": "stress"},
        "virial": False,
    }
    charges = {
        "quantity": "",
        "key": "charges",
        "unit": "",
        "sample_kind": "atom",
        "num_subtargets": 1,
        "type": "scalar",
        "forces": False,
        "stress": False,
        "virial": False,
    }
    mask = {"key": "energy_mask", "type": "scalar", "sample_kind": "system", "num_subtargets": 1}
    theirs_dir = MetatrainMemmapDataset(
        str(files["dir"]), {"energy": energy, "mtt::charges": charges}, {"energy_mask": mask}
    )
    for index in range(N):
        for ours, theirs in ((ours_zip, theirs_zip[index]), (ours_dir, theirs_dir[index])):
            system, targets, extra = ours[index]
            _assert_same(theirs.system.positions, system.positions, "positions")
            _assert_same(theirs.system.cell, system.cell, "cell")
            assert torch.equal(theirs.system.types, system.types)
            block, their_block = targets["energy"].block(), theirs.energy.block()
            _assert_same(their_block.values, block.values, "energy")
            for gradient in ("positions", "strain"):
                _assert_same(
                    their_block.gradient(gradient).values,
                    block.gradient(gradient).values,
                    f"energy/{gradient} of structure {index}",
                )
            _assert_same(
                theirs["mtt::charges"].block().values, targets["mtt::charges"].block().values, "q"
            )
            _assert_same(
                theirs["energy_mask"].block().values, extra["energy_mask"].block().values, "mask"
            )
    # metatrain's own checks of the zip's layout (DiskDataset.get_target_info)
    from omegaconf import OmegaConf

    info = theirs_zip.get_target_info(OmegaConf.create({"energy": energy}))
    assert info["energy"].gradients == ["positions", "strain"]


def test_subset_views_and_batches(files):
    zipped = open_dataset(files["zip"], TARGETS, DISK_EXTRA)
    view = zipped.subset([5, 2, 7]).subset([2, 0])
    assert len(view) == 2
    np.testing.assert_array_equal(view.atom_counts(), np.array(files["n_atoms"])[[7, 5]])
    assert mts.equal(view[0][1]["mtt::charges"], zipped[7][1]["mtt::charges"])
    memory = open_dataset(files["xyz"], TARGETS, files["extra"])
    ours = collate([zipped[i] for i in (3, 0, 8)])
    reference = collate([memory[i] for i in (3, 0, 8)])
    for name in TARGETS:
        assert mts.equal_metadata(ours[1][name], reference[1][name])
    with pytest.raises(IndexError, match="out of range"):
        view[2]


def test_datamodule_summary_atom_batches_and_neighbor_lists(files):
    from metatomic.torch import NeighborListOptions

    from pl_mtt.data import AtomisticDataModule

    for kind in ("zip", "dir"):
        module = AtomisticDataModule(
            dataset=None,
            path=str(files[kind]),
            targets=TARGETS,
            extra_data=DISK_EXTRA,
            val_fraction=0.2,
            test_fraction=0.2,
            max_atoms_per_batch=40,
        )
        module.setup()
        summary = module.summary()
        assert f"data: 9 structures in '{files[kind]}'" in summary
        source = "forces.bin" if kind == "dir" else "energy.mts positions gradient"
        assert f"forces: key '{source}'" in summary
        if kind == "dir":
            counted = sum(module.report.elements["train"].values())
            assert counted == int(module.train_dataset.atom_counts().sum())
        else:
            assert "elements per split are not counted for a zip" in summary
        assert module.atomic_types == [29, 79]
        seen = []
        for systems, _, _ in module.train_dataloader():
            assert sum(len(system) for system in systems) <= 40
            seen.append(len(systems))
        assert sum(seen) == len(module.train_dataset)
        options = NeighborListOptions(cutoff=3.0, full_list=True, strict=True)
        module.request_neighbor_lists([options])
        system = module.val_dataset[0][0]
        assert len(system.known_neighbor_lists()) == 1
        assert len(module.full_dataset[0][0].known_neighbor_lists()) == 0  # views copy


def test_datasets_go_to_worker_processes(files):
    import pickle
    from multiprocessing.reduction import ForkingPickler

    for path in (files["zip"], files["dir"]):
        dataset = open_dataset(path, TARGETS, DISK_EXTRA).subset([6, 1, 3])
        copied = pickle.loads(ForkingPickler.dumps(dataset))  # as sent to spawned workers
        assert mts.equal(copied[0][1]["energy"], dataset[0][1]["energy"])
        forked = DataLoader(
            dataset,
            batch_size=3,
            collate_fn=collate,
            num_workers=2,
            multiprocessing_context="fork",
        )
        reference = collate([dataset[i] for i in range(3)])
        batches = list(forked)
        assert len(batches) == 1
        assert mts.equal(batches[0][1]["mtt::charges"], reference[1]["mtt::charges"])


def test_zip64_archives_read_by_zipfile_pl_mtt_and_metatrain(files, tmp_path):
    from metatrain.utils.data import DiskDataset

    memory = open_dataset(files["xyz"], TARGETS, files["extra"])
    path = tmp_path / "zip64.zip"
    with ZipDatasetWriter(path, {"mtt::charges": "charges"}, force_zip64=True) as writer:
        for index in range(3):
            writer.write(*memory[index])
    with zipfile.ZipFile(path) as archive:
        assert archive.testzip() is None
        assert len(archive.namelist()) == 3 * 4 + 1
    ours = open_dataset(path, TARGETS, DISK_EXTRA)
    theirs = DiskDataset(str(path), fields=["energy"])
    assert mts.equal(ours[2][1]["mtt::charges"], memory[2][1]["mtt::charges"])
    _assert_same(theirs[2].energy.block().values, memory[2][1]["energy"].block().values, "E")


def test_scales_from_a_zip_equal_the_in_memory_fit(files):
    def fit(dataset, batch_size):
        layouts = dataset.layouts()
        scaler, composition = Scaler(None, layouts), CompositionModel(None, layouts)
        loader = DataLoader(dataset, batch_size=batch_size, collate_fn=collate)
        fit_pass(loader, scaler, composition)
        return scaler, composition

    memory = fit(open_dataset(files["xyz"], TARGETS, files["extra"]), 4)
    zipped = fit(open_dataset(files["zip"], TARGETS, DISK_EXTRA), 3)
    for ours, reference in zip(zipped, memory, strict=True):
        expected = {k: v for k, v in reference.state_dict().items() if torch.is_tensor(v)}
        for key, value in expected.items():
            got = ours.state_dict()[key]
            if value.is_floating_point():
                torch.testing.assert_close(got, value, rtol=1e-12, atol=0, msg=key)
            else:
                assert torch.equal(got, value), key
    assert bool(zipped[0].fitted)


@pytest.mark.slow
def test_two_process_gloo_fit_on_a_zip_equals_single_process(files, run_python, tmp_path):
    result = run_python(
        [str(SCRIPTS / "disk_ddp.py"), str(files["zip"]), str(tmp_path), "--devices", "2"],
        cwd=tmp_path,
        timeout=600,
    )
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    ranks = [torch.load(tmp_path / f"rank{r}.pt", weights_only=False) for r in (0, 1)]
    assert sorted(r["structures"] for r in ranks) == [4, 5]  # strided shares, never padded
    layouts = open_dataset(files["xyz"], TARGETS).layouts()
    scaler, composition = Scaler(None, layouts), CompositionModel(None, layouts)
    dataset = open_dataset(files["xyz"], TARGETS)
    fit_pass(DataLoader(dataset, batch_size=N, collate_fn=collate), scaler, composition)
    for part, single in (("scaler", scaler), ("composition", composition)):
        for key, value in single.state_dict().items():
            if not torch.is_tensor(value):
                continue
            assert torch.equal(ranks[0][part][key], ranks[1][part][key]), key  # identical
            if value.is_floating_point():
                torch.testing.assert_close(ranks[0][part][key], value, rtol=1e-12, atol=0)
            else:
                assert torch.equal(ranks[0][part][key], value), key


# -- bad input -----------------------------------------------------------------------
def _rewrite(source: Path, target: Path, change) -> Path:
    """Copy a zip member by member (stored), ``change(name, data)`` -> data or None."""
    with zipfile.ZipFile(source) as old, zipfile.ZipFile(target, "w") as new:
        for name in old.namelist():
            data = change(name, old.read(name))
            if data is not None:
                new.writestr(name, data)
    return target


def test_bad_zips_name_the_file_and_the_entry(files, tmp_path):
    data = files["zip"].read_bytes()
    truncated = tmp_path / "truncated.zip"
    truncated.write_bytes(data[: len(data) // 2])
    with pytest.raises(ValueError, match=r"truncated.zip.*truncated"):
        open_dataset(truncated, TARGETS)

    foreign = tmp_path / "foreign.zip"
    with zipfile.ZipFile(foreign, "w") as archive:
        archive.writestr("notes.txt", "hello")
    with pytest.raises(ValueError, match=r"foreign.zip' is not a metatrain DiskDataset zip.*notes"):
        open_dataset(foreign, TARGETS)

    with pytest.raises(
        ValueError, match=r"targets.energy: dataset zip .*data.zip' has no field 'E'"
    ):
        open_dataset(files["zip"], {"energy": {"key": "E"}})
    with pytest.raises(ValueError, match=r"extra_data.w: .* has no field 'w'.*fields"):
        open_dataset(files["zip"], TARGETS, {"w": {}})
    with pytest.raises(
        ValueError, match=r"extra_data.energy_mask.num_subtargets: 2 given, but field 'energy_mask'"
    ):
        open_dataset(files["zip"], TARGETS, {"energy_mask": {"num_subtargets": 2}})

    missing = _rewrite(
        files["zip"], tmp_path / "missing.zip", lambda n, d: None if n == "3/energy.mts" else d
    )
    with pytest.raises(ValueError, match=r"missing.zip': entry 3 has no member '3/energy.mts'"):
        open_dataset(missing, TARGETS)

    def bad_counts(name, data):
        if name != "metadata/atom_counts.npy":
            return data
        counts = np.load(io.BytesIO(data))
        counts[6] += 1
        buffer = io.BytesIO()
        np.save(buffer, counts)
        return buffer.getvalue()

    counts = open_dataset(_rewrite(files["zip"], tmp_path / "counts.zip", bad_counts), TARGETS)
    counts[5]
    with pytest.raises(
        ValueError, match=r"counts.zip': entry 6 has \d+ atoms in '6/system.mta'.*inconsistent"
    ):
        counts[6]

    def no_positions(name, data):
        if name != "2/energy.mts":
            return data
        stored = mts.load_buffer(torch.from_numpy(np.load(io.BytesIO(data))))
        block = stored.block()
        new = TensorBlock(block.values, block.samples, block.components, block.properties)
        new.add_gradient("strain", block.gradient("strain"))
        buffer = io.BytesIO()
        np.save(buffer, mts.save_buffer(TensorMap(stored.keys, [new])).numpy())
        return buffer.getvalue()

    gradients = open_dataset(_rewrite(files["zip"], tmp_path / "grad.zip", no_positions), TARGETS)
    with pytest.raises(ValueError, match=r"member '2/energy.mts' has no \['positions'\] gradient"):
        gradients[2]

    corrupt = bytearray(data)
    with zipfile.ZipFile(files["zip"]) as archive:
        info = archive.getinfo("1/system.mta")
    corrupt[info.header_offset + 30 + len("1/system.mta") + 100] ^= 0xFF
    (tmp_path / "corrupt.zip").write_bytes(bytes(corrupt))
    with pytest.raises(ValueError, match=r"member '1/system.mta' is corrupt \(CRC-32"):
        open_dataset(tmp_path / "corrupt.zip", TARGETS)[1]


def test_bad_directories_name_the_file(files, tmp_path):
    import shutil

    def copy(name):
        target = tmp_path / name
        shutil.copytree(files["dir"], target)
        return target

    short = copy("short")
    (short / "x.bin").write_bytes((short / "x.bin").read_bytes()[:-12])
    with pytest.raises(ValueError, match=r"short': 'x.bin' has \d+ bytes, expected .*inconsistent"):
        open_dataset(short, TARGETS)

    counts = copy("counts")
    np.save(counts / "na.npy", np.load(counts / "na.npy").astype(np.int32))
    with pytest.raises(ValueError, match=r"counts': 'na.npy' must be int64"):
        open_dataset(counts, TARGETS)

    no_forces = copy("no_forces")
    (no_forces / "forces.bin").unlink()
    with pytest.raises(
        ValueError,
        match=r"targets.energy.forces: requested, but .*no_forces' has no forces \(key 'forces'\)",
    ):
        open_dataset(no_forces, TARGETS)
    assert not open_dataset(no_forces, {"energy": {}}).target_options["energy"]["forces"]

    with pytest.raises(ValueError, match=r"targets.q: memmap dataset .* has no 'q.bin'"):
        open_dataset(files["dir"], {"q": {}})
    with pytest.raises(
        ValueError, match=r"charges.bin' has \d+ float32 values, expected 9 structures"
    ):
        open_dataset(files["dir"], {"mtt::charges": {"key": "charges", "per_atom": False}})


def test_convert_reads_extra_data_keys_as_open_dataset_does(tmp_path):
    frames = _frames()
    for index, atoms in enumerate(frames):
        atoms.info["weight"] = 0.5 + index
    xyz = tmp_path / "weights.xyz"
    ase.io.write(xyz, frames, format="extxyz")
    extra = {"weight": {"key": "weight"}, "q": {"key": "charges"}}
    memory = open_dataset(xyz, {"energy": {}}, extra)
    for output in ("weights.zip", "weights_dir/"):
        count, _ = convert(xyz, f"{tmp_path}/{output}", {"energy": {}}, extra)
        assert count == N
        stored = open_dataset(f"{tmp_path}/{output}", {"energy": {}}, extra)
        rounded = _float32 if output.endswith("/") else (lambda values: values)
        for index in range(N):
            for name, value in memory[index][2].items():
                other = stored[index][2][name]
                assert mts.equal_metadata(other, value), name
                _assert_same(other.block().values, rounded(value.block().values), name)
    assert memory[1][2]["weight"].block().values.tolist() == [[1.5]]
    assert memory[1][2]["q"].block().samples.names == ["system", "atom"]
    del frames[5].info["weight"]
    ase.io.write(xyz, frames, format="extxyz")
    with pytest.raises(
        ValueError, match=r"extra_data.weight: key 'weight' not found in structure 5"
    ):
        convert(xyz, tmp_path / "missing.zip", {"energy": {}}, extra)


def test_convert_errors_name_the_frame(files, tmp_path):
    frames = _frames()
    del frames[5].arrays["charges"]
    path = tmp_path / "bad.xyz"
    ase.io.write(path, frames, format="extxyz")
    with pytest.raises(ValueError, match=r"key 'charges' not found in structure 5 of"):
        convert(path, tmp_path / "bad.zip", TARGETS)
    assert not (tmp_path / "bad.zip").exists()
    assert not (tmp_path / "bad.zip.partial").exists()

    frames = _frames()
    frames[0].calc = None  # energy moved to info, no forces/stress on the first frame
    frames[0].info["energy"] = -1.0
    path = tmp_path / "late.xyz"
    ase.io.write(path, frames, format="extxyz")
    with pytest.raises(ValueError, match=r"targets.energy.forces: structure 1 .* has 'forces' but"):
        convert(path, tmp_path / "late.zip", {"energy": {}})
    with pytest.raises(ValueError, match="exists"):
        convert(files["xyz"], files["zip"], TARGETS)


def test_write_dataset_refuses_other_paths(files, tmp_path):
    dataset = open_dataset(files["zip"], TARGETS)
    with pytest.raises(ValueError, match=r"neither a \.zip nor a directory"):
        write_dataset(tmp_path / "out.xyz", dataset)
    (tmp_path / "full").mkdir()
    (tmp_path / "full" / "x").write_text("")
    with pytest.raises(ValueError, match="not an empty directory"):
        write_dataset(tmp_path / "full", dataset)


# -- training from each format -------------------------------------------------------
@pytest.mark.slow
def test_training_runs_from_a_zip_and_a_directory(files, run_python, tmp_path):
    result = run_python(
        [
            "-m",
            "pl_mtt.train",
            "-m",
            f"data.path={files['zip']},{files['dir']}",
            "data.dataset=null",
            "data.batch_size=3",
            "data.val_fraction=0.25",
            "data.test_fraction=0.2",
            "model.n_radial=4",
            "model.hidden=[4]",
            "trainer.max_epochs=1",
            "trainer.enable_model_summary=false",
        ],
        cwd=tmp_path,
        timeout=600,
        env={"PL_MTT_CACHE": str(tmp_path / "cache")},
    )
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    runs = sorted(p.parent for p in tmp_path.glob("outputs/multirun/*/*/*/.hydra"))
    assert len(runs) == 2, runs
    for run in runs:
        assert (run / "model.pt").is_file()
        assert (run / "checkpoints" / "last.ckpt").is_file()
        statistics = (run / "statistics.yaml").read_text()
        assert "pl_mtt_statistics: 1" in statistics
        assert "atomic_types: [29, 79]" in statistics
