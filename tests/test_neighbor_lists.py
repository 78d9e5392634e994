"""Neighbour lists a model requests: computed once per structure by the data layer and
reused in every epoch, read by the reference model from the systems."""

from __future__ import annotations

import warnings

import ase.build
import numpy as np
import pytest
import torch
from ase.neighborlist import neighbor_list
from metatomic.torch import NeighborListOptions

import pl_mtt.tensormaps.neighbors as neighbors_module
from pl_mtt import AtomisticTask, ScalerCallback
from pl_mtt.data import (
    AtomisticDataModule,
    atoms_to_system,
    attach_neighbor_lists,
    batch_to,
    collate,
    requested_neighbor_lists,
)
from pl_mtt.models import RadialMLP
from tests.conftest import quiet_trainer

CUTOFF = 4.0


def _options(cutoff: float = CUTOFF, full: bool = True) -> NeighborListOptions:
    return NeighborListOptions(cutoff=cutoff, full_list=full, strict=True)


class _Requests(torch.nn.Module):
    def __init__(self, options: list[NeighborListOptions]) -> None:
        super().__init__()
        self.options = options

    def requested_neighbor_lists(self) -> list[NeighborListOptions]:
        return self.options


class _Counting:
    """Wraps the list computation of the data layer and counts its calls per system size."""

    def __init__(self, monkeypatch: pytest.MonkeyPatch) -> None:
        self.calls = 0
        original = neighbors_module._compute

        def counted(calculator, system):
            self.calls += 1
            return original(calculator, system)

        monkeypatch.setattr(neighbors_module, "_compute", counted)


def test_requested_lists_of_submodules_without_duplicates():
    inner = RadialMLP(cutoff=CUTOFF, n_radial=4, type_dim=2, hidden=[4])
    other = _Requests([_options(CUTOFF), _options(3.0, full=False)])  # first equals inner's
    container = torch.nn.ModuleDict({"a": inner, "b": other, "c": torch.nn.Linear(1, 1)})
    found = requested_neighbor_lists(container)
    assert [(o.cutoff, o.full_list) for o in found] == [(CUTOFF, True), (3.0, False)]
    assert requested_neighbor_lists(torch.nn.Linear(2, 2)) == []


def test_attached_lists_match_ase_and_are_not_recomputed(monkeypatch):
    counter = _Counting(monkeypatch)
    slab = ase.build.fcc111("Cu", (2, 2, 3), vacuum=4.0)  # mixed periodicity: T T F
    slab.rattle(0.05, seed=1)
    system = atoms_to_system(slab)
    full, half = _options(), _options(3.0, full=False)
    attach_neighbor_lists([system], [full, half])
    attach_neighbor_lists([system], [full, half])
    assert counter.calls == 2  # one per list, none the second time
    for options, cutoff, factor in ((full, CUTOFF, 1), (half, 3.0, 2)):
        pairs = system.get_neighbor_list(options)
        distances = np.sort(torch.linalg.vector_norm(pairs.values[:, :, 0], dim=1).numpy())
        reference = np.sort(neighbor_list("d", slab, cutoff))
        assert len(distances) * factor == len(reference)
        np.testing.assert_allclose(np.repeat(distances, factor), reference, atol=1e-12)


@pytest.mark.parametrize("requests", ["radial_mlp", "none"])
def test_the_loader_hands_out_the_requested_lists(monkeypatch, requests):
    """Attached when a structure is first loaded, kept for the next epochs; a model that
    requests nothing gets systems without lists."""
    counter = _Counting(monkeypatch)
    data = AtomisticDataModule(
        "emt", n_structures=6, batch_size=3, val_fraction=0.0, test_fraction=0.0
    )
    model = RadialMLP(cutoff=CUTOFF) if requests == "radial_mlp" else torch.nn.Linear(1, 1)
    data.request_neighbor_lists(requested_neighbor_lists(model))
    for _epoch in range(2):
        for systems, _, _ in data.train_dataloader():
            for system in systems:
                known = system.known_neighbor_lists()
                assert known == ([_options()] if requests == "radial_mlp" else [])
    assert counter.calls == (6 if requests == "radial_mlp" else 0)


def test_training_computes_each_structure_list_once(monkeypatch, tmp_path):
    """Two epochs with validation, the scale fit pass included: one list per structure."""
    counter = _Counting(monkeypatch)
    data = AtomisticDataModule(
        "emt", n_structures=12, batch_size=4, val_fraction=0.25, test_fraction=0.0
    )
    data.setup()
    model = RadialMLP(cutoff=CUTOFF, n_radial=4, type_dim=2, hidden=[8])
    task = AtomisticTask(model, "mse", data.target_options)
    trainer = quiet_trainer(max_epochs=2, callbacks=[ScalerCallback()], default_root_dir=tmp_path)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        trainer.fit(task, data)
    assert data.neighbor_lists == [model.neighbor_list]  # asked by setup()
    n_structures = len(data.train_dataset) + len(data.val_dataset)
    assert counter.calls == n_structures
    for dataset in (data.train_dataset, data.val_dataset):
        for system in dataset.systems:
            assert model.neighbor_list in system.known_neighbor_lists()


def test_batch_to_keeps_systems_on_their_device():
    data = AtomisticDataModule(
        "emt", n_structures=4, batch_size=2, val_fraction=0.0, test_fraction=0.0
    )
    data.setup()
    batch = collate([data.train_dataset[i] for i in range(2)])
    moved = batch_to(batch, "cpu")
    assert all(a is b for a, b in zip(moved[0], batch[0], strict=True))
    cast = batch_to(batch, "cpu", torch.float32)
    assert cast[0][0].positions.dtype == torch.float32
    assert cast[1]["energy"].block().values.dtype == torch.float32
