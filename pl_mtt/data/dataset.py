"""``AtomisticDataset``: structures with their per-structure targets and extra data.

.. code-block:: python

    dataset = AtomisticDataset.from_file(
        "train.xyz",
        targets={"energy": {"quantity": "energy"}},          # forces/stress detected
        extra_data={
            "energy_mask": {"read_from": "mask.mts"},   # a TensorMap file
            "config_weight": {"key": "config_weight"},  # an info key of train.xyz
        },
    )
    dataset.target_options   # resolved options -> expand_loss_config / LossModule
    dataset.layouts()        # zero-sample TensorMaps -> Scaler(atomic_types, layouts)
    dataset.atom_counts()    # atoms per structure -> AtomBatchSampler
    dataset.request_neighbor_lists(requested_neighbor_lists(model))  # once per structure
    system, targets, extra_data = dataset[0]
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import torch
from metatensor.torch import TensorMap
from metatomic.torch import NeighborListOptions, System

from pl_mtt.config import to_plain
from pl_mtt.data.extra_data import (
    read_extra_data,
    read_extra_data_from_frames,
    reads_structure_file,
)
from pl_mtt.data.layout import zero_sample_layout
from pl_mtt.data.systems import read_atoms, systems_from_atoms
from pl_mtt.data.targets import read_targets
from pl_mtt.tensormaps.neighbors import attach_neighbor_lists

__all__ = ["AtomisticDataset"]


class AtomisticDataset(torch.utils.data.Dataset):
    """A map-style dataset of ``(system, targets, extra_data)`` items.

    Args:
        systems: the structures.
        targets: name -> one TensorMap per structure (samples ``system`` 0).
        extra_data: name -> one TensorMap per structure (e.g. ``<target>_mask``).
        target_options: name -> resolved target options (see
            :func:`pl_mtt.data.read_targets`); empty options if not given.
        neighbor_lists: neighbour lists to attach to each structure when it is first
            loaded (see :meth:`request_neighbor_lists`).
        target_sources: name -> ``{"forces"|"stress"|"virial": (key, file)}`` of the
            gradients read from files (for the start-up summary).
    """

    def __init__(
        self,
        systems: Sequence[System],
        targets: Mapping[str, Sequence[TensorMap]],
        extra_data: Mapping[str, Sequence[TensorMap]] | None = None,
        target_options: Mapping[str, Mapping[str, Any]] | None = None,
        neighbor_lists: Sequence[NeighborListOptions] = (),
        target_sources: Mapping[str, Mapping[str, tuple[str, str]]] | None = None,
    ) -> None:
        self.systems = list(systems)
        self.targets = {name: list(values) for name, values in targets.items()}
        self.extra_data = {name: list(values) for name, values in (extra_data or {}).items()}
        self.target_options = {
            name: dict((target_options or {}).get(name, {})) for name in self.targets
        }
        self.target_sources = {
            name: dict((target_sources or {}).get(name, {})) for name in self.targets
        }
        for kind, entries in (("target", self.targets), ("extra_data", self.extra_data)):
            for name, values in entries.items():
                if len(values) != len(self.systems):
                    raise ValueError(
                        f"{kind} '{name}' has {len(values)} entries for "
                        f"{len(self.systems)} structures"
                    )
        self._check_masks()
        self._atom_counts: torch.Tensor | None = None
        self.neighbor_lists: list[NeighborListOptions] = []
        self._with_lists: set[int] = set()  # structures that carry every requested list
        self.request_neighbor_lists(neighbor_lists)

    def request_neighbor_lists(self, options: Sequence[NeighborListOptions]) -> None:
        """Attach these neighbour lists (``metatomic.torch.NeighborListOptions``, e.g.
        :func:`pl_mtt.data.requested_neighbor_lists` of a model) to every structure the
        first time it is loaded: each is computed once per structure and kept for every
        later epoch (the systems handed to the model carry them). Adds to earlier
        requests; an empty list changes nothing."""
        new = [item for item in options if not any(item == have for have in self.neighbor_lists)]
        if new:
            self.neighbor_lists.extend(new)
            self._with_lists.clear()

    @classmethod
    def from_file(
        cls,
        path: str | Path,
        targets: Mapping[str, Any],
        extra_data: Mapping[str, Any] | None = None,
        dtype: torch.dtype = torch.float64,
    ) -> AtomisticDataset:
        """Read structures and targets from ``path`` (``ase.io.read``), extra data from
        ``.mts`` files (``read_from``) or from ``path`` itself (``key``: an ``info`` or
        ``arrays`` key, see :mod:`pl_mtt.data.extra_data`). Energy-like targets get
        forces/stress when the file has them."""
        frames = read_atoms(path)
        systems = systems_from_atoms(frames, dtype)
        sources: dict[str, dict[str, tuple[str, str]]] = {}
        tensors, resolved = read_targets(path, targets, frames=frames, dtype=dtype, sources=sources)
        extra = {
            name: read_extra_data_from_frames(name, options, frames, str(path), dtype)
            if reads_structure_file(options, path)
            else read_extra_data(name, options, len(systems), dtype)
            for name, options in (to_plain(extra_data) or {}).items()
        }
        return cls(systems, tensors, extra, resolved, target_sources=sources)

    def __len__(self) -> int:
        return len(self.systems)

    def __getitem__(self, index: int) -> tuple[System, dict[str, TensorMap], dict[str, TensorMap]]:
        system = self.systems[index]
        if self.neighbor_lists and index not in self._with_lists:
            attach_neighbor_lists([system], self.neighbor_lists)
            self._with_lists.add(index)
        return (
            system,
            {name: values[index] for name, values in self.targets.items()},
            {name: values[index] for name, values in self.extra_data.items()},
        )

    def subset(self, indices: Sequence[int]) -> AtomisticDataset:
        """A new dataset with the structures at ``indices`` (same options and neighbour
        lists; the system objects are shared, so are lists already attached)."""
        indices = [int(i) for i in indices]
        return AtomisticDataset(
            [self.systems[i] for i in indices],
            {name: [values[i] for i in indices] for name, values in self.targets.items()},
            {name: [values[i] for i in indices] for name, values in self.extra_data.items()},
            self.target_options,
            self.neighbor_lists,
            target_sources=self.target_sources,
        )

    def atom_counts(self) -> torch.Tensor:
        """Atoms per structure (1-D int64), read without building batches: the interface
        samplers bounded by atom count use (:class:`pl_mtt.data.AtomBatchSampler`)."""
        if self._atom_counts is None:
            self._atom_counts = torch.tensor([len(s) for s in self.systems], dtype=torch.int64)
        return self._atom_counts

    @property
    def atomic_types(self) -> list[int]:
        """Sorted atomic numbers present in the dataset."""
        if not self.systems:
            return []
        return torch.unique(torch.cat([s.types for s in self.systems])).tolist()

    def layouts(self) -> dict[str, TensorMap]:
        """Zero-sample TensorMaps describing each target (gradient blocks included)."""
        if not self.systems:
            raise ValueError("an empty dataset has no target layouts")
        return {name: zero_sample_layout(values[0]) for name, values in self.targets.items()}

    def _check_masks(self) -> None:
        """A ``<target>_mask`` must fit its target (sample names, row and property counts)."""
        for name, masks in self.extra_data.items():
            target = name.removesuffix("_mask")
            if not name.endswith("_mask") or target not in self.targets:
                continue
            for index, (mask, value) in enumerate(zip(masks, self.targets[target], strict=True)):
                if len(mask) != len(value):
                    raise ValueError(
                        f"extra_data '{name}': {len(mask)} blocks, target '{target}' has "
                        f"{len(value)}"
                    )
                for mask_block, block in zip(mask.blocks(), value.blocks(), strict=True):
                    if (
                        mask_block.samples.names != block.samples.names
                        or mask_block.values.shape != block.values.shape
                        or not torch.equal(mask_block.samples.values, block.samples.values)
                    ):
                        raise ValueError(
                            f"extra_data '{name}' of structure {index} does not fit target "
                            f"'{target}': samples {mask_block.samples.names} and shape "
                            f"{tuple(mask_block.values.shape)} vs {block.samples.names} and "
                            f"{tuple(block.values.shape)} (or different sample values)"
                        )
