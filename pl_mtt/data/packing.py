"""Packing structures into batches bounded by their number of atoms (functional core of
:class:`pl_mtt.data.AtomBatchSampler`: tensors of atom counts in, index lists out).

.. code-block:: python

    counts = torch.tensor([12, 500, 8, 64, ...])          # atoms per structure
    steps = fewest_steps(counts, max_atoms=1024, n_replicas=4)
    plan = plan_epoch(counts, steps, 4, max_atoms=1024, generator=g)
    plan[step][rank]                                       # dataset indices of a batch

The ``B = steps x n_replicas`` batches are filled in rounds, largest structures first
(longest-processing-time scheduling, vectorised): each round gives the next structures
one each to the batches whose load is within the next structure's size of the lightest
one, the largest to the lightest. All batches end within a few atoms of the mean; the
batches of one step are neighbours in load, so every rank of a step gets nearly the same
number of atoms. Structures of similar size (same quarter-octave) are visited in a
random order, so batches are mixed differently every epoch; if that order does not fit
the bound, the exact size order (whose loads do not depend on the shuffle and were
checked by :func:`fewest_steps`) is used for the epoch.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import torch

__all__ = ["as_atom_counts", "fewest_steps", "pack", "pack_share", "plan_epoch", "size_order"]


def as_atom_counts(counts: Any) -> torch.Tensor:
    """A 1-D int64 CPU tensor of atom counts (from a tensor, array or sequence)."""
    counts = torch.as_tensor(counts).reshape(-1) if not isinstance(counts, torch.Tensor) else counts
    if counts.dim() != 1 or counts.dtype.is_floating_point or counts.dtype == torch.bool:
        raise ValueError(
            f"atom counts: expected a 1-D integer tensor, got dtype {counts.dtype} and "
            f"shape {tuple(counts.shape)}"
        )
    counts = counts.to(device="cpu", dtype=torch.int64)
    if counts.numel() and int(counts.min()) < 1:
        raise ValueError(
            f"atom counts: structure {int(torch.argmin(counts))} has "
            f"{int(counts.min())} atoms; every structure needs at least one"
        )
    return counts


def size_order(counts: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
    """Indices from the largest structure to the smallest. Without ``generator``: exact
    sizes, ties in index order. With it: quarter-octave size classes (x1.19), random
    order inside a class."""
    n = counts.numel()
    if generator is None:
        return torch.argsort(counts, descending=True, stable=True)
    size_class = torch.floor(torch.log2(counts.to(torch.float64)) * 4).to(torch.int64)
    rank = torch.randperm(n, generator=generator)
    return torch.argsort(size_class * n + rank, descending=True)


def pack(
    counts: torch.Tensor, n_batches: int, order: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """Assign every structure to one of ``n_batches`` batches, visiting them in
    ``order`` (largest first). Returns (batch of each structure, atoms of each batch).

    One round per group of structures: the batches whose load is below the lightest
    load plus the size of the next structure each take one (the largest structure to the
    lightest batch). Every batch gets at least one structure when there are at least
    ``n_batches`` structures (the first round fills them all).
    """
    n = counts.numel()
    sizes = counts[order]
    loads = torch.zeros(n_batches, dtype=torch.int64)
    batch_of = torch.empty(n, dtype=torch.int64)
    start = 0
    while start < n:  # rounds: about the number of structures per batch, not per structure
        sorted_loads, lightest = torch.sort(loads, stable=True)
        limit = sorted_loads[0] + sizes[start]
        eligible = int(torch.searchsorted(sorted_loads, limit))
        stop = min(start + max(eligible, 1), n)
        group = sizes[start:stop]
        by_size = torch.argsort(group, descending=True, stable=True)
        chosen = lightest[: stop - start]
        batch_of[order[start:stop][by_size]] = chosen
        loads.index_add_(0, chosen, group[by_size])
        start = stop
    return batch_of, loads


def _fits(loads: torch.Tensor, max_atoms: int) -> bool:
    return bool(loads.max() <= max_atoms)


def fewest_steps(counts: torch.Tensor, max_atoms: int, n_replicas: int = 1) -> int:
    """The fewest steps per epoch for which :func:`pack` (exact size order) puts every
    structure in one of ``steps x n_replicas`` non-empty batches of at most
    ``max_atoms`` atoms.

    Raises:
        ValueError: a structure larger than ``max_atoms``, or too few structures for
            ``n_replicas`` non-empty batches per step.
    """
    n, total = counts.numel(), int(counts.sum())
    if n and int(counts.max()) > max_atoms:
        index = int(torch.argmax(counts))
        raise ValueError(
            f"max_atoms_per_batch={max_atoms}: structure {index} has {int(counts[index])} "
            f"atoms; raise max_atoms_per_batch to at least {int(counts.max())}"
        )
    most = n // n_replicas  # more steps would leave a batch empty
    if most == 0:
        raise ValueError(
            f"{n} structure(s) cannot give each of {n_replicas} ranks a batch without repeating one"
        )
    order = size_order(counts)
    large = int((counts * 2 > max_atoms).sum())  # no two of them share a batch
    low = max(math.ceil(total / (n_replicas * max_atoms)), math.ceil(large / n_replicas), 1)
    if low > most or not _fits(pack(counts, most * n_replicas, order)[1], max_atoms):
        raise ValueError(
            f"{n} structures ({total} atoms) do not fit in batches of at most {max_atoms} "
            f"atoms with the same number of steps on {n_replicas} ranks and no structure "
            f"repeated; raise max_atoms_per_batch"
        )
    # gallop up from the lower bound, then bisect back to the first step count that fits
    failed, step, high = low - 1, 1, low
    while not _fits(pack(counts, high * n_replicas, order)[1], max_atoms):
        failed, high, step = high, min(high + step, most), step * 2
    while high - failed > 1:
        middle = (failed + high) // 2
        if _fits(pack(counts, middle * n_replicas, order)[1], max_atoms):
            high = middle
        else:
            failed = middle
    return high


def _batches(batch_of: torch.Tensor, n_batches: int) -> list[list[int]]:
    """Index lists of the batches (indices ascending within a batch)."""
    grouped = torch.argsort(batch_of, stable=True)
    sizes = torch.bincount(batch_of, minlength=n_batches).tolist()
    return [part.tolist() for part in torch.split(grouped, sizes)]


def plan_epoch(
    counts: torch.Tensor,
    steps: int,
    n_replicas: int,
    max_atoms: int,
    min_atoms: int = 0,
    generator: torch.Generator | None = None,
) -> list[list[list[int]]]:
    """One epoch: ``plan[step][rank]`` is a list of structure indices; every structure
    appears exactly once. Batches of one step are neighbours in load; the order of the
    steps and of the ranks within a step is random (``generator``; None: sorted by
    load). ``steps`` comes from :func:`fewest_steps` (with the exact order it always
    fits)."""
    n_batches = steps * n_replicas
    order = size_order(counts, generator)
    batch_of, loads = pack(counts, n_batches, order)
    if generator is not None and not (_fits(loads, max_atoms) and bool(loads.min() >= min_atoms)):
        # the exact size order, ties shuffled: the loads checked by fewest_steps
        ties = torch.randperm(counts.numel(), generator=generator)
        order = ties[torch.argsort(counts[ties], descending=True, stable=True)]
        batch_of, loads = pack(counts, n_batches, order)
    batches = _batches(batch_of, n_batches)
    by_load = torch.argsort(loads, stable=True).reshape(steps, n_replicas)
    if generator is not None:
        by_load = by_load[torch.randperm(steps, generator=generator)]
        columns = torch.argsort(torch.rand(steps, n_replicas, generator=generator), dim=1)
        by_load = torch.gather(by_load, 1, columns)
    return [[batches[b] for b in row] for row in by_load.tolist()]


def pack_share(counts: torch.Tensor, indices: Sequence[int], max_atoms: int) -> list[list[int]]:
    """Batches of at most ``max_atoms`` atoms of the structures ``indices`` (one rank's
    share for evaluation: as few batches as fit, nothing padded or dropped)."""
    indices = torch.as_tensor(list(indices), dtype=torch.int64)
    if indices.numel() == 0:
        return []
    share = counts[indices]
    steps = fewest_steps(share, max_atoms, 1)
    plan = plan_epoch(share, steps, 1, max_atoms)
    return [indices[torch.tensor(batch)].tolist() for (batch,) in plan]
