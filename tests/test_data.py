"""Reading, writing and batching: values, units, gradients, stress/virial conventions."""

from __future__ import annotations

import ase
import ase.build
import ase.io
import metatensor.torch as mts
import numpy as np
import pytest
import torch
from ase.calculators.emt import EMT
from ase.calculators.singlepoint import SinglePointCalculator
from metatensor.torch import Labels, TensorBlock, TensorMap

from pl_mtt.config import expand_loss_config
from pl_mtt.data import (
    AtomisticDataModule,
    AtomisticDataset,
    StridedShardSampler,
    batch_to,
    collate,
    join_structures,
    read_extra_data,
    read_targets,
    split_indices,
    write_extxyz,
)


def emt_frames() -> list[ase.Atoms]:
    """Periodic bulk (two sizes), a fully periodic slab and a non-periodic cluster."""
    rng = np.random.default_rng(0)
    bulk = ase.build.bulk("Cu", "fcc", a=3.6, cubic=True).repeat((2, 1, 1))
    bulk.numbers[[1, 5]] = 79
    bulk.set_cell(
        bulk.cell.array @ np.array([[1.02, 0.01, 0], [0.01, 0.99, 0], [0, 0, 1.0]]),
        scale_atoms=True,
    )
    small = ase.build.bulk("Au", "fcc", a=4.1)
    slab = ase.build.fcc111("Cu", (1, 1, 3), vacuum=4.0)
    slab.pbc = True
    slab.info.clear()
    cluster = ase.Atoms("Cu4", positions=[[0, 0, 0], [2.5, 0, 0], [0, 2.5, 0], [0, 0, 2.6]])
    frames = [bulk, small, slab, cluster]
    for atoms in frames:
        atoms.positions += rng.normal(scale=0.05, size=atoms.positions.shape)
        atoms.positions = np.round(atoms.positions, 8)
        atoms.calc = EMT()
        results = {"energy": atoms.get_potential_energy(), "forces": atoms.get_forces()}
        if atoms.pbc.all():
            results["stress"] = atoms.get_stress()
        atoms.calc = SinglePointCalculator(atoms, **results)
    return frames


@pytest.fixture
def emt_file(tmp_path):
    path = tmp_path / "emt.xyz"
    ase.io.write(path, emt_frames(), format="extxyz")
    return path


def emt_energy(atoms: ase.Atoms, strain: np.ndarray) -> float:
    deformed = atoms.copy()
    deformed.set_cell(atoms.cell.array @ (np.eye(3) + strain), scale_atoms=True)
    deformed.calc = EMT()
    return deformed.get_potential_energy()


def finite_difference_strain(atoms: ase.Atoms, h: float = 1e-5) -> np.ndarray:
    gradient = np.zeros((3, 3))
    for a in range(3):
        for b in range(3):
            step = np.zeros((3, 3))
            step[a, b] = h
            gradient[a, b] = (emt_energy(atoms, step) - emt_energy(atoms, -step)) / (2 * h)
    return gradient


# -- reading -------------------------------------------------------------------------
def test_energy_forces_stress_values_and_conventions(emt_file):
    frames = emt_frames()
    dataset = AtomisticDataset.from_file(emt_file, {"energy": {"quantity": "energy"}})
    assert dataset.target_options["energy"]["forces"] is True
    assert dataset.target_options["energy"]["stress"] is True
    assert dataset.target_options["energy"]["virial"] is False
    for index, atoms in enumerate(frames):
        block = dataset.targets["energy"][index].block()
        assert block.properties == Labels(["energy"], torch.tensor([[0]]))
        assert block.values.dtype == torch.float64
        torch.testing.assert_close(block.values[0, 0].item(), atoms.get_potential_energy())
        positions = block.gradient("positions")
        assert positions.samples.names == ["sample", "system", "atom"]
        assert positions.components[0].names == ["xyz"]
        expected = -torch.from_numpy(atoms.get_forces())  # the file keeps 8 decimals
        torch.testing.assert_close(positions.values[:, :, 0], expected, atol=1e-8, rtol=0)
        assert positions.samples.values[:, 2].tolist() == list(range(len(atoms)))
        strain = block.gradient("strain").values[0, :, :, 0]
        if atoms.pbc.all():
            # ase stress is (1/V) dE/d(strain): the stored strain gradient is V * stress ...
            stress = atoms.get_stress(voigt=False)
            torch.testing.assert_close(strain, torch.from_numpy(stress * atoms.get_volume()))
            # ... which is the finite-difference derivative of the energy
            reference = finite_difference_strain(atoms)
            np.testing.assert_allclose(strain.numpy(), reference, atol=2e-7, rtol=0)
        else:
            assert torch.isnan(strain).all()


def test_strain_gradient_from_virial_is_minus_virial(tmp_path):
    frames = emt_frames()[:2]
    virials = []
    for atoms in frames:
        virial = -atoms.get_stress(voigt=False) * atoms.get_volume()
        atoms.info["my_virial"] = virial
        virials.append(virial)
        atoms.calc = SinglePointCalculator(atoms, energy=atoms.get_potential_energy())
    path = tmp_path / "virial.xyz"
    ase.io.write(path, frames, format="extxyz")
    options = {"mtt::etot": {"quantity": "energy", "key": "energy", "virial": "my_virial"}}
    dataset = AtomisticDataset.from_file(path, options)
    assert dataset.target_options["mtt::etot"]["virial"] is True
    assert dataset.target_options["mtt::etot"]["stress"] is False
    assert dataset.target_options["mtt::etot"]["forces"] is False
    for index, virial in enumerate(virials):
        strain = dataset.targets["mtt::etot"][index].block().gradient("strain").values[0, ..., 0]
        torch.testing.assert_close(strain, -torch.from_numpy(virial))
    # the resolved options are what the loss grammar needs: strain exists, positions not
    expanded = expand_loss_config("mse", dataset.target_options)
    assert list(expanded["mtt::etot"]["gradients"]) == ["strain"]


def test_options_turn_detected_gradients_off(emt_file):
    dataset = AtomisticDataset.from_file(
        emt_file, {"energy": {"quantity": "energy", "forces": False, "stress": False}}
    )
    assert dataset.target_options["energy"]["forces"] is False
    assert dataset.target_options["energy"]["stress"] is False
    assert dataset.targets["energy"][0].block().gradients_list() == []
    assert expand_loss_config("mse", dataset.target_options)["energy"]["gradients"] == {}


def test_auto_detection_without_stress_and_explicit_request_error(tmp_path):
    frames = emt_frames()
    for atoms in frames:
        atoms.calc = SinglePointCalculator(
            atoms, energy=atoms.get_potential_energy(), forces=atoms.get_forces()
        )
    path = tmp_path / "nostress.xyz"
    ase.io.write(path, frames, format="extxyz")
    dataset = AtomisticDataset.from_file(path, {"energy": {}})
    assert dataset.target_options["energy"]["forces"] is True
    assert dataset.target_options["energy"]["stress"] is False
    assert dataset.targets["energy"][0].block().gradients_list() == ["positions"]
    with pytest.raises(ValueError, match=r"stress key 'stress' not found in structure 0"):
        AtomisticDataset.from_file(path, {"energy": {"stress": True}})


def test_per_atom_and_multi_property_targets(tmp_path):
    frames = emt_frames()[:3]
    for index, atoms in enumerate(frames):
        atoms.info["dipole"] = np.array([index, 2.0 * index, -1.5])
        atoms.arrays["charges"] = np.linspace(-1, 1, len(atoms)) + index
        atoms.arrays["pair"] = np.stack([np.arange(len(atoms)), -np.arange(len(atoms))], 1) * 0.5
    path = tmp_path / "props.xyz"
    ase.io.write(path, frames, format="extxyz")
    targets = {
        "mtt::dipole": {"key": "dipole", "num_subtargets": 3},
        "mtt::charges": {"key": "charges", "per_atom": True},
        "mtt::pair": {"key": "pair"},  # per_atom detected from `arrays`
    }
    tensors, resolved = read_targets(path, targets)
    assert resolved["mtt::pair"]["per_atom"] is True
    assert resolved["mtt::dipole"]["per_atom"] is False
    assert resolved["mtt::charges"]["num_subtargets"] == 1
    assert resolved["mtt::pair"]["num_subtargets"] == 2
    for index, atoms in enumerate(frames):
        dipole = tensors["mtt::dipole"][index].block()
        assert dipole.samples.names == ["system"]
        assert dipole.properties.names == ["properties"]
        torch.testing.assert_close(
            dipole.values, torch.tensor([[index, 2.0 * index, -1.5]]).double()
        )
        charges = tensors["mtt::charges"][index].block()
        assert charges.samples.names == ["system", "atom"]
        assert charges.samples.values[:, 1].tolist() == list(range(len(atoms)))
        torch.testing.assert_close(charges.values[:, 0], torch.from_numpy(atoms.arrays["charges"]))
        pair = tensors["mtt::pair"][index].block()
        torch.testing.assert_close(pair.values, torch.from_numpy(atoms.arrays["pair"]))
    with pytest.raises(ValueError, match=r"num_subtargets: 2 given but key 'dipole' has 3"):
        read_targets(path, {"mtt::dipole": {"key": "dipole", "num_subtargets": 2}})


def test_float32_dtype(emt_file):
    dataset = AtomisticDataset.from_file(emt_file, {"energy": {}}, dtype=torch.float32)
    system, targets, _ = dataset[0]
    assert system.positions.dtype == torch.float32
    assert targets["energy"].block().gradient("positions").values.dtype == torch.float32


# -- errors --------------------------------------------------------------------------
def test_missing_key_names_key_and_structure(tmp_path):
    frames = emt_frames()[:3]
    for index, atoms in enumerate(frames):
        if index != 2:
            atoms.info["gap"] = 1.0
    path = tmp_path / "gap.xyz"
    ase.io.write(path, frames, format="extxyz")
    with pytest.raises(
        ValueError,
        match=r"target 'mtt::gap': target key 'gap' not found in "
        r"structure 2",
    ):
        read_targets(path, {"mtt::gap": {"key": "gap"}})


def test_unreadable_and_missing_files(tmp_path):
    bad = tmp_path / "bad.xyz"
    bad.write_text("1\nnot an extxyz header\nCu 0 zero\n")
    with pytest.raises(ValueError, match=r"could not read structures from '.*bad\.xyz'"):
        AtomisticDataset.from_file(bad, {"energy": {}})
    with pytest.raises(ValueError, match=r"'.*missing\.xyz' does not exist"):
        AtomisticDataset.from_file(tmp_path / "missing.xyz", {"energy": {}})


def test_inconsistent_atom_counts_between_files(emt_file, tmp_path):
    frames = emt_frames()
    frames[1] = frames[1].repeat((2, 1, 1))
    for atoms in frames:
        atoms.info["gap"] = 0.5
    other = tmp_path / "other.xyz"
    ase.io.write(other, frames, format="extxyz")
    with pytest.raises(ValueError, match=r"structure 1 has 2 atoms in .* but 1 atoms"):
        read_targets(emt_file, {"mtt::gap": {"key": "gap", "read_from": str(other)}})


def test_bad_options_are_value_errors(emt_file):
    with pytest.raises(ValueError, match=r"targets\.energy\.forcez: unknown target option"):
        read_targets(emt_file, {"energy": {"forcez": True}})
    with pytest.raises(ValueError, match=r"only available for energy-like targets"):
        read_targets(emt_file, {"mtt::x": {"key": "energy", "forces": True}})
    with pytest.raises(ValueError, match=r"either 'stress' or 'virial'"):
        read_targets(emt_file, {"energy": {"stress": True, "virial": True}})


# -- writing -------------------------------------------------------------------------
def assert_tensor_maps_close(a: TensorMap, b: TensorMap, atol: float) -> None:
    for block_a, block_b in zip(a.blocks(), b.blocks(), strict=True):
        assert block_a.samples == block_b.samples
        assert block_a.properties == block_b.properties
        torch.testing.assert_close(
            block_a.values, block_b.values, atol=atol, rtol=0, equal_nan=True
        )
        assert block_a.gradients_list() == block_b.gradients_list()
        for name in block_a.gradients_list():
            grad_a, grad_b = block_a.gradient(name), block_b.gradient(name)
            assert grad_a.samples == grad_b.samples
            torch.testing.assert_close(
                grad_a.values, grad_b.values, atol=atol, rtol=0, equal_nan=True
            )


def test_write_read_round_trip_with_ase_units(emt_file, tmp_path):
    frames = emt_frames()
    dataset = AtomisticDataset.from_file(emt_file, {"energy": {"quantity": "energy"}})
    out = tmp_path / "written.xyz"
    write_extxyz(out, dataset.systems, dataset.targets, dataset.target_options)
    # ase itself reads physical values back: eV, eV/Å, eV/Å^3
    for atoms, written in zip(frames, ase.io.read(out, ":"), strict=True):
        assert written.get_potential_energy() == pytest.approx(
            atoms.get_potential_energy(), abs=1e-12
        )
        np.testing.assert_allclose(written.get_forces(), atoms.get_forces(), atol=1e-8)
        if atoms.pbc.all():
            np.testing.assert_allclose(written.get_stress(), atoms.get_stress(), atol=1e-12)
    again = AtomisticDataset.from_file(out, {"energy": {"quantity": "energy"}})
    assert again.target_options == {
        **dataset.target_options,
        "energy": {**dataset.target_options["energy"], "read_from": str(out)},
    }
    for first, second in zip(dataset.targets["energy"], again.targets["energy"], strict=True):
        assert_tensor_maps_close(first, second, atol=1e-8)
    for first, second in zip(dataset.systems, again.systems, strict=True):
        torch.testing.assert_close(first.positions, second.positions, atol=1e-8, rtol=0)
        assert torch.equal(first.types, second.types)
        assert torch.equal(first.pbc, second.pbc)


def test_write_read_round_trip_virial_and_custom_keys(emt_file, tmp_path):
    options = {"quantity": "energy", "key": "energy", "forces": "forces", "virial": True}
    targets = {"mtt::etot": options}
    frames = emt_frames()
    for atoms in frames:
        if atoms.pbc.all():
            atoms.info["virial"] = -atoms.get_stress(voigt=False) * atoms.get_volume()
    source = tmp_path / "source.xyz"
    ase.io.write(source, frames, format="extxyz")
    dataset = AtomisticDataset.from_file(source, targets)
    renamed = {"key": "etot", "forces": {"key": "my_forces"}, "virial": "my_virial"}
    written_options = {"mtt::etot": {**options, **renamed}}
    out = tmp_path / "virial.xyz"
    write_extxyz(out, dataset.systems, dataset.targets, written_options)
    written = ase.io.read(out, ":")
    assert "my_virial" in written[0].info
    assert "my_virial" not in written[3].info  # no cell
    np.testing.assert_allclose(written[0].info["my_virial"], frames[0].info["virial"], atol=1e-12)
    np.testing.assert_allclose(written[0].arrays["my_forces"], frames[0].get_forces(), atol=1e-8)
    again = AtomisticDataset.from_file(out, written_options)
    for first, second in zip(dataset.targets["mtt::etot"], again.targets["mtt::etot"], strict=True):
        assert_tensor_maps_close(first, second, atol=1e-8)


# -- extra data (.mts) ---------------------------------------------------------------
def per_atom_mask(n_atoms: list[int]) -> TensorMap:
    """A per-atom mask for the whole dataset, rows out of order, with a gradient block."""
    rows = [(s, a) for s in range(len(n_atoms)) for a in range(n_atoms[s])]
    order = np.random.default_rng(1).permutation(len(rows))
    samples = torch.tensor([rows[i] for i in order], dtype=torch.int32)
    values = (samples[:, :1] * 100 + samples[:, 1:]).double()
    block = TensorBlock(
        values, Labels(["system", "atom"], samples), [], Labels(["energy"], torch.tensor([[0]]))
    )
    gradient_samples = torch.stack(
        [torch.arange(len(rows)), samples[:, 0], samples[:, 1]], dim=1
    ).to(torch.int32)
    block.add_gradient(
        "positions",
        TensorBlock(
            values[:, None, :].expand(-1, 3, -1) + torch.tensor([0.1, 0.2, 0.3])[None, :, None],
            Labels(["sample", "system", "atom"], gradient_samples),
            [Labels(["xyz"], torch.arange(3).reshape(-1, 1))],
            block.properties,
        ),
    )
    return TensorMap(Labels.single(), [block])


def test_extra_data_mts_round_trip_and_batching(tmp_path):
    n_atoms = [4, 1, 3, 2]
    tensor_map = per_atom_mask(n_atoms)
    path = tmp_path / "mask.mts"
    mts.save(str(path), tensor_map)
    split = read_extra_data("energy_mask", {"read_from": str(path)}, len(n_atoms))
    for index, count in enumerate(n_atoms):
        block = split[index].block()
        assert block.samples.values.tolist() == [[0, a] for a in range(count)]
        torch.testing.assert_close(block.values[:, 0], (index * 100 + torch.arange(count)).double())
        gradient = block.gradient("positions")
        assert gradient.samples.values[:, :2].tolist() == [[a, 0] for a in range(count)]
        # every gradient row still belongs to the value row of its atom
        torch.testing.assert_close(
            gradient.values[:, 0, 0] - 0.1, block.values[gradient.samples.values[:, 0], 0]
        )
    # batching structures 3 and 0 gives back the original rows of those structures
    joined = join_structures([split[3], split[0]])
    block = joined.block()
    assert block.samples.values.tolist() == [[0, 0], [0, 1], [1, 0], [1, 1], [1, 2], [1, 3]]
    torch.testing.assert_close(block.values[:, 0], torch.tensor([300, 301, 0, 1, 2, 3]).double())
    gradient = block.gradient("positions")
    assert gradient.samples.values.tolist() == [
        [0, 0, 0],
        [1, 0, 1],
        [2, 1, 0],
        [3, 1, 1],
        [4, 1, 2],
        [5, 1, 3],
    ]


def test_extra_data_errors(tmp_path):
    path = tmp_path / "mask.mts"
    mts.save(str(path), per_atom_mask([2, 2, 2]))
    with pytest.raises(ValueError, match=r"'system' sample values must be in 0\.\.1"):
        read_extra_data("energy_mask", {"read_from": str(path)}, 2)
    with pytest.raises(ValueError, match=r"extra_data\.m: file '.*nope\.mts' does not exist"):
        read_extra_data("m", {"read_from": str(tmp_path / "nope.mts")}, 2)


def test_mask_must_fit_its_target(emt_file, tmp_path):
    path = tmp_path / "mask.mts"
    block = TensorBlock(
        torch.ones(4, 2),
        Labels(["system"], torch.arange(4).reshape(-1, 1)),
        [],
        Labels(["energy"], torch.tensor([[0], [1]])),
    )
    mts.save(str(path), TensorMap(Labels.single(), [block]))
    with pytest.raises(ValueError, match=r"extra_data 'energy_mask' of structure 0"):
        AtomisticDataset.from_file(
            emt_file, {"energy": {}}, {"energy_mask": {"read_from": str(path)}}
        )


# -- batching ------------------------------------------------------------------------
def test_collate_values_and_reindexing(emt_file):
    dataset = AtomisticDataset.from_file(emt_file, {"energy": {}})
    order = [2, 0, 3, 1]
    systems, targets, extra = collate([dataset[i] for i in order])
    assert extra == {}
    assert [len(s) for s in systems] == [len(dataset.systems[i]) for i in order]
    block = targets["energy"].block()
    assert block.samples.values[:, 0].tolist() == [0, 1, 2, 3]
    expected = torch.cat([dataset.targets["energy"][i].block().values for i in order])
    torch.testing.assert_close(block.values, expected)
    positions = block.gradient("positions")
    samples = positions.samples.values
    # reference: one row per atom, written with loops
    reference = [[b, b, a] for b, i in enumerate(order) for a in range(len(dataset.systems[i]))]
    assert samples.tolist() == reference
    expected_forces = torch.cat(
        [dataset.targets["energy"][i].block().gradient("positions").values for i in order]
    )
    torch.testing.assert_close(positions.values, expected_forces)
    strain = block.gradient("strain")
    assert strain.samples.values[:, 0].tolist() == [0, 1, 2, 3]
    assert torch.isnan(strain.values[2]).all()  # the cluster
    assert not torch.isnan(strain.values[0]).any()


def test_batch_to_dtype(emt_file):
    dataset = AtomisticDataset.from_file(emt_file, {"energy": {}})
    systems, targets, _ = batch_to(collate([dataset[0], dataset[1]]), dtype=torch.float32)
    assert systems[0].positions.dtype == torch.float32
    assert targets["energy"].block().gradient("strain").values.dtype == torch.float32


def test_strided_shard_sampler_never_pads():
    dataset = list(range(10))
    shards = [list(StridedShardSampler(dataset, num_replicas=3, rank=r)) for r in range(3)]
    assert shards == [[0, 3, 6, 9], [1, 4, 7], [2, 5, 8]]
    assert [len(StridedShardSampler(dataset, num_replicas=3, rank=r)) for r in range(3)] == [
        4,
        3,
        3,
    ]
    shuffled = [StridedShardSampler(dataset, 3, r, shuffle=True, seed=5) for r in range(3)]
    union = sorted(i for sampler in shuffled for i in sampler)
    assert union == dataset
    # a DistributedSampler subclass: Lightning keeps it instead of wrapping it (padding)
    assert isinstance(shuffled[0], torch.utils.data.DistributedSampler)


def test_split_indices_deterministic_and_disjoint():
    train, val, test = split_indices(20, 0.1, 0.2, seed=3)
    assert (len(train), len(val), len(test)) == (14, 2, 4)
    assert sorted(train + val + test) == list(range(20))
    assert split_indices(20, 0.1, 0.2, seed=3) == (train, val, test)
    assert split_indices(20, 0.1, 0.2, seed=4) != (train, val, test)
    with pytest.raises(ValueError, match="cannot give a training split"):
        split_indices(4, 0.5, 0.5, seed=0)


def test_datamodule_on_a_file(emt_file):
    module = AtomisticDataModule(
        path=str(emt_file),
        targets={"energy": {}},
        val_fraction=0.25,
        test_fraction=0.25,
        batch_size=2,
    )
    module.setup("fit")
    assert module.target_options["energy"]["forces"] is True
    assert module.atomic_types == [29, 79]
    assert module.layouts()["energy"].block().gradient("positions").values.shape == (0, 3, 1)
    sizes = [len(module.train_dataset), len(module.val_dataset), len(module.test_dataset)]
    assert sizes == [2, 1, 1]
    batches = list(module.train_dataloader())
    assert [len(batch[0]) for batch in batches] == [2]
    val_batches = list(module.val_dataloader())
    assert [len(batch[0]) for batch in val_batches] == [1]
    assert val_batches[0][1]["energy"].block().values.shape == (1, 1)
    moved = module.transfer_batch_to_device(val_batches[0], torch.device("cpu"), 0)
    assert moved[1]["energy"].block().values.device == torch.device("cpu")
    assert len(moved[0]) == 1
