"""Data: structure files -> ``metatomic`` Systems + per-structure TensorMaps, batches.

- :func:`open_dataset` (one entry point: extxyz and other ase formats in memory,
  metatrain's ``DiskDataset`` zip and ``MemmapDataset`` directory read on access:
  :class:`ZipDataset`, :class:`MemmapDataset`), :func:`write_dataset` and their writers,
  ``python -m pl_mtt.data.convert`` (extxyz -> zip/directory, streaming);
- :class:`AtomisticDataset` (``from_file``), :class:`AtomisticDataModule` (Lightning);
- :func:`read_targets` (spec-form target options -> TensorMaps + resolved options),
  :func:`read_extra_data` (``.mts`` files), :func:`write_extxyz` (the inverse);
- :func:`collate` / :func:`join_structures` (batches), :func:`batch_to` (device moves),
  :class:`StridedShardSampler` (DDP shards without padding), :class:`AtomBatchSampler`
  (batches bounded by atom count, balanced across ranks; :mod:`pl_mtt.data.packing`);
- :func:`embedded_dataset` (``emt``, ``dos``: generated and cached, no download);
- :func:`requested_neighbor_lists` / :func:`attach_neighbor_lists`: the neighbour lists
  a model requests, attached to the structures once (datasets do it when asked);
- :class:`DataReport` (the start-up summary) and :class:`DataWarning` (NaN entries,
  elements absent from training, gradients found in only some structures).
"""

from pl_mtt.data.collate import batch_to, collate, join_structures
from pl_mtt.data.datamodule import AtomisticDataModule, split_indices
from pl_mtt.data.dataset import AtomisticDataset
from pl_mtt.data.embedded import EmbeddedDataset, cache_dir, embedded_dataset
from pl_mtt.data.extra_data import read_extra_data, split_by_system
from pl_mtt.data.file_dataset import FileDataset
from pl_mtt.data.indices import read_indices, write_indices
from pl_mtt.data.layout import property_labels, structure_tensor_map, zero_sample_layout
from pl_mtt.data.memmap_dataset import MemmapDataset, MemmapDatasetWriter
from pl_mtt.data.report import DataReport, DataWarning
from pl_mtt.data.sampler import (
    AtomBatchSampler,
    BatchedDataset,
    StridedShardSampler,
    atom_counts_of,
)
from pl_mtt.data.sources import dataset_format, open_dataset, write_dataset
from pl_mtt.data.systems import atoms_to_system, read_atoms, system_to_atoms
from pl_mtt.data.targets import read_targets, resolve_target_options
from pl_mtt.data.writing import write_extxyz
from pl_mtt.data.zip_dataset import ZipDataset, ZipDatasetWriter
from pl_mtt.tensormaps.neighbors import attach_neighbor_lists, requested_neighbor_lists

__all__ = [
    "AtomBatchSampler",
    "AtomisticDataModule",
    "AtomisticDataset",
    "BatchedDataset",
    "DataReport",
    "DataWarning",
    "EmbeddedDataset",
    "FileDataset",
    "MemmapDataset",
    "MemmapDatasetWriter",
    "StridedShardSampler",
    "ZipDataset",
    "ZipDatasetWriter",
    "atom_counts_of",
    "atoms_to_system",
    "attach_neighbor_lists",
    "batch_to",
    "cache_dir",
    "collate",
    "dataset_format",
    "embedded_dataset",
    "join_structures",
    "open_dataset",
    "property_labels",
    "read_atoms",
    "read_extra_data",
    "read_indices",
    "read_targets",
    "requested_neighbor_lists",
    "resolve_target_options",
    "split_by_system",
    "split_indices",
    "structure_tensor_map",
    "system_to_atoms",
    "write_dataset",
    "write_extxyz",
    "write_indices",
    "zero_sample_layout",
]
