"""Neighbour lists computed once per structure (attached by the data layer) against
pairs searched for every batch (what the reference model did before).

.. code-block:: bash

    python benchmarks/bench_neighbors.py [--quick] [--device cuda]

Both sides compute the same pair vectors (differentiable through positions and a
strain) on the same sequence of batches of embedded EMT structures:

- naive: vesin searches the pairs of every system of the batch in every step (on
  float64 numpy copies), and the pair vectors are rebuilt from the integer cell shifts;
- pl_mtt: :func:`pl_mtt.models.geometry.batch_geometry` reads the pairs from the lists
  the systems carry, attached once by the dataset
  (``AtomisticDataModule.request_neighbor_lists``), as in training.

The rest of a ``RadialMLP`` training step is the same on both sides
(``benchmarks/bench_step.py`` times a whole step).
"""

from __future__ import annotations

import itertools
import sys
import tempfile
from pathlib import Path

import numpy as np
import torch
import vesin
from metatomic.torch import System

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from harness import Case, main_for

from pl_mtt.data import AtomisticDataModule, batch_to, requested_neighbor_lists
from pl_mtt.models import RadialMLP
from pl_mtt.models.geometry import BatchGeometry, batch_geometry, geometry_from_pairs


def searched_geometry(
    systems: list[System], cutoff: float, *, positions_grad: bool, strain_grad: bool
) -> BatchGeometry:
    """The batch geometry with vesin's pair search run on every system of the batch."""
    search = vesin.NeighborList(cutoff=cutoff, full_list=True)
    centers, neighbors, shifts, pair_system, offset = [], [], [], [], 0
    for index, system in enumerate(systems):
        i, j, s = search.compute(
            system.positions.detach().cpu().double().numpy(),
            system.cell.detach().cpu().double().numpy(),
            system.pbc.cpu().numpy().tolist(),
            quantities="ijS",
        )
        centers.append(i.astype(np.int64) + offset)
        neighbors.append(j.astype(np.int64) + offset)
        shifts.append(s)
        pair_system.append(np.full(len(i), index, dtype=np.int64))
        offset += len(system)
    device = systems[0].positions.device
    pairs = tuple(
        torch.from_numpy(np.concatenate(a)).to(device)
        for a in (centers, neighbors, shifts, pair_system)
    )
    return geometry_from_pairs(
        systems, pairs, positions_grad=positions_grad, strain_grad=strain_grad
    )


def cases(device: torch.device, quick: bool) -> list[Case]:
    torch.manual_seed(0)
    model = RadialMLP().to(device)
    with tempfile.TemporaryDirectory() as cache:
        import os

        os.environ.setdefault("PL_MTT_CACHE", cache)
        data = AtomisticDataModule("emt", n_structures=16 if quick else 48, batch_size=8)
        data.setup()
        data.request_neighbor_lists(requested_neighbor_lists(model))
        batches = [batch_to(b, device) for b in data.train_dataloader()]
    options = model.neighbor_list
    naive_geometry = itertools.cycle(batches)
    our_geometry = itertools.cycle(batches)

    def geometry_naive() -> None:
        systems = next(naive_geometry)[0]
        searched_geometry(systems, options.cutoff, positions_grad=True, strain_grad=True)

    def geometry_ours() -> None:
        batch_geometry(next(our_geometry)[0], options, positions_grad=True, strain_grad=True)

    repeats, warmup = (5, 2) if quick else (40, 5)
    return [
        Case(
            "neighbour lists",
            "batch geometry, 8 EMT structures: pair search per batch vs lists attached once",
            geometry_naive,
            geometry_ours,
            repeats=repeats,
            warmup=warmup,
        ),
    ]


if __name__ == "__main__":
    main_for(cases, "neighbour lists attached once per structure")
