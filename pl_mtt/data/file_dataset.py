"""``FileDataset``: the shared part of datasets whose structures stay on disk.

Items are read on access (in ``DataLoader`` workers when there are any); what is kept in
memory is an index of a few integers per structure (offsets, atom counts), never the
structures. A :meth:`FileDataset.subset` is a view sharing that index. Files are read
with ``os.pread`` through descriptors opened lazily in each process, so a dataset can be
sent to forked or spawned workers.
"""

from __future__ import annotations

import contextlib
import copy
import os
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from metatensor.torch import TensorMap
from metatomic.torch import NeighborListOptions, System

from pl_mtt.config import to_plain
from pl_mtt.data.disk_options import (
    DiskExtraOptions,
    DiskTargetOptions,
    parse_extra_options,
    parse_target_options,
)
from pl_mtt.data.extra_data import read_extra_data
from pl_mtt.data.layout import zero_sample_layout
from pl_mtt.tensormaps.neighbors import attach_neighbor_lists

__all__ = ["FileDataset", "OpenFiles"]

Item = tuple[System, dict[str, TensorMap], dict[str, TensorMap]]


class OpenFiles:
    """File descriptors opened on first use in each process (``pread``: no shared file
    position, so forked workers may share them; pickling drops them)."""

    def __init__(self) -> None:
        self._fds: dict[str, int] = {}
        self._pid = os.getpid()

    def fd(self, path: str) -> int:
        if self._pid != os.getpid():  # a forked worker: open its own
            self._fds, self._pid = {}, os.getpid()
        fd = self._fds.get(path)
        if fd is None:
            fd = self._fds[path] = os.open(path, os.O_RDONLY)
        return fd

    def read(self, path: str, offset: int, size: int) -> bytes:
        """``size`` bytes at ``offset`` of ``path`` (fewer at the end of the file)."""
        return os.pread(self.fd(path), size, offset)

    def close(self) -> None:
        if self._pid == os.getpid():
            for fd in self._fds.values():
                os.close(fd)
        self._fds = {}

    def __getstate__(self) -> dict[str, Any]:
        return {}

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.__init__()

    def __del__(self) -> None:
        with contextlib.suppress(OSError):
            self.close()


class FileDataset(torch.utils.data.Dataset):
    """A map-style dataset of ``(system, targets, extra_data)`` items read from a file.

    Subclasses index their file, call :meth:`_read_options` (which fills
    ``target_options``, resolved as :func:`pl_mtt.data.read_targets` returns them,
    through :meth:`add_target` and :meth:`add_extra`) and implement :meth:`n_entries`,
    :meth:`read_entry`, :meth:`all_atom_counts` and :meth:`entry_types`.
    """

    def __init__(self, path: str | Path, dtype: torch.dtype) -> None:
        self.path = str(path)
        self.dtype = dtype
        self.files = OpenFiles()
        self.target_options: dict[str, dict[str, Any]] = {}
        # name -> {"forces"|"stress"|"virial": (key, file)}: what the start-up summary shows
        self.target_sources: dict[str, dict[str, tuple[str, str]]] = {}
        self.neighbor_lists: list[NeighborListOptions] = []
        self._entries: np.ndarray | None = None  # None: every entry, in file order
        self._external: dict[str, list[TensorMap]] = {}  # extra data from .mts files
        self._atomic_types: list[int] | None = None

    def _read_options(
        self, targets: Mapping[str, Any], extra_data: Mapping[str, Any] | None
    ) -> None:
        """Resolve every target and extra-data entry against the file."""
        for name, options in (to_plain(targets) or {}).items():
            self.add_target(name, parse_target_options(name, options, self.path))
        for name, options in (to_plain(extra_data) or {}).items():
            parsed = parse_extra_options(name, options, self.path)
            if parsed.external:
                self._external[name] = read_extra_data(
                    name, parsed.options, self.n_entries(), self.dtype
                )
            else:
                self.add_extra(name, parsed)

    # -- what a format implements ----------------------------------------------------
    def add_target(self, name: str, options: DiskTargetOptions) -> None:
        """Resolve one target against the file (fills ``target_options[name]``)."""
        raise NotImplementedError

    def add_extra(self, name: str, options: DiskExtraOptions) -> None:
        """Resolve one extra-data field stored in the file."""
        raise NotImplementedError

    def n_entries(self) -> int:
        """Number of structures in the file."""
        raise NotImplementedError

    def read_entry(self, entry: int) -> Item:
        """Structure ``entry`` of the file, with its targets and extra data."""
        raise NotImplementedError

    def all_atom_counts(self) -> np.ndarray:
        """Atoms per structure of the whole file (int64), without reading structures."""
        raise NotImplementedError

    def entry_types(self, entries: np.ndarray | None) -> list[int]:
        """Sorted atomic types of the given entries (``None``: all)."""
        raise NotImplementedError

    # -- the dataset -----------------------------------------------------------------
    def __len__(self) -> int:
        return self.n_entries() if self._entries is None else len(self._entries)

    def entry(self, index: int) -> int:
        """The file entry of item ``index``."""
        length = len(self)
        if not -length <= index < length:
            raise IndexError(f"index {index} out of range for a dataset of {length} structures")
        index = index % length
        return index if self._entries is None else int(self._entries[index])

    def __getitem__(self, index: int) -> Item:
        entry = self.entry(int(index))
        system, targets, extra = self.read_entry(entry)
        for name, values in self._external.items():
            extra[name] = values[entry]
        if self.neighbor_lists:  # nothing stays in memory: computed at every read
            attach_neighbor_lists([system], self.neighbor_lists)
        return system, targets, extra

    def request_neighbor_lists(self, options: Sequence[NeighborListOptions]) -> None:
        """Attach these neighbour lists to every structure when it is read (as
        :meth:`pl_mtt.data.AtomisticDataset.request_neighbor_lists`, but computed at every
        read: the structures are not kept). Adds to earlier requests."""
        for item in options:
            if not any(item == have for have in self.neighbor_lists):
                self.neighbor_lists.append(item)

    def subset(self, indices: Sequence[int] | np.ndarray) -> FileDataset:
        """A view of the structures at ``indices`` (sharing the file index)."""
        indices = np.asarray(indices, dtype=np.int64).reshape(-1)
        length = len(self)
        if len(indices) and (indices.min() < 0 or indices.max() >= length):
            raise IndexError(f"subset indices must be in 0..{length - 1}")
        view = copy.copy(self)
        view._entries = indices if self._entries is None else self._entries[indices]
        view._atomic_types = None
        view.neighbor_lists = list(self.neighbor_lists)
        return view

    def atom_counts(self) -> torch.Tensor:
        """Atoms per structure of this dataset (1-D int64), from the file's index without
        reading structures (what :class:`pl_mtt.data.AtomBatchSampler` uses)."""
        counts = self.all_atom_counts()
        return torch.from_numpy(counts if self._entries is None else counts[self._entries])

    def entries(self) -> np.ndarray:
        """The file entries of this dataset's items, in order."""
        return np.arange(self.n_entries()) if self._entries is None else self._entries

    def split_elements(
        self, split: Mapping[str, Sequence[int]]
    ) -> tuple[dict[str, dict[int, int]], dict[str, dict[int, int]]] | None:
        """Per split (indices into this dataset): atoms and structures per atomic number,
        for the start-up summary; None when counting would read every structure."""
        return None

    def non_periodic_count(self) -> int | None:
        """Structures without a fully periodic cell; None when unknown without a pass."""
        return None

    @property
    def atomic_types(self) -> list[int]:
        """Sorted atomic numbers present in this dataset (computed once, by reading the
        types of every structure: cheap for a memmap directory, a pass over the
        ``system.mta`` members for a zip)."""
        if self._atomic_types is None:
            self._atomic_types = self.entry_types(self._entries)
        return self._atomic_types

    def layouts(self) -> dict[str, TensorMap]:
        """Zero-sample TensorMaps describing each target (from the first structure)."""
        if len(self) == 0:
            raise ValueError(f"'{self.path}': an empty dataset has no target layouts")
        _, targets, _ = self[0]
        return {name: zero_sample_layout(value) for name, value in targets.items()}
