"""One entry point for every dataset file: ``open_dataset(path, targets, extra_data)``.

==================  ==============================  =====================================
path                format                          dataset
==================  ==============================  =====================================
``*.zip``           metatrain ``DiskDataset``       :class:`ZipDataset` (read on access)
a directory         metatrain ``MemmapDataset``     :class:`MemmapDataset` (read on access)
anything else       whatever ``ase.io.read`` reads  :class:`AtomisticDataset` (in memory)
==================  ==============================  =====================================

Target options are the same for all of them (``quantity``, ``key``, ``unit``,
``per_atom``, ``forces``/``stress``/``virial`` as a bool, a key or a mapping, ...), and
every dataset has the same interface: items ``(system, targets, extra_data)``,
``target_options`` (resolved), ``layouts()``, ``atomic_types``, ``atom_counts()``,
``subset(indices)``.

.. code-block:: python

    dataset = open_dataset("train.zip", {"energy": {"forces": True}})
    write_dataset("train_dir/", dataset)      # the same structures as a memmap directory
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

import torch

from pl_mtt.data.dataset import AtomisticDataset
from pl_mtt.data.file_dataset import FileDataset
from pl_mtt.data.memmap_dataset import MemmapDataset, MemmapDatasetWriter
from pl_mtt.data.zip_dataset import ZipDataset, ZipDatasetWriter

__all__ = ["dataset_format", "open_dataset", "write_dataset"]

ZIP, MEMMAP, ASE = "zip", "memmap", "ase"


def dataset_format(path: str | Path) -> str:
    """``"zip"`` (a ``.zip`` file), ``"memmap"`` (a directory, or a path ending in ``/``
    that does not exist yet) or ``"ase"`` (anything else)."""
    text = str(path)
    if text.lower().endswith(".zip"):
        return ZIP
    if Path(text).is_dir() or text.endswith(("/", "\\")):
        return MEMMAP
    return ASE


def open_dataset(
    path: str | Path,
    targets: Mapping[str, Any],
    extra_data: Mapping[str, Any] | None = None,
    dtype: torch.dtype = torch.float64,
) -> AtomisticDataset | FileDataset:
    """The dataset stored at ``path``, in the format its path says (see the table above).

    Args:
        path: a ``.zip``, a directory, or a structure file for ``ase.io.read``.
        targets: target name -> options (the spec's ``training_set.targets`` form).
        extra_data: name -> options (``{read_from: file.mts}``; for a zip or a directory
            also ``{key: <field>}``, a field of the dataset itself).
        dtype: floating dtype of the items.
    """
    kind = dataset_format(path)
    if kind == ZIP:
        return ZipDataset(path, targets, extra_data, dtype)
    if kind == MEMMAP:
        return MemmapDataset(path, targets, extra_data, dtype)
    return AtomisticDataset.from_file(path, targets, extra_data, dtype=dtype)


def _items(dataset: Any) -> Iterable[tuple]:
    for index in range(len(dataset)):
        yield dataset[index]


def write_dataset(
    path: str | Path,
    dataset: Any,
    target_options: Mapping[str, Mapping[str, Any]] | None = None,
    extra_data_options: Mapping[str, Mapping[str, Any]] | None = None,
) -> int:
    """Write every item of ``dataset`` (or of an iterable of items) to ``path``: a
    ``.zip`` or a directory (metatrain's formats), one structure at a time.

    Args:
        path: ``*.zip`` or a directory (that must not exist or be empty).
        dataset: a dataset with ``target_options`` (used when ``target_options`` is not
            given), or an iterable of ``(system, targets, extra_data)`` items.
        target_options: target name -> options; their ``key`` names the zip field /
            ``.bin`` file (default: the target name), and for a directory the
            ``forces``/``stress``/``virial`` keys name the gradient files.
        extra_data_options: extra data name -> options with ``key`` (default: the name).

    Returns:
        The number of structures written.
    """
    options = dict(target_options or getattr(dataset, "target_options", None) or {})
    items = iter(_items(dataset) if hasattr(dataset, "__getitem__") else dataset)
    first = next(items, None)
    if first is None:
        raise ValueError(f"write_dataset: no structure to write to '{path}'")
    extra_options = {name: {} for name in first[2]}
    extra_options.update(extra_data_options or {})
    options = {name: options.get(name) or {} for name in first[1]}
    kind = dataset_format(path)
    if kind == ZIP:
        fields = {
            name: str((opts or {}).get("key") or name)
            for name, opts in {**options, **extra_options}.items()
        }
        writer: Any = ZipDatasetWriter(path, fields)
    elif kind == MEMMAP:
        writer = MemmapDatasetWriter(path, options, extra_options)
    else:
        raise ValueError(
            f"write_dataset: '{path}' is neither a .zip nor a directory (for extxyz use "
            f"pl_mtt.data.write_extxyz)"
        )
    with writer:
        writer.write(*first)
        for system, targets, extra_data in items:
            writer.write(system, targets, extra_data)
    return len(writer)
