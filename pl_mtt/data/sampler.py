"""Distributed samplers that never pad: strided shards (evaluation, scale fits) and
batches bounded by atom count, balanced across ranks (training with
``max_atoms_per_batch``).

torch's ``DistributedSampler`` pads every rank to the same length by repeating samples,
so metrics over a validation set counted some structures twice. ``StridedShardSampler``
gives rank ``r`` of ``W`` the (optionally shuffled) indices ``r, r+W, r+2W, ...`` and
nothing else: the union over ranks is the dataset, each structure once. It subclasses
``DistributedSampler`` so that Lightning keeps it instead of wrapping it in a padding one.

Ranks can get different numbers of batches: use it where no per-step collective runs
(metrics that sync at epoch end, a scale-fit pass), not for DDP training steps.

:class:`AtomBatchSampler` yields whole batches of at most ``max_atoms`` atoms: for
training, the same number of steps on every rank with nearly equal atoms per step and
every structure once per epoch (:mod:`pl_mtt.data.packing`); for evaluation, strided
shards packed by atoms. Datasets give their atom counts through ``atom_counts()``.
"""

from __future__ import annotations

from collections.abc import Iterator, Sized
from typing import Any

import torch
import torch.distributed as dist

from pl_mtt.data.packing import (
    as_atom_counts,
    fewest_steps,
    pack,
    pack_share,
    plan_epoch,
    size_order,
)

__all__ = ["AtomBatchSampler", "BatchedDataset", "StridedShardSampler", "atom_counts_of"]


class StridedShardSampler(torch.utils.data.DistributedSampler):
    """This rank's strided share of ``dataset``, never padded.

    Args:
        dataset: anything with ``len``.
        num_replicas: world size (default: from ``torch.distributed``, else 1).
        rank: this rank (default: from ``torch.distributed``, else 0).
        shuffle: permute the indices (seeded by ``seed + epoch``) before striding.
        seed: the shuffle seed, identical on every rank.
    """

    each_sample_once = True
    """Every structure appears once over all ranks (no padding)."""

    def __init__(
        self,
        dataset: Sized,
        num_replicas: int | None = None,
        rank: int | None = None,
        shuffle: bool = False,
        seed: int = 0,
    ) -> None:
        num_replicas, rank = _world(num_replicas, rank)
        super().__init__(dataset, num_replicas=num_replicas, rank=rank, shuffle=shuffle, seed=seed)
        self.num_samples = len(range(rank, len(dataset), num_replicas))
        self.total_size = len(dataset)

    def __iter__(self) -> Iterator[int]:
        n = len(self.dataset)
        if self.shuffle:
            generator = torch.Generator()
            generator.manual_seed(self.seed + self.epoch)
            order = torch.randperm(n, generator=generator)
        else:
            order = torch.arange(n)
        return iter(order[self.rank :: self.num_replicas].tolist())

    def __len__(self) -> int:
        return self.num_samples


def atom_counts_of(dataset: Any) -> torch.Tensor:
    """Atoms per structure of ``dataset``, without loading the structures: its
    ``atom_counts()`` (a 1-D integer tensor or array, one entry per item; the interface
    every pl_mtt dataset implements), through ``torch.utils.data.Subset``s too."""
    if isinstance(dataset, torch.utils.data.Subset):
        return atom_counts_of(dataset.dataset)[torch.as_tensor(list(dataset.indices))]
    method = getattr(dataset, "atom_counts", None)
    if not callable(method):
        raise ValueError(
            f"{type(dataset).__name__} has no atom_counts() method: batches bounded by "
            f"atoms need the number of atoms of every structure (implement atom_counts() "
            f"returning a 1-D integer tensor, or pass the counts)"
        )
    return as_atom_counts(method())


class AtomBatchSampler(torch.utils.data.DistributedSampler):
    """Batches of dataset indices bounded by their number of atoms, balanced across ranks.

    Training (``equal_steps=True``): every rank gets the same number of steps per epoch
    (the fewest that fit), the batches of one step carry nearly the same number of atoms
    on every rank, and every structure is used exactly once per epoch over all ranks
    (none dropped, none repeated). The plan is reproducible from ``seed`` and changes
    with :meth:`set_epoch` (Lightning calls it). Evaluation (``equal_steps=False``):
    rank ``r`` of ``W`` packs the structures ``r, r+W, ...`` (like
    :class:`StridedShardSampler`, never padded); ranks may get different step counts.

    It yields lists of indices: use it as the ``sampler`` of a DataLoader with
    ``batch_size=None`` over a dataset that returns a batch for a list of indices (see
    :class:`pl_mtt.data.BatchedDataset`). It subclasses ``DistributedSampler``, so
    Lightning keeps it as it is. Lightning draws the first batch of a fit before it calls
    :meth:`set_epoch`: when resuming, set the epoch to be run when making the loader
    (:class:`pl_mtt.data.AtomisticDataModule` does).

    .. code-block:: python

        sampler = AtomBatchSampler(dataset, max_atoms=2000)   # dataset.atom_counts()
        loader = DataLoader(BatchedDataset(dataset), sampler=sampler, batch_size=None,
                            collate_fn=collate)

    Args:
        atom_counts: atoms per structure (1-D integers), or a dataset with
            ``atom_counts()``.
        max_atoms: the most atoms in a batch (metatrain's ``max_atoms_per_batch``); a
            larger structure is an error.
        min_atoms: the fewest atoms in a training batch (metatrain's
            ``min_atoms_per_batch``); checked when the sampler is made (an error if the
            balanced batches cannot reach it). Nothing is dropped to meet it.
        num_replicas, rank: world size and rank (default: from ``torch.distributed``).
        shuffle: a new plan every epoch (else the same, sorted by load).
        seed: the shuffle seed, identical on every rank.
        equal_steps: the training behaviour (see above).
    """

    each_sample_once = True
    """Every structure appears once over all ranks (no padding): one pass over the
    loader on every rank sees the dataset once (the scale fit relies on this)."""

    def __init__(
        self,
        atom_counts: Any,
        max_atoms: int,
        min_atoms: int = 0,
        num_replicas: int | None = None,
        rank: int | None = None,
        shuffle: bool = True,
        seed: int = 0,
        equal_steps: bool = True,
    ) -> None:
        dataset_like = hasattr(atom_counts, "atom_counts") or isinstance(
            atom_counts, torch.utils.data.Dataset
        )
        counts = atom_counts_of(atom_counts) if dataset_like else as_atom_counts(atom_counts)
        num_replicas, rank = _world(num_replicas, rank)
        for name, value, least in (("max_atoms", max_atoms, 1), ("min_atoms", min_atoms, 0)):
            if isinstance(value, bool) or not isinstance(value, int) or value < least:
                raise ValueError(f"{name}: expected an integer >= {least}, got {value!r}")
        if min_atoms > max_atoms:
            raise ValueError(f"min_atoms ({min_atoms}) is larger than max_atoms ({max_atoms})")
        super().__init__(counts, num_replicas=num_replicas, rank=rank, shuffle=shuffle, seed=seed)
        self.counts = counts
        self.max_atoms = max_atoms
        self.min_atoms = min_atoms
        self.equal_steps = equal_steps
        self._plan: tuple[int, list[list[int]]] | None = None  # (epoch, this rank's batches)
        if equal_steps:
            self.steps = fewest_steps(counts, max_atoms, num_replicas) if len(counts) else 0
            if min_atoms and self.steps:  # the balanced batches (exact size order) reach it
                loads = pack(counts, self.steps * num_replicas, size_order(counts))[1]
                smallest = int(loads.min())
                if smallest < min_atoms:
                    raise ValueError(
                        f"min_atoms_per_batch={min_atoms} cannot be met: {len(counts)} "
                        f"structures ({int(counts.sum())} atoms) in {self.steps} steps on "
                        f"{num_replicas} rank(s) give batches of down to {smallest} atoms "
                        f"(max_atoms_per_batch={max_atoms}); lower min_atoms_per_batch"
                    )
        else:
            share = range(rank, len(counts), num_replicas)
            self._plan = (-1, pack_share(counts, share, max_atoms))
            self.steps = len(self._plan[1])

    def _batches(self) -> list[list[int]]:
        if not self.equal_steps:
            return self._plan[1]
        if not self.steps:  # no structures
            return []
        if self._plan is None or self._plan[0] != self.epoch:
            generator = None
            if self.shuffle:
                generator = torch.Generator().manual_seed(self.seed + self.epoch)
            plan = plan_epoch(
                self.counts,
                self.steps,
                self.num_replicas,
                self.max_atoms,
                self.min_atoms,
                generator,
            )
            self._plan = (self.epoch, [step[self.rank] for step in plan])
        return self._plan[1]

    def __iter__(self) -> Iterator[list[int]]:
        return iter(self._batches())

    def __len__(self) -> int:
        return self.steps


class BatchedDataset(torch.utils.data.Dataset):
    """``dataset`` indexed by lists of indices: ``batched[[3, 7]] == [dataset[3],
    dataset[7]]`` (for a DataLoader whose sampler yields whole batches)."""

    def __init__(self, dataset: Any) -> None:
        self.dataset = dataset

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, indices: list[int]) -> list[Any]:
        return [self.dataset[index] for index in indices]

    def atom_counts(self) -> torch.Tensor:
        return atom_counts_of(self.dataset)


def _world(num_replicas: int | None, rank: int | None) -> tuple[int, int]:
    initialized = dist.is_available() and dist.is_initialized()
    if num_replicas is None:
        num_replicas = dist.get_world_size() if initialized else 1
    if rank is None:
        rank = dist.get_rank() if initialized else 0
    if not 0 <= rank < num_replicas:
        raise ValueError(f"rank must be in 0..{num_replicas - 1}, got {rank}")
    return num_replicas, rank
