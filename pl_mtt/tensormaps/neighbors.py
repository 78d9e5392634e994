"""Neighbour lists that a model requests, computed once per structure.

A model declares the lists it reads with ``requested_neighbor_lists()`` (metatomic's
convention, on the model or any submodule: ``metatomic.torch.NeighborListOptions``) and
reads them with ``system.get_neighbor_list(options)``. Simulation engines attach them
before calling an exported model; in training the data layer does:
:class:`pl_mtt.data.AtomisticDataset` attaches the requested lists to each structure the
first time it is loaded and keeps them, so they are computed once per structure and
reused in every epoch (:meth:`pl_mtt.data.AtomisticDataModule.setup` asks the
LightningModule for its requests). Models call :func:`attach_neighbor_lists` themselves
for systems that come without them (it adds nothing to a system that has them).

.. code-block:: python

    options = requested_neighbor_lists(model)      # [] for a model that requests none
    attach_neighbor_lists(systems, options)         # adds the missing ones, in place

Lists are computed by ``vesin`` (full or half, strict: no pair beyond the cutoff), on the
CPU; positions are in Å, as everywhere in the data layer.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from metatensor.torch import TensorBlock
from metatomic.torch import NeighborListOptions, System
from vesin.metatomic import NeighborList

__all__ = ["attach_neighbor_lists", "requested_neighbor_lists"]

LENGTH_UNIT = "angstrom"


def requested_neighbor_lists(module: torch.nn.Module) -> list[NeighborListOptions]:
    """The neighbour lists ``module`` and its submodules request, without duplicates.

    Every submodule with a ``requested_neighbor_lists()`` method is asked (as metatomic's
    ``AtomisticModel`` does); equal options (same cutoff, full/half, strict) are kept once.
    """
    found: list[NeighborListOptions] = []
    for submodule in module.modules():
        method = getattr(submodule, "requested_neighbor_lists", None)
        if method is None or not callable(method):
            continue
        for options in method():
            if not any(options == known for known in found):
                found.append(options)
    return found


def attach_neighbor_lists(
    systems: Sequence[System], options: Sequence[NeighborListOptions]
) -> None:
    """Compute the lists of ``options`` that a system lacks and add them to it (in place).

    Systems that already carry a list keep it (nothing is recomputed).
    """
    if not options:
        return
    calculators: list[NeighborList] | None = None
    for system in systems:
        known = system.known_neighbor_lists()
        for index, wanted in enumerate(options):
            if any(wanted == have for have in known):
                continue
            if calculators is None:  # built on first need: most calls find every list
                calculators = [NeighborList(item, LENGTH_UNIT, skin=0.0) for item in options]
            system.add_neighbor_list(wanted, _compute(calculators[index], system))


def _compute(calculator: NeighborList, system: System) -> TensorBlock:
    """One list for ``system``, in its dtype and on its device; vesin registers the pair
    vectors with autograd when the positions or the cell require grad."""
    if system.positions.device.type == "cpu":
        return calculator.compute(system)
    return calculator.compute(system.to(device="cpu")).to(device=system.positions.device)
