"""Per-batch atom bookkeeping shared by the scaler, the composition baseline, the pipeline
and the metrics.

:class:`TypeTable` maps atomic types to fixed rows: the rows of the given
``atomic_types`` in that order, or atomic numbers 0..118 when types are discovered from
the data (so that state has the same shape on every rank). :class:`BatchAtoms` flattens
the systems of one batch once (types, atoms per system, first atom of each system, cell
volumes) and caches what is derived from them (type rows and per-system type counts per
:class:`TypeTable`, atom counts per dtype), so that every stage of a training step reads
the same facts instead of re-deriving them; rows of a TensorMap block are mapped to atom
types and atom counts with gathers, never a loop over atoms or types.
"""

from __future__ import annotations

from collections.abc import Callable, Hashable, Sequence

import numpy as np
import torch
from metatensor.torch import Labels
from metatomic.torch import System

from pl_mtt.tensormaps.block_ops import lazy_script

__all__ = ["MAX_ATOMIC_NUMBER", "BatchAtoms", "TypeTable"]

MAX_ATOMIC_NUMBER = 118


class TypeTable:
    """Atomic types -> row indices ``0..n_rows-1``; unknown types -> ``n_rows``.

    Args:
        atomic_types: the types, in the order of the rows; ``None`` for atomic numbers
            0..118 (types discovered from the data).
    """

    def __init__(self, atomic_types: Sequence[int] | None) -> None:
        self.discover = atomic_types is None
        if atomic_types is None:
            types = list(range(MAX_ATOMIC_NUMBER + 1))
        else:
            try:
                types = [int(t) for t in atomic_types]
            except (TypeError, ValueError):
                raise ValueError(
                    f"atomic_types: expected a list of integers, got {atomic_types!r}"
                ) from None
            if len(set(types)) != len(types):
                raise ValueError(f"atomic_types: duplicate entries in {types}")
        self.types: list[int] = types
        self.key: Hashable = (self.discover, tuple(types))  # equal tables share batch caches
        self.n_rows = len(types)
        # lookup[i] is the row of type offset + i; its first and last entries are
        # "unknown" sentinels, so clamping an out-of-range type lands on one of them
        self.offset = (min(types) - 1) if types else 0
        size = (max(types) - self.offset + 2) if types else 1
        lookup = torch.full((size,), self.n_rows, dtype=torch.long)
        for row, atomic_type in enumerate(types):
            lookup[atomic_type - self.offset] = row
        self._lookup = lookup
        self._lookups: dict[torch.device, torch.Tensor] = {lookup.device: lookup}

    @property
    def lookup(self) -> torch.Tensor:
        """``lookup[i]``: the row of type ``offset + i`` (``n_rows`` for unknown types;
        the first and last entries are always unknown)."""
        return self._lookup

    def rows(self, types: torch.Tensor, *, check: bool = False) -> torch.Tensor:
        """Row index of each entry of ``types`` (``n_rows`` for unknown types).

        With ``check=True`` unknown types raise a ``ValueError`` (this reads values on
        the host: use it in the fitting pass, not in a training step).
        """
        lookup = self._lookups.get(types.device)
        if lookup is None:
            lookup = self._lookup.to(types.device)
            self._lookups[types.device] = lookup
        shifted = (types.to(torch.long) - self.offset).clamp_(0, lookup.shape[0] - 1)
        rows = lookup.index_select(0, shifted)
        if check and bool((rows == self.n_rows).any()):
            unknown = sorted(set(types[rows == self.n_rows].tolist()))
            if self.discover:
                raise ValueError(
                    f"atomic types {unknown} are outside 0..{MAX_ATOMIC_NUMBER}: pass "
                    f"atomic_types explicitly to use such types"
                )
            raise ValueError(
                f"atomic types {unknown} found in the data are not among atomic_types {self.types}"
            )
        return rows

    def row_of(self, atomic_type: int) -> int:
        """The row of one type given as a Python int (``n_rows`` when unknown)."""
        try:
            return self.types.index(int(atomic_type))
        except ValueError:
            return self.n_rows


@lazy_script
def _flatten(systems: list[System]) -> torch.Tensor:
    """Atom types of all systems, concatenated (one TorchScript call instead of one
    attribute read per system)."""
    return torch.cat([system.types for system in systems])


@lazy_script
def _sizes(systems: list[System]) -> tuple[list[int], torch.device]:
    """The number of atoms of each system and the device of their types (read from the
    shapes: no tensor operation)."""
    sizes = [system.types.shape[0] for system in systems]
    return sizes, systems[0].types.device


@lazy_script
def _volumes(systems: list[System]) -> torch.Tensor:
    """``[n_systems]`` cell volumes ``|a . (b x c)|`` (0 without a cell)."""
    cells = torch.stack([system.cell for system in systems])
    triple = cells[:, 0] * torch.linalg.cross(cells[:, 1], cells[:, 2], dim=-1)
    return triple.sum(-1).abs()


def host_to_device(
    values: list | np.ndarray, device: torch.device, dtype: torch.dtype = torch.long
) -> torch.Tensor:
    """A tensor of host values (a list or a NumPy array) on ``device`` without waiting
    for the device (pinned staging memory and an asynchronous copy on CUDA)."""
    tensor = torch.as_tensor(values, dtype=dtype)
    if device.type == "cuda":
        return tensor.pin_memory().to(device, non_blocking=True)
    return tensor.to(device)


_NUMPY_FLOATS = {torch.float64: np.float64, torch.float32: np.float32, torch.float16: np.float16}


class BatchAtoms:
    """The atoms of one batch of systems, flattened once.

    Attributes:
        types: ``[n_atoms_total]`` atomic type of each atom (systems concatenated).
        n_atoms: ``[n_systems]`` number of atoms per system (int64).
        first_atom: ``[n_systems]`` index of each system's first atom in the flat list.

    Everything derived from these (type rows of a :class:`TypeTable`, type counts, atom
    counts in a dtype, cell volumes) is computed on first use and cached.
    """

    def __init__(self, systems: Sequence[System]) -> None:
        self.systems = list(systems)
        self.n_systems = len(self.systems)
        if self.systems:
            self.sizes, self.device = _sizes(self.systems)
        else:
            self.sizes, self.device = [], torch.device("cpu")
        self.total_atoms = int(sum(self.sizes))
        self._types: torch.Tensor | None = None
        self._n_atoms: torch.Tensor | None = None
        self._first_atom: torch.Tensor | None = None
        self._type_rows: dict[Hashable, torch.Tensor] = {}
        self._checked: set[Hashable] = set()
        self._counts: dict[Hashable, torch.Tensor] = {}
        self._n_atoms_as: dict[torch.dtype, torch.Tensor] = {}
        self._system_of_atom: torch.Tensor | None = None
        self._volumes: torch.Tensor | None = None
        self._cache: dict[Hashable, torch.Tensor] = {}

    # everything is computed on first use: a step reads only what it needs
    @property
    def types(self) -> torch.Tensor:
        """``[n_atoms_total]`` atomic type of each atom (systems concatenated)."""
        if self._types is None:
            if self.systems:
                self._types = _flatten(self.systems)
            else:
                self._types = torch.zeros(0, dtype=torch.int32)
        return self._types

    @property
    def n_atoms(self) -> torch.Tensor:
        """``[n_systems]`` number of atoms per system (int64)."""
        if self._n_atoms is None:
            self._n_atoms = host_to_device(self.sizes, self.device)
        return self._n_atoms

    @property
    def first_atom(self) -> torch.Tensor:
        """``[n_systems]`` index of each system's first atom in the flat list (int64)."""
        if self._first_atom is None:
            self._first_atom = host_to_device(self._starts(np.int64), self.device)
        return self._first_atom

    def _starts(self, dtype: type) -> np.ndarray:
        """Index of the first atom of each system in the flat list (on the host)."""
        sizes = np.asarray(self.sizes, dtype=dtype)
        return np.cumsum(sizes, dtype=dtype) - sizes

    def bag_offsets(self) -> torch.Tensor:
        """:attr:`first_atom` in the integer type of :attr:`types` (the ``offsets`` of
        ``torch.nn.functional.embedding_bag`` over the atoms)."""
        return self.cached(
            "bag offsets",
            lambda: host_to_device(
                self._starts(np.int32 if self.types.dtype == torch.int32 else np.int64),
                self.device,
                self.types.dtype,
            ),
        )

    def inverse_atom_counts(self, dtype: torch.dtype) -> torch.Tensor:
        """``[n_systems, 1]`` ``1 / n_atoms`` per system in ``dtype`` (computed on the
        host: one transfer, no device operation)."""
        return self.cached(
            ("inverse atom counts", dtype),
            lambda: host_to_device(self._inverse_sizes(dtype), self.device, dtype),
        )

    def _inverse_sizes(self, dtype: torch.dtype) -> np.ndarray:
        """``[n_systems, 1]`` ``1 / n_atoms`` on the host (``inf`` for empty systems), in
        ``dtype`` where NumPy has it (then the transfer converts nothing)."""
        sizes = np.asarray(self.sizes, dtype=np.float64).reshape(-1, 1)
        with np.errstate(divide="ignore"):
            inverse = 1.0 / sizes
        return inverse.astype(_NUMPY_FLOATS.get(dtype, np.float64))

    _last: BatchAtoms | None = None  # the batch seen last (shared by every stage of a step)

    @classmethod
    def of(cls, systems: Sequence[System]) -> BatchAtoms:
        """:class:`BatchAtoms` of ``systems``, reused when the same systems (the same
        objects, in the same order) were seen last, so that the scaler, the baseline, the
        pipeline and the metrics flatten a batch once."""
        last = cls._last
        if (
            last is not None
            and len(last.systems) == len(systems)
            and all(a is b for a, b in zip(last.systems, systems, strict=True))
        ):
            return last
        atoms = cls(systems)
        BatchAtoms._last = atoms
        return atoms

    def cached(self, key: Hashable, compute: Callable[[], torch.Tensor]) -> torch.Tensor:
        """``compute()``, computed once per batch and ``key`` (e.g. a per-structure factor
        that several stages use)."""
        value = self._cache.get(key)
        if value is None:
            value = compute()
            self._cache[key] = value
        return value

    # -- per type table --------------------------------------------------------------
    def type_rows(self, table: TypeTable, *, check: bool = False) -> torch.Tensor:
        """``[n_atoms_total]`` row of each atom's type in ``table`` (``n_rows``: unknown).

        With ``check=True`` unknown types raise a ``ValueError`` (reads values on the
        host: for the fitting pass, not for a training step).
        """
        rows = self._type_rows.get(table.key)
        if rows is None:
            rows = table.rows(self.types, check=check)
            self._type_rows[table.key] = rows
            if check:
                self._checked.add(table.key)
        elif check and table.key not in self._checked:
            table.rows(self.types, check=True)
            self._checked.add(table.key)
        return rows

    def counts(self, table: TypeTable) -> torch.Tensor:
        """``[n_systems, n_rows]`` float64 number of atoms of each type per system.

        Atoms of unknown types are not counted.
        """
        counts = self._counts.get(table.key)
        if counts is None:
            n_rows = table.n_rows
            flat = torch.zeros(
                self.n_systems * (n_rows + 1), dtype=torch.float64, device=self.device
            )
            index = self.system_of_atom() * (n_rows + 1) + self.type_rows(table)
            flat.index_add_(0, index, torch.ones_like(index, dtype=torch.float64))
            counts = flat.view(self.n_systems, n_rows + 1)[:, :n_rows]
            self._counts[table.key] = counts
        return counts

    def type_totals(self, table: TypeTable) -> torch.Tensor:
        """``[n_rows]`` float64 number of atoms of each type in the batch."""
        rows = self.type_rows(table)
        totals = torch.zeros(table.n_rows + 1, dtype=torch.float64, device=self.device)
        totals.index_add_(0, rows, torch.ones_like(rows, dtype=torch.float64))
        return totals[: table.n_rows]

    def types_of(self, samples: Labels, table: TypeTable) -> torch.Tensor:
        """``[n_rows]`` type row of each per-atom sample row."""
        return self.type_rows(table)[self.atoms_of(samples)]

    # -- per system ------------------------------------------------------------------
    def n_atoms_as(self, dtype: torch.dtype) -> torch.Tensor:
        """``[n_systems]`` number of atoms per system in ``dtype``."""
        n_atoms = self._n_atoms_as.get(dtype)
        if n_atoms is None:
            n_atoms = self.n_atoms.to(dtype)
            self._n_atoms_as[dtype] = n_atoms
        return n_atoms

    def atom_counts(self) -> torch.Tensor:
        """``[n_systems, 1]`` float64 number of atoms per system (the ``atom_counts`` of
        :func:`pl_mtt.tensormaps.block_ops.transform_map`)."""
        return self.cached("atom counts", lambda: self.n_atoms_as(torch.float64)[:, None])

    def volumes(self) -> torch.Tensor:
        """``[n_systems]`` cell volumes (0 for systems without a cell)."""
        if self._volumes is None:
            if self.systems:
                self._volumes = _volumes(self.systems)
            else:
                self._volumes = torch.zeros(0, dtype=torch.float64, device=self.device)
        return self._volumes

    def system_of_atom(self) -> torch.Tensor:
        """``[n_atoms_total]`` index of the system of each atom."""
        if self._system_of_atom is None:
            systems = torch.arange(self.n_systems, device=self.device)
            # output_size: no device-to-host read of the total on CUDA
            self._system_of_atom = torch.repeat_interleave(
                systems, self.n_atoms, output_size=self.total_atoms
            )
        return self._system_of_atom

    @staticmethod
    def systems_of(samples: Labels) -> torch.Tensor:
        """``[n_rows]`` system index (int64) of each sample row (column ``system``)."""
        return samples.column("system").to(torch.long)

    def atoms_of(self, samples: Labels) -> torch.Tensor:
        """``[n_rows]`` flat atom index of each per-atom sample row (``system``, ``atom``)."""
        values = samples.values
        return self.first_atom[values[:, 0].to(torch.long)] + values[:, 1].to(torch.long)
