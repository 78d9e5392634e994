"""Per-batch atom bookkeeping shared by the scaler, the composition baseline and the pipeline.

:class:`TypeTable` maps atomic types to fixed rows: the rows of the given
``atomic_types`` in that order, or atomic numbers 0..118 when types are discovered from
the data (so that state has the same shape on every rank). :class:`BatchAtoms` flattens
the systems of one batch once (types, atoms per system, first atom of each system) and
maps the rows of a TensorMap block to atom types and atom counts with gathers, never a
loop over atoms or types.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from metatensor.torch import Labels
from metatomic.torch import System

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
        self.n_rows = len(types)
        self.offset = min(types) if types else 0
        size = (max(types) - self.offset + 2) if types else 1
        lookup = torch.full((size,), self.n_rows, dtype=torch.long)
        for row, atomic_type in enumerate(types):
            lookup[atomic_type - self.offset] = row
        self._lookup = lookup  # last entry: "unknown" for out-of-range types
        self._lookups: dict[torch.device, torch.Tensor] = {lookup.device: lookup}

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
        out_of_range = (types.to(torch.long) < self.offset) | (
            types.to(torch.long) - self.offset >= lookup.shape[0] - 1
        )
        rows = torch.where(out_of_range, self.n_rows, lookup[shifted])
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


class BatchAtoms:
    """The atoms of one batch of systems, flattened once.

    Attributes:
        type_rows: ``[n_atoms_total]`` row of each atom's type in the :class:`TypeTable`.
        n_atoms: ``[n_systems]`` number of atoms per system (int64).
        first_atom: ``[n_systems]`` index of each system's first atom in the flat list.
    """

    def __init__(
        self, systems: Sequence[System], table: TypeTable, *, check_types: bool = False
    ) -> None:
        self.table = table
        self.systems = list(systems)
        types = [system.types for system in self.systems]
        sizes = [t.shape[0] for t in types]
        self.n_systems = len(sizes)
        self.types = torch.cat(types) if types else torch.zeros(0, dtype=torch.int32)
        device = self.types.device
        self.device = device
        self.total_atoms = int(sum(sizes))
        self.n_atoms = torch.tensor(sizes, dtype=torch.long, device=device)
        self.first_atom = torch.cumsum(self.n_atoms, 0) - self.n_atoms
        self.type_rows = table.rows(self.types, check=check_types)
        self.checked = check_types
        self._counts: torch.Tensor | None = None
        self._system_of_atom: torch.Tensor | None = None

    _last: BatchAtoms | None = None  # the batch seen last (shared by scaler and baseline)

    @classmethod
    def of(
        cls, systems: Sequence[System], table: TypeTable, *, check_types: bool = False
    ) -> BatchAtoms:
        """:class:`BatchAtoms` of ``systems``, reused when the same systems (the same
        objects, in the same order, with the same atomic types) were seen last, so that
        the scaler, the baseline and the pipeline flatten a batch once."""
        last = cls._last
        if (
            last is not None
            and (last.table is table or last.table.types == table.types)
            and len(last.systems) == len(systems)
            and all(a is b for a, b in zip(last.systems, systems, strict=True))
        ):
            if check_types and not last.checked:
                table.rows(last.types, check=True)
                last.checked = True
            return last
        atoms = cls(systems, table, check_types=check_types)
        BatchAtoms._last = atoms
        return atoms

    def system_of_atom(self) -> torch.Tensor:
        """``[n_atoms_total]`` index of the system of each atom."""
        if self._system_of_atom is None:
            starts = torch.zeros(self.total_atoms + 1, dtype=torch.long, device=self.device)
            starts.index_add_(0, self.first_atom, torch.ones_like(self.first_atom))
            self._system_of_atom = torch.cumsum(starts[: self.total_atoms], 0) - 1
        return self._system_of_atom

    def counts(self) -> torch.Tensor:
        """``[n_systems, n_rows]`` float64 number of atoms of each type per system.

        Atoms of unknown types are not counted.
        """
        if self._counts is None:
            n_rows = self.table.n_rows
            flat = torch.zeros(
                self.n_systems * (n_rows + 1), dtype=torch.float64, device=self.device
            )
            index = self.system_of_atom() * (n_rows + 1) + self.type_rows
            flat.index_add_(0, index, torch.ones_like(index, dtype=torch.float64))
            self._counts = flat.view(self.n_systems, n_rows + 1)[:, :n_rows]
        return self._counts

    def type_totals(self) -> torch.Tensor:
        """``[n_rows]`` float64 number of atoms of each type in the batch."""
        totals = torch.zeros(self.table.n_rows + 1, dtype=torch.float64, device=self.device)
        totals.index_add_(0, self.type_rows, torch.ones_like(self.type_rows, dtype=torch.float64))
        return totals[: self.table.n_rows]

    @staticmethod
    def systems_of(samples: Labels) -> torch.Tensor:
        """``[n_rows]`` system index (int64) of each sample row (column ``system``)."""
        return samples.column("system").to(torch.long)

    def atoms_of(self, samples: Labels) -> torch.Tensor:
        """``[n_rows]`` flat atom index of each per-atom sample row (``system``, ``atom``)."""
        values = samples.values
        return self.first_atom[values[:, 0].to(torch.long)] + values[:, 1].to(torch.long)

    def types_of(self, samples: Labels) -> torch.Tensor:
        """``[n_rows]`` type row of each per-atom sample row."""
        return self.type_rows[self.atoms_of(samples)]
