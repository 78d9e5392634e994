"""The embedded datasets: deterministic, cached, labelled correctly, read back normally."""

from __future__ import annotations

from pathlib import Path

import ase.io
import numpy as np
import pytest
import torch
from ase.calculators.emt import EMT

from pl_mtt.data import AtomisticDataModule, AtomisticDataset, embedded_dataset
from pl_mtt.data import dos as dos_data
from pl_mtt.data.emt import generate_emt_structures


@pytest.fixture
def cache(tmp_path, monkeypatch):
    monkeypatch.setenv("PL_MTT_CACHE", str(tmp_path / "cache"))
    return tmp_path / "cache"


def test_emt_dataset_is_deterministic_and_cached(cache, tmp_path):
    first = embedded_dataset("emt", n_structures=10)
    assert first.path.startswith(str(cache))
    other = embedded_dataset("emt", n_structures=10, directory=tmp_path / "elsewhere")
    assert Path(first.path).read_text() == Path(other.path).read_text()
    # cached: the file is reused, not regenerated
    mtime = (cache / first.path.split("/")[-1]).stat().st_mtime_ns
    assert embedded_dataset("emt", n_structures=10).path == first.path
    assert (cache / first.path.split("/")[-1]).stat().st_mtime_ns == mtime
    # the first n structures do not depend on n
    more = embedded_dataset("emt", n_structures=12)
    frames, frames_more = ase.io.read(first.path, ":"), ase.io.read(more.path, ":")
    for a, b in zip(frames, frames_more[:10], strict=True):
        np.testing.assert_array_equal(a.positions, b.positions)
        assert a.get_potential_energy() == b.get_potential_energy()


def test_emt_structures_and_labels():
    frames = generate_emt_structures(10)
    assert all(len(atoms) <= 32 and atoms.pbc.all() for atoms in frames)
    assert {int(z) for atoms in frames for z in atoms.numbers} == {29, 79}
    assert len({atoms.info["kind"] for atoms in frames}) == 5
    for atoms in frames[:3]:
        reference = atoms.copy()
        reference.calc = EMT()
        assert atoms.get_potential_energy() == pytest.approx(reference.get_potential_energy())
        np.testing.assert_allclose(atoms.get_forces(), reference.get_forces(), atol=1e-12)
        np.testing.assert_allclose(atoms.get_stress(), reference.get_stress(), atol=1e-12)
    forces = np.concatenate([atoms.get_forces() for atoms in frames])
    assert 0.2 < np.sqrt((forces**2).mean()) < 3.0  # rattled: forces of order 1 eV/Å


def test_emt_through_the_datamodule(cache):
    module = AtomisticDataModule("emt", n_structures=20, batch_size=4)
    module.setup()
    options = module.target_options["energy"]
    assert (options["forces"], options["stress"], options["virial"]) == (True, True, False)
    _, targets, _ = next(iter(module.train_dataloader()))
    block = targets["energy"].block()
    assert block.gradients_list() == ["positions", "strain"]
    assert not torch.isnan(block.gradient("strain").values).any()
    assert len(module.train_dataset) + len(module.val_dataset) + len(module.test_dataset) == 20


def test_dos_dataset_targets_masks_and_shifts(cache):
    n = 12
    data = embedded_dataset("dos", n_structures=n)
    assert data.info == {
        "n_points": dos_data.DOS_N_POINTS,
        "extra_targets": dos_data.DOS_EXTRA_TARGETS,
        "grid_spacing": 0.05,
        "energy_min": dos_data.DOS_E_MIN,
        "broadening": dos_data.DOS_SIGMA,
    }
    dataset = AtomisticDataset.from_file(data.path, data.targets, data.extra_data)
    assert dataset.target_options["mtt::dos"]["num_subtargets"] == dos_data.DOS_N_POINTS
    frames = ase.io.read(data.path, ":")
    grid = dos_data.dos_energy_grid().numpy()
    truncated = 0
    for index, atoms in enumerate(frames):
        target = dataset.targets["mtt::dos"][index].block().values[0].numpy()
        mask = dataset.extra_data["mtt::dos_mask"][index].block().values[0].numpy()
        assert set(np.unique(mask)) <= {0.0, 1.0}
        # the full DOS on the model's common grid, from all eigenvalues
        eigenvalues = dos_data.tight_binding_eigenvalues(atoms)
        diff = grid[:, None] - eigenvalues[None, :]
        sigma = dos_data.DOS_SIGMA
        full = (np.exp(-0.5 * (diff / sigma) ** 2) / (sigma * np.sqrt(2 * np.pi))).sum(1)
        shift = atoms.info["dos_shift"]
        assert 0 <= shift <= dos_data.DOS_EXTRA_TARGETS
        window = full[shift : shift + dos_data.DOS_N_POINTS]
        # where the mask trusts it, the target is the full DOS at the structure's shift
        np.testing.assert_allclose(target * mask, window * mask, atol=1e-3 * window.max())
        if mask.min() == 0.0:
            truncated += 1
            assert atoms.info["dos_n_states"] < len(atoms)
            assert np.abs(target - window)[mask == 0].max() > 1e-3  # wrong where masked
        else:
            np.testing.assert_allclose(target, window, atol=1e-10)
    assert 0 < truncated < n
    # total DOS integrates to the number of states inside the window
    assert np.trapezoid(window, dx=0.05) == pytest.approx(len(frames[-1]), rel=1e-2)


def test_dos_through_the_datamodule(cache):
    module = AtomisticDataModule("dos", n_structures=10, batch_size=3, val_fraction=0.2)
    module.setup()
    _, targets, extra = next(iter(module.val_dataloader()))
    assert targets["mtt::dos"].block().values.shape == (2, dos_data.DOS_N_POINTS)
    assert extra["mtt::dos_mask"].block().samples == targets["mtt::dos"].block().samples


def test_unknown_embedded_dataset():
    with pytest.raises(ValueError, match=r"unknown embedded dataset 'emtt'; available: dos, emt"):
        embedded_dataset("emtt")
