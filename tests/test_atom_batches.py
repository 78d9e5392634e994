"""Batches bounded by atom count: sampler properties on random size distributions, the
DataModule options, the scale fit on such a loader, and the batching benchmark."""

from __future__ import annotations

import importlib
import re
import sys

import pytest
import torch

from pl_mtt.data import AtomBatchSampler, AtomisticDataModule, BatchedDataset, collate
from pl_mtt.data.packing import fewest_steps, pack, size_order
from pl_mtt.training.callbacks import ScalerCallback
from tests.conftest import REPO_ROOT


def random_counts(seed: int) -> tuple[torch.Tensor, int, int]:
    """Atom counts from one of several distributions, a bound and a world size."""
    g = torch.Generator().manual_seed(seed)
    n = int(torch.randint(8, 400, (1,), generator=g))
    kind = seed % 4
    if kind == 0:  # heavy tail
        u = torch.rand(n, generator=g, dtype=torch.float64)
        counts = (3 * (1 - u) ** (-1 / 1.2)).clamp(1, 300).long()
    elif kind == 1:  # uniform
        counts = torch.randint(1, 120, (n,), generator=g)
    elif kind == 2:  # two sizes (bulk and slab cells)
        counts = torch.where(torch.rand(n, generator=g) < 0.3, 96, 8)
    else:  # all equal
        counts = torch.full((n,), int(torch.randint(1, 50, (1,), generator=g)))
    largest = int(counts.max())
    max_atoms = largest + int(torch.randint(0, 4 * largest, (1,), generator=g))
    world = int(torch.randint(1, 5, (1,), generator=g))
    return counts, max_atoms, min(world, n)


def epoch_plans(counts, max_atoms, world, seed=0, epochs=(0, 1)):
    samplers = [
        AtomBatchSampler(counts, max_atoms, num_replicas=world, rank=r, seed=seed)
        for r in range(world)
    ]
    plans = []
    for epoch in epochs:
        for sampler in samplers:
            sampler.set_epoch(epoch)
        plans.append([list(sampler) for sampler in samplers])
    return samplers, plans


@pytest.mark.parametrize("seed", range(24))
def test_sampler_properties_on_random_sizes(seed):
    counts, max_atoms, world = random_counts(seed)
    samplers, plans = epoch_plans(counts, max_atoms, world)
    for ranks in plans:
        # equal steps on every rank, as many as len() says
        assert len({len(batches) for batches in ranks}) == 1
        assert all(len(batches) == len(s) for batches, s in zip(ranks, samplers, strict=True))
        # every structure exactly once over all ranks
        used = sorted(i for batches in ranks for batch in batches for i in batch)
        assert used == list(range(len(counts)))
        loads = torch.tensor([[int(counts[b].sum()) for b in batches] for batches in ranks])
        assert int(loads.max()) <= max_atoms  # the bound
        assert all(batch for batches in ranks for batch in batches)  # no empty batch
        # balance: no rank carries more than one largest structure above a step's mean
        mean = loads.double().mean(0)
        assert bool((loads.max(0).values <= mean + int(counts.max())).all())
    # as few steps as the packing allows: one step less does not fit
    steps = len(samplers[0])
    assert steps >= -(-int(counts.sum()) // (world * max_atoms))
    if steps > 1:
        fewer = pack(counts, (steps - 1) * world, size_order(counts))[1]
        assert int(fewer.max()) > max_atoms


def test_balance_of_a_large_heavy_tailed_set():
    counts = random_counts(0)[0]
    counts = torch.cat([counts] * 10)  # ~ a few thousand structures
    _, plans = epoch_plans(counts, 1024, 4)
    for ranks in plans:
        loads = torch.tensor([[int(counts[b].sum()) for b in batches] for batches in ranks])
        ratio = loads.max(0).values / loads.double().mean(0)
        assert float(ratio.max()) <= 1.02


def test_order_is_reproducible_and_changes_every_epoch():
    counts = random_counts(5)[0]
    _, (first, second) = epoch_plans(counts, 300, 2, seed=3)
    _, (again, _) = epoch_plans(counts, 300, 2, seed=3)
    _, (other_seed, _) = epoch_plans(counts, 300, 2, seed=4)
    assert first == again
    assert first != second
    assert first != other_seed
    # without shuffling every epoch is the same
    sampler = AtomBatchSampler(counts, 300, num_replicas=2, rank=0, shuffle=False)
    plan = list(sampler)
    sampler.set_epoch(7)
    assert list(sampler) == plan


def test_evaluation_shards_are_never_padded():
    counts = torch.tensor([5, 9, 3, 30, 2, 2, 7, 11, 4])
    samplers = [
        AtomBatchSampler(counts, 32, num_replicas=4, rank=r, shuffle=False, equal_steps=False)
        for r in range(4)
    ]
    for rank, sampler in enumerate(samplers):
        batches = list(sampler)
        assert sorted(i for b in batches for i in b) == list(range(rank, 9, 4))  # strided
        assert all(int(counts[b].sum()) <= 32 for b in batches)
        assert len(sampler) == len(batches)
    assert [len(s) for s in samplers] == [1, 1, 1, 2]  # rank 3: 30 + 4 atoms; ranks differ


@pytest.mark.parametrize(
    ("counts", "kwargs", "message"),
    [
        (
            [4, 9, 40, 3],
            {"max_atoms": 32},
            "max_atoms_per_batch=32: structure 2 has 40 atoms; raise max_atoms_per_batch to at "
            "least 40",
        ),
        (
            [4, 9, 3],
            {"max_atoms": 32, "num_replicas": 4, "rank": 0},
            "3 structure(s) cannot give each of 4 ranks a batch without repeating one",
        ),
        (
            [30, 30, 30],
            {"max_atoms": 32, "num_replicas": 2, "rank": 0},
            "3 structures (90 atoms) do not fit in batches of at most 32 atoms with the same "
            "number of steps on 2 ranks and no structure repeated; raise max_atoms_per_batch",
        ),
        (
            [4, 4, 4, 4],
            {"max_atoms": 16, "min_atoms": 10, "num_replicas": 2, "rank": 0},
            "min_atoms_per_batch=10 cannot be met: 4 structures (16 atoms) in 1 steps on 2 "
            "rank(s) give batches of down to 8 atoms",
        ),
        ([4, 0], {"max_atoms": 16}, "atom counts: structure 1 has 0 atoms"),
        ([4.0, 2.0], {"max_atoms": 16}, "atom counts: expected a 1-D integer tensor"),
        ([4, 2], {"max_atoms": 0}, "max_atoms: expected an integer >= 1, got 0"),
        ([4, 2], {"max_atoms": 8, "min_atoms": 9}, "min_atoms (9) is larger than max_atoms (8)"),
        ([4, 2], {"max_atoms": 8, "num_replicas": 2, "rank": 2}, "rank must be in 0..1, got 2"),
    ],
)
def test_sampler_errors(counts, kwargs, message):
    with pytest.raises(ValueError, match=f"^{re.escape(message)}"):
        AtomBatchSampler(torch.tensor(counts), **kwargs)


def test_min_atoms_is_respected():
    counts = random_counts(1)[0]
    _, plans = epoch_plans(counts, 400, 2)
    smallest = min(int(counts[b].sum()) for ranks in plans for r in ranks for b in r)
    sampler = AtomBatchSampler(counts, 400, smallest, num_replicas=2, rank=1)
    for epoch in range(3):
        sampler.set_epoch(epoch)
        assert all(int(counts[b].sum()) >= smallest for b in sampler)


def test_datasets_without_atom_counts_are_refused():
    with pytest.raises(ValueError, match=r"^list has no atom_counts\(\) method"):
        AtomBatchSampler(BatchedDataset([1, 2, 3]), 8)


# --- the DataModule ---------------------------------------------------------------------
@pytest.fixture
def cache(monkeypatch, tmp_path):
    monkeypatch.setenv("PL_MTT_CACHE", str(tmp_path / "cache"))


def test_datamodule_packs_every_loader_by_atoms(cache):
    data = AtomisticDataModule("emt", n_structures=30, max_atoms_per_batch=60)
    data.setup()
    counts = data.train_dataset.atom_counts()
    assert counts.tolist() == [len(s) for s in data.train_dataset.systems]
    train = data.train_dataloader()
    seen = []
    for systems, targets, _ in train:
        assert sum(len(s) for s in systems) <= 60
        assert targets["energy"].block().values.shape[0] == len(systems)
        seen.extend(targets["energy"].block().values.reshape(-1).tolist())
    assert len(seen) == len(data.train_dataset) == len(set(seen))
    assert len(train) == fewest_steps(counts, 60)
    for loader, dataset in (
        (data.val_dataloader(), data.val_dataset),
        (data.test_dataloader(), data.test_dataset),
    ):
        sizes = [sum(len(s) for s in batch[0]) for batch in loader]
        assert max(sizes) <= 60
        assert sum(len(batch[0]) for batch in loader) == len(dataset)


def test_datamodule_errors(cache):
    data = AtomisticDataModule("emt", n_structures=30, max_atoms_per_batch=20)
    with pytest.raises(ValueError, match=r"^data.max_atoms_per_batch=20: structure \d+ of '.*emt"):
        data.setup()
    with pytest.raises(ValueError, match=r"^data.min_atoms_per_batch=5 needs data.max_atoms"):
        AtomisticDataModule("emt", min_atoms_per_batch=5)
    with pytest.raises(ValueError, match=r"^data.min_atoms_per_batch \(50\) is larger than"):
        AtomisticDataModule("emt", max_atoms_per_batch=40, min_atoms_per_batch=50)
    with pytest.raises(ValueError, match=r"^data.max_atoms_per_batch: expected an integer >= 1"):
        AtomisticDataModule("emt", max_atoms_per_batch=0)


def test_scale_fit_on_atom_batches_equals_the_plain_fit(cache):
    """The ScalerCallback reads an atom-bounded loader as it is (each structure once)."""
    import lightning.pytorch as pl

    from tests.scripts.schedule_training import task

    fitted = []
    for max_atoms in (None, 60):
        data = AtomisticDataModule("emt", n_structures=30, max_atoms_per_batch=max_atoms)
        data.setup()
        module = task(data.target_options)
        trainer = pl.Trainer(
            max_steps=1,
            logger=False,
            enable_checkpointing=False,
            enable_progress_bar=False,
            enable_model_summary=False,
            inference_mode=False,
            limit_val_batches=0,
            callbacks=[callback := ScalerCallback()],
        )
        trainer.fit(module, data)
        assert callback.summary.local_structures == len(data.train_dataset)
        fitted.append(module.scaler.state_dict())
    for key, value in fitted[0].items():
        if isinstance(value, torch.Tensor) and value.is_floating_point():
            torch.testing.assert_close(fitted[1][key], value, rtol=1e-12, atol=1e-12)


def test_loader_collates_batches_of_indices(cache):
    data = AtomisticDataModule("emt", n_structures=12)
    data.setup()
    batch = collate(BatchedDataset(data.train_dataset)[[0, 3]])
    assert len(batch[0]) == 2


# --- the benchmark ----------------------------------------------------------------------
def test_benchmark_imbalance_at_its_quick_size(monkeypatch):
    monkeypatch.syspath_prepend(str(REPO_ROOT / "benchmarks"))
    bench = importlib.import_module("bench_batching")
    try:
        rows = bench.imbalance(quick=True)
    finally:
        sys.modules.pop("bench_batching", None)
    fixed, ours = rows["fixed batch_size"], rows["pl_mtt max_atoms_per_batch"]
    assert ours["mean"] <= ours["worst"] <= 1.10
    assert fixed["mean"] > ours["mean"]
    assert ours["largest batch"] <= bench.MAX_ATOMS
