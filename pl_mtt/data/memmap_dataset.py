"""metatrain's ``MemmapDataset`` directory format: read on access, and written as a stream.

Layout of the directory (raw ``.bin`` files are headerless, C order, little-endian):

======================  =======  ======================  ================================
file                    dtype    shape                   content
======================  =======  ======================  ================================
``ns.npy``              int      ``()``                  number of structures ``ns``
``na.npy``              int64    ``(ns + 1,)``           cumulative atom counts, ``na[0] = 0``
``x.bin``               float32  ``(na[-1], 3)``         positions (Å)
``a.bin``               int32    ``(na[-1],)``           atomic numbers
``c.bin`` (optional)    float32  ``(ns, 3, 3)``          cells; a zero row is not periodic
``<key>.bin``           float32  ``(ns, P)``             a per-structure target or extra data
                                 ``(na[-1], P)``         a per-atom one (``per_atom: true``)
``<forces key>.bin``    float32  ``(na[-1], 3)``         forces (default key ``forces``)
``<stress key>.bin``    float32  ``(ns, 3, 3)``          ase stress ``(1/V) dE/d(strain)``
``<virial key>.bin``    float32  ``(ns, 3, 3)``          virial (pl_mtt only: metatrain
                                                         refuses virials in this format)
======================  =======  ======================  ================================

Values are read as float32 and converted to float64 exactly (then to the dataset's
dtype), as metatrain does; the strain gradient is ``stress * |det(cell)|`` computed in
float64, ``-virial`` for a virial. Whether a ``<key>.bin`` is per structure or per atom
follows ``per_atom`` when given, else the file size (an ambiguous size is an error asking
for ``per_atom``).

Every array is read with ``os.pread`` into fresh memory, not memory-mapped: a pass over
a memory-mapped file keeps its pages in the process's resident set, so memory would grow
with the dataset.
"""

from __future__ import annotations

from array import array
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np
import torch
from metatensor.torch import TensorMap
from metatomic.torch import System

from pl_mtt.config import is_energy_like, to_plain
from pl_mtt.data.disk_options import DiskExtraOptions, DiskTargetOptions
from pl_mtt.data.file_dataset import FileDataset
from pl_mtt.data.layout import property_labels, structure_tensor_map
from pl_mtt.data.targets import gradient_source
from pl_mtt.tensormaps.batch_atoms import MAX_ATOMIC_NUMBER

__all__ = ["MemmapDataset", "MemmapDatasetWriter"]

_F32 = np.dtype("<f4")
_I32 = np.dtype("<i4")
_TYPES_CHUNK = 1 << 22  # atoms per read when listing atomic types
_SPLIT_CHUNK = 1 << 20  # atoms per read when counting elements per split


class _Column:
    """A ``<key>.bin`` of float32 rows: ``(ns | na[-1], *shape)``."""

    def __init__(self, path: Path, per_atom: bool, shape: tuple[int, ...]) -> None:
        self.path = str(path)
        self.per_atom = per_atom
        self.shape = shape
        self.row_bytes = 4 * int(np.prod(shape))


class MemmapDataset(FileDataset):
    """Structures, targets and extra data of a metatrain ``MemmapDataset`` directory.

    Args:
        path: the directory.
        targets: target name -> options, as for an extxyz file (``key`` names
            ``<key>.bin``; ``forces``/``stress``/``virial``: true, false, null (when the
            file exists), a key, or ``{key: ...}``).
        extra_data: name -> ``{key: <name of the .bin>, per_atom: ...}`` or
            ``{read_from: file.mts}`` (a separate file, held in memory).
        dtype: floating dtype of the items.
    """

    def __init__(
        self,
        path: str | Path,
        targets: Mapping[str, Any],
        extra_data: Mapping[str, Any] | None = None,
        dtype: torch.dtype = torch.float64,
    ) -> None:
        super().__init__(path, dtype)
        root = Path(path)
        self.root = root
        if not root.is_dir():
            raise ValueError(f"memmap dataset '{self.path}' is not a directory")
        self.n_structures, self.na = self._read_counts()
        self.n_atoms_total = int(self.na[-1])
        self._check_size("x.bin", self.n_atoms_total * 12, "positions: na[-1] x 3 float32")
        self._check_size("a.bin", self.n_atoms_total * 4, "atomic numbers: na[-1] int32")
        self.has_cell = (root / "c.bin").is_file()
        if self.has_cell:
            self._check_size("c.bin", self.n_structures * 36, "cells: ns x 3 x 3 float32")
        self._targets: dict[str, tuple[_Column, bool, dict[str, _Column]]] = {}
        self._extra: dict[str, _Column] = {}
        self._read_options(targets, extra_data)

    # -- the index -------------------------------------------------------------------
    def _file(self, name: str) -> Path:
        return self.root / name

    def _read_counts(self) -> tuple[int, np.ndarray]:
        arrays = {}
        for name in ("ns.npy", "na.npy"):
            file = self._file(name)
            if not file.is_file():
                raise ValueError(f"memmap dataset '{self.path}' has no '{name}'")
            try:
                arrays[name] = np.load(file, allow_pickle=False)
            except Exception as error:
                raise ValueError(
                    f"memmap dataset '{self.path}': cannot read '{name}': {error}"
                ) from error
        ns, na = arrays["ns.npy"], arrays["na.npy"]
        if ns.size != 1 or not np.issubdtype(ns.dtype, np.integer):
            raise ValueError(
                f"memmap dataset '{self.path}': 'ns.npy' must hold one integer, got "
                f"{ns.dtype} {ns.shape}"
            )
        n = int(ns.reshape(()))
        what = f"memmap dataset '{self.path}': 'na.npy'"
        if na.dtype != np.int64:
            raise ValueError(f"{what} must be int64 (as metatrain requires), got {na.dtype}")
        if na.shape != (n + 1,):
            raise ValueError(
                f"{what} has shape {na.shape}, expected ({n + 1},) for ns = {n} "
                f"(inconsistent atom counts)"
            )
        if na[0] != 0 or (np.diff(na) < 0).any():
            raise ValueError(
                f"{what} must be cumulative atom counts (starting at 0, never decreasing)"
            )
        return n, na

    def _check_size(self, name: str, expected: int, what: str) -> None:
        file = self._file(name)
        if not file.is_file():
            raise ValueError(f"memmap dataset '{self.path}' has no '{name}' ({what})")
        size = file.stat().st_size
        if size != expected:
            raise ValueError(
                f"memmap dataset '{self.path}': '{name}' has {size} bytes, expected {expected} "
                f"({what} with ns = {self.n_structures}, na[-1] = {self.n_atoms_total}): "
                f"inconsistent atom counts or a truncated file"
            )

    def _values_column(
        self, path: str, key: str, per_atom: bool | None, num_subtargets: int | None
    ) -> _Column:
        """``<key>.bin`` as ``(rows, P)``, rows per structure or per atom."""
        file = self._file(f"{key}.bin")
        if not file.is_file():
            available = sorted(p.stem for p in self.root.glob("*.bin"))
            raise ValueError(
                f"{path}: memmap dataset '{self.path}' has no '{key}.bin' (its .bin files: "
                f"{available})"
            )
        size = file.stat().st_size
        ns, na = self.n_structures, self.n_atoms_total
        if size % 4:
            raise ValueError(f"{path}: '{file}' has {size} bytes, not a float32 array")
        count = size // 4

        def fits(rows: int) -> bool:
            if rows == 0 or count % rows:
                return False
            return num_subtargets is None or count // rows == num_subtargets

        if per_atom is None:
            structure, atom = fits(ns), fits(na)
            if structure and atom and ns != na:
                raise ValueError(
                    f"{path}: the size of '{file}' ({count} float32 values) fits both "
                    f"{ns} structures and {na} atoms; give per_atom: true or false"
                )
            per_atom = atom and not structure
            if not (structure or atom):
                raise ValueError(
                    f"{path}: '{file}' has {count} float32 values, which is not a multiple of "
                    f"{ns} structures nor of {na} atoms"
                    + ("" if num_subtargets is None else f" times {num_subtargets} properties")
                )
        rows = na if per_atom else ns
        if not fits(rows):
            raise ValueError(
                f"{path}: '{file}' has {count} float32 values, expected {rows} "
                f"{'atoms' if per_atom else 'structures'} x "
                f"{num_subtargets if num_subtargets is not None else 'P'} properties"
            )
        return _Column(file, bool(per_atom), (count // rows,))

    def add_extra(self, name: str, parsed: DiskExtraOptions) -> None:
        self._extra[name] = self._values_column(
            f"extra_data.{name}", parsed.key, parsed.per_atom, parsed.num_subtargets
        )

    def add_target(self, name: str, parsed: DiskTargetOptions) -> None:
        path = f"targets.{name}"
        column = self._values_column(path, parsed.key, parsed.per_atom, parsed.num_subtargets)
        n_properties = column.shape[0]
        found = {}
        for option, (_, key) in parsed.gradients.items():
            found[option] = self._file(f"{key}.bin").is_file()
        if not parsed.energy_like or column.per_atom:
            on: dict[str, bool] = {}
        else:
            on = parsed.check_found(found, f"memmap dataset '{self.path}'")
        if any(on.values()) and n_properties != 1:
            raise ValueError(
                f"{path}: forces/stress/virial need a single-property energy, "
                f"'{parsed.key}.bin' has {n_properties} values per structure"
            )
        gradients: dict[str, _Column] = {}
        shapes = {"forces": (True, (3,)), "stress": (False, (3, 3)), "virial": (False, (3, 3))}
        for option, active in on.items():
            if not active:
                continue
            key = parsed.gradients[option][1]
            per_atom, shape = shapes[option]
            rows = self.n_atoms_total if per_atom else self.n_structures
            self._check_size(
                f"{key}.bin",
                rows * 4 * int(np.prod(shape)),
                f"{option} of target '{name}': {'na[-1]' if per_atom else 'ns'} x "
                f"{' x '.join(map(str, shape))} float32",
            )
            gradients[option] = _Column(self._file(f"{key}.bin"), per_atom, shape)
        self._targets[name] = (column, parsed.energy_like, gradients)
        self.target_options[name] = parsed.resolved(self.path, column.per_atom, n_properties, on)
        self.target_sources[name] = {
            option: (f"{parsed.gradients[option][1]}.bin", self.path)
            for option, active in on.items()
            if active
        }

    # -- reading ---------------------------------------------------------------------
    def _rows(self, column: _Column, entry: int, dtype: np.dtype = _F32) -> np.ndarray:
        if column.per_atom:
            start, count = int(self.na[entry]), int(self.na[entry + 1] - self.na[entry])
        else:
            start, count = entry, 1
        size = count * column.row_bytes
        data = self.files.read(column.path, start * column.row_bytes, size)
        if len(data) != size:
            raise ValueError(
                f"memmap dataset '{self.path}': '{Path(column.path).name}' is cut short at "
                f"structure {entry} (truncated file)"
            )
        return np.frombuffer(data, dtype=dtype).reshape(count, *column.shape)

    def n_entries(self) -> int:
        return self.n_structures

    def read_system(self, entry: int) -> System:
        """Structure ``entry`` (float64; positions and cell upcast from float32)."""
        start, stop = int(self.na[entry]), int(self.na[entry + 1])
        n = stop - start
        read = self.files.read
        positions = np.frombuffer(read(str(self._file("x.bin")), 12 * start, 12 * n), _F32)
        types = np.frombuffer(read(str(self._file("a.bin")), 4 * start, 4 * n), _I32)
        if self.has_cell:
            cell = torch.from_numpy(
                np.frombuffer(read(str(self._file("c.bin")), 36 * entry, 36), _F32).copy()
            ).reshape(3, 3)
        else:
            cell = torch.zeros(3, 3, dtype=torch.float32)
        cell = cell.to(torch.float64)
        return System(
            types=torch.from_numpy(types.copy()),
            positions=torch.from_numpy(positions.copy()).to(torch.float64).reshape(n, 3),
            cell=cell,
            pbc=(cell != 0).any(dim=1),
        )

    def read_entry(self, entry: int):
        system = self.read_system(entry)
        n_atoms = len(system)
        targets = {}
        for name, (column, energy_like, gradients) in self._targets.items():
            values = torch.from_numpy(self._rows(column, entry).copy()).to(torch.float64)
            positions_gradient = strain_gradient = None
            if "forces" in gradients:
                forces = torch.from_numpy(self._rows(gradients["forces"], entry).copy())
                positions_gradient = -forces.to(torch.float64).reshape(n_atoms, 3, 1)
            if "stress" in gradients:
                stress = torch.from_numpy(self._rows(gradients["stress"], entry).copy())
                volume = torch.abs(torch.det(system.cell))
                strain_gradient = (stress.to(torch.float64) * volume).reshape(3, 3, 1)
            elif "virial" in gradients:
                virial = torch.from_numpy(self._rows(gradients["virial"], entry).copy())
                strain_gradient = -virial.to(torch.float64).reshape(3, 3, 1)
            targets[name] = structure_tensor_map(
                values.to(self.dtype),
                property_labels(column.shape[0], energy_like),
                per_atom=column.per_atom,
                positions_gradient=None
                if positions_gradient is None
                else positions_gradient.to(self.dtype),
                strain_gradient=None if strain_gradient is None else strain_gradient.to(self.dtype),
            )
        extra = {}
        for name, column in self._extra.items():
            values = torch.from_numpy(self._rows(column, entry).copy()).to(torch.float64)
            # a mask gets its target's properties (a .bin does not store their names)
            target = self._targets.get(name.removesuffix("_mask"))
            energy_like = target is not None and name.endswith("_mask") and target[1]
            extra[name] = structure_tensor_map(
                values.to(self.dtype),
                property_labels(column.shape[0], energy_like),
                per_atom=column.per_atom,
            )
        if self.dtype != torch.float64:
            system = system.to(dtype=self.dtype)
        return system, targets, extra

    def all_atom_counts(self) -> np.ndarray:
        return np.diff(self.na)

    def split_elements(self, split):
        """Atoms and structures per atomic number and split, from ``a.bin`` read in chunks
        of whole structures (memory bounded, no structure built)."""
        stage_of = np.full(self.n_structures, -1, dtype=np.int64)
        stages = list(split)
        entries = self.entries()
        for index, stage in enumerate(stages):
            stage_of[entries[np.asarray(list(split[stage]), dtype=np.int64)]] = index
        n_types = MAX_ATOMIC_NUMBER + 1
        atoms = np.zeros(len(stages) * n_types, dtype=np.int64)
        structures = np.zeros(len(stages) * n_types, dtype=np.int64)
        path = str(self._file("a.bin"))
        first = 0
        while first < self.n_structures:
            limit = self.na[first] + _SPLIT_CHUNK
            last = int(np.searchsorted(self.na, limit, side="right")) - 1
            last = min(max(last, first + 1), self.n_structures)
            start, stop = int(self.na[first]), int(self.na[last])
            types = np.frombuffer(self.files.read(path, 4 * start, 4 * (stop - start)), _I32)
            owner = np.repeat(np.arange(first, last), np.diff(self.na[first : last + 1]))
            stage = stage_of[owner]
            keep = stage >= 0
            atoms += np.bincount(stage[keep] * n_types + types[keep], minlength=len(atoms))
            pairs = np.unique(owner[keep] * n_types + types[keep])
            pair_stage = stage_of[pairs // n_types]
            structures += np.bincount(
                pair_stage * n_types + pairs % n_types, minlength=len(structures)
            )
            first = last
        atoms, structures = atoms.reshape(-1, n_types), structures.reshape(-1, n_types)
        elements = {
            stage: {int(z): int(atoms[i, z]) for z in np.nonzero(atoms[i])[0]}
            for i, stage in enumerate(stages)
        }
        element_structures = {
            stage: {int(z): int(structures[i, z]) for z in np.nonzero(structures[i])[0]}
            for i, stage in enumerate(stages)
        }
        return elements, element_structures

    def non_periodic_count(self) -> int:
        if not self.has_cell:
            return len(self)
        cells = np.frombuffer(
            self.files.read(str(self._file("c.bin")), 0, 36 * self.n_structures), _F32
        ).reshape(-1, 3, 3)[self.entries()]
        return int((~(cells != 0).any(axis=2).all(axis=1)).sum())

    def entry_types(self, entries: np.ndarray | None) -> list[int]:
        path = str(self._file("a.bin"))
        seen: set[int] = set()
        if entries is None:  # one sequential scan in chunks
            for start in range(0, self.n_atoms_total, _TYPES_CHUNK):
                count = min(_TYPES_CHUNK, self.n_atoms_total - start)
                chunk = np.frombuffer(self.files.read(path, 4 * start, 4 * count), _I32)
                seen.update(np.unique(chunk).tolist())
            return sorted(seen)
        for entry in entries.tolist():
            start, stop = int(self.na[entry]), int(self.na[entry + 1])
            chunk = np.frombuffer(self.files.read(path, 4 * start, 4 * (stop - start)), _I32)
            seen.update(np.unique(chunk).tolist())
        return sorted(seen)


class MemmapDatasetWriter:
    """Writes a metatrain ``MemmapDataset`` directory one structure at a time (float32).

    Args:
        path: the directory (created; it must not exist or be empty, as metatrain's
            writer requires).
        targets: target name -> options (``key``, and for energies the ``forces`` /
            ``stress`` / ``virial`` keys, as for reading); only single-block scalar
            targets, per structure or per atom.
        extra_data: name -> options with ``key`` (scalar, per structure or per atom).

    Energy gradients go to ``<forces key>.bin`` (forces, ``-dE/dr``) and
    ``<stress key>.bin`` (ase stress, ``dE/d(strain) / V``, NaN without a cell), or
    ``<virial key>.bin`` when the options say ``virial``. ``ns.npy`` and ``na.npy`` are
    written by :meth:`close`.
    """

    def __init__(
        self,
        path: str | Path,
        targets: Mapping[str, Any] | None = None,
        extra_data: Mapping[str, Any] | None = None,
    ) -> None:
        self.root = Path(path)
        if self.root.exists() and (not self.root.is_dir() or any(self.root.iterdir())):
            raise ValueError(
                f"memmap dataset '{self.root}' already exists and is not an empty directory"
            )
        self.root.mkdir(parents=True, exist_ok=True)
        self._files: dict[str, Any] = {}
        self._counts = array("q", [0])
        self._keys: dict[str, dict[str, str]] = {}
        for name, options in (to_plain(targets) or {}).items():
            self._keys[name] = self._file_keys(name, options or {})
        for name, options in (to_plain(extra_data) or {}).items():
            key = str((options or {}).get("key") or name)
            self._keys[name] = {"values": key}
        used = [key for keys in self._keys.values() for key in keys.values()]
        reserved = {"x", "a", "c", "momenta", "masses"}
        if len(set(used)) != len(used) or reserved & set(used):
            raise ValueError(
                f"memmap dataset '{self.root}': file keys {used} must be distinct and not "
                f"one of {sorted(reserved)}"
            )
        self._layout: dict[str, tuple[bool, int, frozenset[str]]] = {}

    @staticmethod
    def _file_keys(name: str, options: Mapping[str, Any]) -> dict[str, str]:
        keys = {"values": str(options.get("key") or name)}
        if not is_energy_like(name, options) or options.get("per_atom"):
            return keys
        virial = bool(options.get("virial"))
        for option in ("forces", "virial" if virial else "stress"):
            keys[option] = gradient_source(name, option, options.get(option), "")[1]
        return keys

    def __enter__(self) -> MemmapDatasetWriter:
        return self

    def __exit__(self, exc_type, exc, traceback) -> None:
        self.close()

    def __len__(self) -> int:
        return len(self._counts) - 1

    def _append(self, key: str, values: np.ndarray) -> None:
        handle = self._files.get(key)
        if handle is None:
            handle = self._files[key] = open(self.root / f"{key}.bin", "wb")  # noqa: SIM115
        handle.write(np.ascontiguousarray(values).tobytes())

    def write(
        self,
        system: System,
        targets: Mapping[str, TensorMap],
        extra_data: Mapping[str, TensorMap] | None = None,
    ) -> None:
        """Append one structure with its per-structure TensorMaps (``system`` 0)."""
        entry = len(self)
        n_atoms = len(system)
        cell = system.cell.detach().cpu().to(torch.float64)
        cell = torch.where(system.pbc.cpu()[:, None], cell, torch.zeros_like(cell))
        self._append("x", system.positions.detach().cpu().numpy().astype(_F32))
        self._append("a", system.types.detach().cpu().numpy().astype(_I32))
        self._append("c", cell.numpy().astype(_F32))
        maps = {**targets, **(extra_data or {})}
        unknown = sorted(set(maps) - set(self._keys))
        missing = sorted(set(self._keys) - set(maps))
        if unknown or missing:
            raise ValueError(
                f"memmap dataset '{self.root}': structure {entry} has fields {sorted(maps)}, "
                f"the writer was built for {sorted(self._keys)}"
            )
        periodic = bool(system.pbc.all())
        volume = float(abs(torch.det(cell))) if periodic else 0.0
        for name, tensor_map in maps.items():
            self._write_map(name, tensor_map, entry, n_atoms, periodic, volume)
        self._counts.append(self._counts[-1] + n_atoms)

    def _write_map(
        self,
        name: str,
        tensor_map: TensorMap,
        entry: int,
        n_atoms: int,
        periodic: bool,
        volume: float,
    ) -> None:
        what = f"memmap dataset '{self.root}': '{name}' of structure {entry}"
        if len(tensor_map) != 1 or len(tensor_map.block_by_id(0).components) != 0:
            raise ValueError(f"{what}: only single-block scalar TensorMaps can be written")
        block = tensor_map.block_by_id(0)
        per_atom = "atom" in block.samples.names
        values = block.values.detach().cpu().to(torch.float64)
        if len(values) != (n_atoms if per_atom else 1):
            raise ValueError(f"{what}: {len(values)} rows for a structure of {n_atoms} atoms")
        gradients = frozenset(block.gradients_list())
        layout = (per_atom, values.shape[1], gradients)
        first = self._layout.setdefault(name, layout)
        if first != layout:
            raise ValueError(
                f"{what}: per_atom, properties and gradients {layout} differ from the first "
                f"structure's {first}"
            )
        keys = self._keys[name]
        if gradients - {"positions", "strain"} or (gradients and "forces" not in keys):
            raise ValueError(
                f"{what}: gradients {sorted(gradients)} cannot be written (only forces and "
                f"stress/virial of a per-structure energy-like target)"
            )
        self._append(keys["values"], values.numpy().astype(_F32))
        if "positions" in gradients:
            gradient = block.gradient("positions")
            forces = np.zeros((n_atoms, 3))
            atom = gradient.samples.column("atom").cpu().numpy()
            forces[atom] = -gradient.values.detach().cpu().double().numpy().reshape(-1, 3)
            self._append(keys["forces"], forces.astype(_F32))
        if "strain" in gradients:
            strain = block.gradient("strain").values.detach().cpu().double().numpy().reshape(3, 3)
            if "virial" in keys:
                self._append(keys["virial"], (-strain).astype(_F32))
            else:
                stress = strain / volume if periodic and volume > 0 else np.full((3, 3), np.nan)
                self._append(keys["stress"], stress.astype(_F32))

    def close(self) -> None:
        """Close the ``.bin`` files and write ``ns.npy`` and ``na.npy``."""
        for handle in self._files.values():
            handle.close()
        self._files = {}
        for key in ("x", "a", "c"):
            (self.root / f"{key}.bin").touch()
        np.save(self.root / "ns.npy", np.int64(len(self)))
        np.save(self.root / "na.npy", np.frombuffer(self._counts, dtype=np.int64).copy())
