"""metatrain's ``DiskDataset`` zip format: read on access, and written as a stream.

Layout of the zip (as metatrain writes and reads it):

- ``<i>/system.mta`` for every structure ``i = 0..N-1`` (plain decimal, no padding): the
  bytes of ``metatomic.torch.save`` of the system (float64);
- ``<i>/<key>.mts`` per target or extra-data field: a ``.npy`` file holding the
  ``uint8`` array of a metatensor buffer (``metatensor.torch.save_buffer``) of that
  structure's TensorMap, its ``system`` sample column equal to ``i``; forces and stress
  are the ``positions`` (samples ``sample, atom``) and ``strain`` gradients of the
  energy block;
- ``metadata/atom_counts.npy``: the number of atoms of every structure (int64).

Members are stored uncompressed. Reading (:class:`ZipDataset`) parses the central
directory once into arrays of offsets and sizes (a few dozen bytes per structure, never
one Python object per member), then reads each member with one ``pread``: items come
back in pl_mtt's per-structure layout (``system`` 0, ``positions`` gradient samples
``sample, system, atom``). :class:`ZipDatasetWriter` writes the format one structure at
a time.

.. code-block:: python

    dataset = ZipDataset("train.zip", {"energy": {"forces": True, "stress": True}})
    system, targets, extra_data = dataset[0]
    dataset.atom_counts()      # from metadata/atom_counts.npy, no structure read
"""

from __future__ import annotations

import io
import warnings
from array import array
from collections.abc import Mapping
from functools import lru_cache
from pathlib import Path
from typing import Any, Optional

import metatensor.torch as mts
import metatomic.torch as mta
import numpy as np
import torch
from metatensor.torch import Labels, TensorBlock, TensorMap
from metatomic.torch import System

from pl_mtt.data.disk_options import DiskExtraOptions, DiskTargetOptions
from pl_mtt.data.file_dataset import FileDataset, OpenFiles
from pl_mtt.data.layout import item_labels, shared_item_labels
from pl_mtt.data.zip_archive import ZipWriter, central_directory, read_member
from pl_mtt.tensormaps.block_ops import lazy_script

__all__ = ["ZipDataset", "ZipDatasetWriter", "ZipIndex"]

ATOM_COUNTS = "metadata/atom_counts.npy"
SYSTEM_FIELD = "system"
_NPY_MAGIC = b"\x93NUMPY"
_ZIP_MAGIC = b"PK\x03\x04"


def _entry_and_field(name: str) -> tuple[int, str] | None:
    """``"12/energy.mts"`` -> ``(12, "energy")``; ``"3/system.mta"`` -> ``(3, "system")``."""
    head, slash, tail = name.partition("/")
    if not slash or "/" in tail or not head.isdigit() or (head != "0" and head[0] == "0"):
        return None
    if tail == "system.mta":
        return int(head), SYSTEM_FIELD
    if tail.endswith(".mts") and len(tail) > 4 and tail != "system.mts":
        return int(head), tail[:-4]
    return None


def _member_name(entry: int, field: str) -> str:
    """``(3, "system")`` -> ``"3/system.mta"``; ``(12, "energy")`` -> ``"12/energy.mts"``."""
    return f"{entry}/system.mta" if field == SYSTEM_FIELD else f"{entry}/{field}.mts"


class ZipIndex:
    """Where every member of a dataset zip is: arrays ``[n_entries, n_fields]`` of
    local-header offsets, sizes, CRCs and compression methods, read once.

    Raises:
        ValueError: naming the file and the member or entry, for a missing or truncated
            file, a zip without ``<i>/system.mta`` members, entries that are not
            ``0..N-1``, an entry missing a field the others have, duplicates, or an
            ``atom_counts.npy`` that does not fit.
    """

    def __init__(self, path: str | Path, files: OpenFiles | None = None) -> None:
        self.path = str(path)
        self.files = files or OpenFiles()
        if not Path(self.path).is_file():
            raise ValueError(f"dataset zip '{self.path}' does not exist")
        size = Path(self.path).stat().st_size
        self.fields: list[str] = []
        field_ids: dict[str, int] = {}
        entries, fields = array("q"), array("H")
        offsets, sizes, crcs, methods = array("q"), array("q"), array("L"), array("B")
        ignored: list[str] = []
        atom_counts_member = None
        for member in central_directory(self._read_at, size, f"dataset zip '{self.path}'"):
            parsed = _entry_and_field(member.name)
            if parsed is None:
                if member.name == ATOM_COUNTS:
                    atom_counts_member = member
                elif not member.name.endswith("/"):
                    ignored.append(member.name)
                continue
            entry, field = parsed
            field_id = field_ids.get(field)
            if field_id is None:
                field_id = field_ids[field] = len(self.fields)
                self.fields.append(field)
            entries.append(entry)
            fields.append(field_id)
            offsets.append(member.header_offset)
            sizes.append(member.compressed_size)
            crcs.append(member.crc)
            methods.append(member.method)
        if SYSTEM_FIELD not in field_ids:
            found = f" (found e.g. {ignored[:3]})" if ignored else " (it is empty)"
            raise ValueError(
                f"'{self.path}' is not a metatrain DiskDataset zip: no '<i>/system.mta' "
                f"members{found}"
            )
        if ignored:
            warnings.warn(
                f"dataset zip '{self.path}': ignoring {len(ignored)} member(s) that are not "
                f"'<i>/system.mta' or '<i>/<field>.mts', e.g. {ignored[:3]}",
                stacklevel=3,
            )
        entry_array = np.frombuffer(entries, dtype=np.int64)
        field_array = np.frombuffer(fields, dtype=np.uint16).astype(np.int64)
        systems = entry_array[field_array == field_ids[SYSTEM_FIELD]]
        self.n_entries = int(entry_array.max()) + 1
        if self.n_entries > len(systems):  # before sizing arrays by the largest entry
            present = np.zeros(len(systems) + 1, dtype=bool)
            present[systems[systems <= len(systems)]] = True
            missing = int(np.argmin(present))
            raise ValueError(
                f"dataset zip '{self.path}': entry {missing} has no member "
                f"'{missing}/system.mta' (entries must be 0..N-1, each with a system)"
            )
        shape = (self.n_entries, len(self.fields))
        count = np.zeros(shape, dtype=np.int64)
        np.add.at(count, (entry_array, field_array), 1)
        self._check_dense(count)
        self.offsets = np.empty(shape, dtype=np.int64)
        self.sizes = np.empty(shape, dtype=np.int64)
        self.crcs = np.empty(shape, dtype=np.uint32)
        self.methods = np.empty(shape, dtype=np.uint8)
        where = (entry_array, field_array)
        self.offsets[where] = np.frombuffer(offsets, dtype=np.int64)
        self.sizes[where] = np.frombuffer(sizes, dtype=np.int64)
        self.crcs[where] = np.frombuffer(crcs, dtype=crcs.typecode).astype(np.uint32)
        self.methods[where] = np.frombuffer(methods, dtype=np.uint8)
        self.field_ids = field_ids
        self.atom_counts = (
            None if atom_counts_member is None else self._atom_counts(atom_counts_member)
        )

    def _check_dense(self, count: np.ndarray) -> None:
        if (count == 1).all():
            return
        duplicate = np.argwhere(count > 1)
        if len(duplicate):
            entry, field = duplicate[0]
            raise ValueError(
                f"dataset zip '{self.path}': member '{self.member_name(int(entry), int(field))}' "
                f"appears {int(count[entry, field])} times"
            )
        missing = np.argwhere(count == 0)
        entry, field = (int(v) for v in missing[0])
        if count[entry].sum() == 0:
            raise ValueError(
                f"dataset zip '{self.path}': entry {entry} is missing (entries must be "
                f"0..{self.n_entries - 1}, every one with '<i>/system.mta')"
            )
        raise ValueError(
            f"dataset zip '{self.path}': entry {entry} has no member "
            f"'{self.member_name(entry, field)}' (every entry must have the same fields: "
            f"{self.fields})"
        )

    def _read_at(self, offset: int, count: int) -> bytes:
        return self.files.read(self.path, offset, count)

    def member_name(self, entry: int, field: int) -> str:
        return _member_name(entry, self.fields[field])

    def _atom_counts(self, member) -> np.ndarray:
        data = read_member(
            self._read_at,
            member.name,
            member.header_offset,
            member.compressed_size,
            member.crc,
            member.method,
            f"dataset zip '{self.path}'",
        )
        what = f"dataset zip '{self.path}': member '{ATOM_COUNTS}'"
        try:
            counts = np.load(io.BytesIO(data), allow_pickle=False)
        except Exception as error:
            raise ValueError(f"{what} is not a .npy array: {error}") from error
        if counts.ndim != 1 or not np.issubdtype(counts.dtype, np.integer):
            raise ValueError(
                f"{what}: expected a 1-D integer array, got {counts.dtype} {counts.shape}"
            )
        if len(counts) != self.n_entries:
            raise ValueError(
                f"{what} has {len(counts)} atom counts for {self.n_entries} entries "
                f"(inconsistent atom counts)"
            )
        if len(counts) and counts.min() < 0:
            raise ValueError(f"{what}: negative atom counts")
        return counts.astype(np.int64)

    def read(self, entry: int, field: str) -> bytes:
        """The bytes of member ``<entry>/<field>`` (CRC checked)."""
        column = self.field_ids[field]
        return read_member(
            self._read_at,
            self.member_name(entry, column),
            int(self.offsets[entry, column]),
            int(self.sizes[entry, column]),
            int(self.crcs[entry, column]),
            int(self.methods[entry, column]),
            f"dataset zip '{self.path}'",
        )


def _metatensor_buffer(data: bytes, what: str) -> torch.Tensor:
    """The metatensor buffer inside an ``.mts`` member (``.npy``-wrapped, or raw)."""
    if data[:6] == _NPY_MAGIC:
        if data[6] == 1:
            header_length, start = int.from_bytes(data[8:10], "little"), 10
        else:
            header_length, start = int.from_bytes(data[8:12], "little"), 12
        header = data[start : start + header_length]
        if b"u1'" not in header:
            raise ValueError(
                f"{what}: expected a .npy array of uint8 (a metatensor buffer), got header "
                f"{header.decode(errors='replace').strip()}"
            )
        start += header_length
    elif data[:4] == _ZIP_MAGIC:
        start = 0
    else:
        raise ValueError(f"{what}: not a metatensor buffer (.npy of uint8 or a raw .mts)")
    return torch.frombuffer(bytearray(data[start:]), dtype=torch.uint8)


def _load_tensor_map(data: bytes, what: str) -> TensorMap:
    buffer = _metatensor_buffer(data, what)
    try:
        return mts.load_buffer(buffer)
    except Exception as error:
        raise ValueError(f"{what}: could not load the TensorMap: {error}") from error


def _with_system(labels: Labels, system: int) -> Labels:
    """``labels`` with their ``system`` column (if any) set to ``system``."""
    names = labels.names
    if "system" not in names:
        return labels
    values = labels.values.clone()
    values[:, names.index("system")] = system
    return Labels(names, values, assume_unique=True)


def _to_structure_layout(
    tensor_map: TensorMap, keep: set[str] | None, n_atoms: int, what: str
) -> TensorMap:
    """Stored layout -> pl_mtt's per-structure layout: ``system`` 0 everywhere,
    ``positions`` gradient samples ``[sample, system, atom]``; gradients not in ``keep``
    (``None``: all kept) are left out. Checks rows against ``n_atoms``."""
    blocks = []
    for block in tensor_map.blocks():
        names = block.samples.names
        if names == ["system", "atom"] and len(block.samples) != n_atoms:
            raise ValueError(
                f"{what} has {len(block.samples)} per-atom rows for a structure of {n_atoms} "
                f"atoms (inconsistent atom counts)"
            )
        new = TensorBlock(
            block.values,
            _with_system(block.samples, 0),
            block.components,
            block.properties,
        )
        for name in block.gradients_list():
            if keep is not None and name not in keep:
                continue
            gradient = block.gradient(name)
            samples = gradient.samples
            if name == "positions":
                if len(samples) != n_atoms * len(block.samples) and names == ["system"]:
                    raise ValueError(
                        f"{what} has {len(samples)} positions-gradient rows for a structure "
                        f"of {n_atoms} atoms (inconsistent atom counts)"
                    )
                if samples.names == ["sample", "atom"]:
                    values = samples.values
                    zeros = torch.zeros_like(values[:, :1])
                    samples = Labels(
                        ["sample", "system", "atom"],
                        torch.cat([values[:, :1], zeros, values[:, 1:]], dim=1),
                        assume_unique=True,
                    )
            new.add_gradient(
                name,
                TensorBlock(
                    gradient.values,
                    _with_system(samples, 0),
                    gradient.components,
                    gradient.properties,
                ),
            )
        blocks.append(new)
    return TensorMap(tensor_map.keys, blocks)


def _to_stored_layout(tensor_map: TensorMap, entry: int) -> TensorMap:
    """pl_mtt's per-structure layout -> the zip's: ``system`` = ``entry``, ``positions``
    gradient samples ``[sample, atom]`` (what metatrain's DiskDataset expects)."""
    blocks = []
    for block in tensor_map.blocks():
        new = TensorBlock(
            block.values.detach().to(device="cpu", dtype=torch.float64),
            _with_system(block.samples, entry),
            block.components,
            block.properties,
        )
        for name, gradient in block.gradients():
            samples = gradient.samples
            if name == "positions" and samples.names == ["sample", "system", "atom"]:
                samples = Labels(["sample", "atom"], samples.values[:, [0, 2]], assume_unique=True)
            new.add_gradient(
                name,
                TensorBlock(
                    gradient.values.detach().to(device="cpu", dtype=torch.float64),
                    _with_system(samples, entry),
                    gradient.components,
                    gradient.properties,
                ),
            )
        blocks.append(new)
    return TensorMap(tensor_map.keys, blocks)


@lru_cache(maxsize=256)
def _labels(names: tuple[str, ...], values: tuple[tuple[int, ...], ...]) -> Labels:
    """Labels built once per process from plain values."""
    return Labels(list(names), torch.tensor(values, dtype=torch.int32).reshape(len(values), -1))


@lazy_script
def _energy_item(
    buffer: torch.Tensor,
    n_atoms: int,
    positions: bool,
    strain: bool,
    properties: Labels,
    positions_samples: Labels,
    shared: list[Labels],
) -> Optional[TensorMap]:  # noqa: UP045 (TorchScript)
    """A single-property energy member as an item (``shared`` from
    :func:`pl_mtt.data.layout.shared_item_labels`), or None when this member is not in
    the usual layout (then the generic relayout handles or rejects it)."""
    stored = mts.load_buffer(buffer)
    if stored.keys.values.shape[0] != 1:
        return None
    block = stored.block_by_id(0)
    values = block.values
    if values.shape != [1, 1]:
        return None
    new = TensorBlock(values, shared[5], [], properties)
    present = block.gradients_list()
    if positions:
        if "positions" not in present:
            return None
        gradient = block.gradient("positions")
        atoms = gradient.samples.column("atom")
        if gradient.values.shape[0] != n_atoms or not torch.equal(
            atoms, torch.arange(n_atoms, dtype=atoms.dtype)
        ):
            return None
        new.add_gradient(
            "positions", TensorBlock(gradient.values, positions_samples, [shared[2]], properties)
        )
    if strain:
        if "strain" not in present:
            return None
        gradient = block.gradient("strain")
        new.add_gradient(
            "strain", TensorBlock(gradient.values, shared[1], [shared[3], shared[4]], properties)
        )
    return TensorMap(shared[0], [new])


class ZipDataset(FileDataset):
    """Structures, targets and extra data of a metatrain ``DiskDataset`` zip.

    Args:
        path: the ``.zip`` file.
        targets: target name -> options, as for an extxyz file (``key`` names the
            ``<key>.mts`` member, default the target name; ``forces``/``stress``/
            ``virial``: true (must be stored), false (left out) or null (when stored)).
        extra_data: name -> ``{key: <field>}`` (a member of the zip, default the name) or
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
        self.index = ZipIndex(self.path, self.files)
        # name -> (field, gradients kept (None: all), properties of a simple energy)
        self._fields: dict[str, tuple[str, set[str] | None, tuple | None]] = {}
        self._extra_fields: dict[str, str] = {}
        self._read_options(targets, extra_data)

    # -- options ---------------------------------------------------------------------
    def _check_field(self, key: str, path: str) -> None:
        if key == SYSTEM_FIELD or key not in self.index.field_ids:
            fields = [f for f in self.index.fields if f != SYSTEM_FIELD]
            raise ValueError(
                f"{path}: dataset zip '{self.path}' has no field '{key}' (no member "
                f"'0/{key}.mts'); its fields: {fields}"
            )

    def _check_stored(
        self, path: str, parsed: DiskTargetOptions | DiskExtraOptions
    ) -> tuple[TensorMap, bool]:
        """Entry 0 of field ``parsed.key``, and whether it is per atom (checked against
        the ``per_atom`` and ``num_subtargets`` given)."""
        self._check_field(parsed.key, path)
        stored = self._stored(0, parsed.key)
        first = stored.block_by_id(0)
        stored_per_atom = "atom" in first.samples.names
        if parsed.per_atom is not None and parsed.per_atom != stored_per_atom:
            raise ValueError(
                f"{path}.per_atom: {parsed.per_atom} given, but field '{parsed.key}' of "
                f"'{self.path}' is {'per atom' if stored_per_atom else 'per structure'}"
            )
        n_properties = len(first.properties)
        if parsed.num_subtargets is not None and parsed.num_subtargets != n_properties:
            raise ValueError(
                f"{path}.num_subtargets: {parsed.num_subtargets} given, but field "
                f"'{parsed.key}' of '{self.path}' has {n_properties} properties"
            )
        return stored, stored_per_atom

    def add_extra(self, name: str, parsed: DiskExtraOptions) -> None:
        self._check_stored(f"extra_data.{name}", parsed)
        self._extra_fields[name] = parsed.key

    def add_target(self, name: str, parsed: DiskTargetOptions) -> None:
        path = f"targets.{name}"
        stored, per_atom = self._check_stored(path, parsed)
        first = stored.block_by_id(0)
        n_properties = len(first.properties)
        gradients = set(first.gradients_list()) if len(stored) == 1 else set()
        found = {
            "forces": "positions" in gradients,
            "stress": "strain" in gradients,
            "virial": "strain" in gradients,
        }
        if not parsed.energy_like or per_atom:
            on: dict[str, bool] = {}
            keep = None
        else:
            on = parsed.check_found(found, f"field '{parsed.key}' of '{self.path}'")
            if any(on.values()) and (len(stored) != 1 or n_properties != 1):
                raise ValueError(
                    f"{path}: forces/stress/virial need a single-block, single-property "
                    f"energy, field '{parsed.key}' of '{self.path}' has {len(stored)} blocks "
                    f"and {n_properties} properties"
                )
            keep = {"positions"} if on.get("forces") else set()
            if on.get("stress") or on.get("virial"):
                keep.add("strain")
        # a single-property energy in the usual layout: items built from its tensors
        # with shared Labels (far fewer TorchScript calls than a generic relayout)
        simple = (
            parsed.energy_like
            and not per_atom
            and len(stored) == 1
            and n_properties == 1
            and first.samples.names == ["system"]
            and len(first.components) == 0
        )
        properties = (
            tuple(first.properties.names),
            tuple(map(tuple, first.properties.values.tolist())),
        )
        # plain values, not Labels: the dataset is pickled for spawned workers
        self._fields[name] = (parsed.key, keep, properties if simple else None)
        self.target_options[name] = parsed.resolved(self.path, per_atom, n_properties, on)
        self.target_sources[name] = {
            option: (f"{parsed.key}.mts {gradient} gradient", self.path)
            for option, gradient in (
                ("forces", "positions"),
                ("stress", "strain"),
                ("virial", "strain"),
            )
            if on.get(option)
        }

    # -- reading ---------------------------------------------------------------------
    def _stored(self, entry: int, field: str) -> TensorMap:
        what = f"dataset zip '{self.path}': member '{_member_name(entry, field)}'"
        return _load_tensor_map(self.index.read(entry, field), what)

    def read_system(self, entry: int) -> System:
        """Structure ``entry`` (float64, as stored)."""
        data = self.index.read(entry, SYSTEM_FIELD)
        try:
            return mta.load_system_buffer(torch.frombuffer(bytearray(data), dtype=torch.uint8))
        except Exception as error:
            raise ValueError(
                f"dataset zip '{self.path}': member '{entry}/system.mta' is not a metatomic "
                f"system: {error}"
            ) from error

    def n_entries(self) -> int:
        return self.index.n_entries

    def read_entry(self, entry: int):
        system = self.read_system(entry)
        n_atoms = len(system)
        counts = self.index.atom_counts
        if counts is not None and int(counts[entry]) != n_atoms:
            raise ValueError(
                f"dataset zip '{self.path}': entry {entry} has {n_atoms} atoms in "
                f"'{entry}/system.mta' but {int(counts[entry])} in '{ATOM_COUNTS}' "
                f"(inconsistent atom counts)"
            )
        if self.dtype != torch.float64:
            system = system.to(dtype=self.dtype)
        targets = {}
        for name, (field, keep, properties) in self._fields.items():
            targets[name] = self._item_map(entry, field, keep, n_atoms, properties)
        extra = {
            name: self._item_map(entry, field, None, n_atoms)
            for name, field in self._extra_fields.items()
        }
        return system, targets, extra

    def _item_map(
        self,
        entry: int,
        field: str,
        keep: set[str] | None,
        n_atoms: int,
        properties: tuple | None = None,
    ) -> TensorMap:
        what = f"dataset zip '{self.path}': member '{_member_name(entry, field)}'"
        data = self.index.read(entry, field)
        if properties is not None:  # the usual energy layout, in one TorchScript call
            keep = keep or set()
            try:
                simple = _energy_item(
                    _metatensor_buffer(data, what),
                    n_atoms,
                    "positions" in keep,
                    "strain" in keep,
                    _labels(*properties),
                    item_labels("positions", n_atoms),
                    shared_item_labels(),
                )
            except RuntimeError:
                simple = None  # not loadable: the generic path below says why
            if simple is not None:
                return simple if self.dtype == torch.float64 else simple.to(dtype=self.dtype)
        stored = _load_tensor_map(data, what)
        if keep:
            for block in stored.blocks():
                missing = keep - set(block.gradients_list())
                if missing:
                    raise ValueError(
                        f"{what} has no {sorted(missing)} gradient, which entry 0 has "
                        f"(every structure needs the same gradients)"
                    )
        tensor_map = _to_structure_layout(stored, keep, n_atoms, what)
        return tensor_map if self.dtype == torch.float64 else tensor_map.to(dtype=self.dtype)

    def all_atom_counts(self) -> np.ndarray:
        if self.index.atom_counts is None:  # no metadata: read every structure once
            self.index.atom_counts = np.array(
                [len(self.read_system(e)) for e in range(self.n_entries())], dtype=np.int64
            )
        return self.index.atom_counts

    def entry_types(self, entries: np.ndarray | None) -> list[int]:
        entries = range(self.n_entries()) if entries is None else entries.tolist()
        seen: set[int] = set()
        for entry in entries:
            seen.update(self.read_system(int(entry)).types.unique().tolist())
        return sorted(seen)


def _npy_bytes(array_1d: np.ndarray) -> bytes:
    """``np.save`` of a 1-D array, as bytes."""
    buffer = io.BytesIO()
    np.save(buffer, array_1d, allow_pickle=False)
    return buffer.getvalue()


class ZipDatasetWriter:
    """Writes a metatrain ``DiskDataset`` zip one structure at a time.

    Args:
        path: the ``.zip`` to write (written as ``<path>.partial``, renamed by
            :meth:`close`).
        fields: item name (target or extra data) -> field name in the zip (the ``key``
            of its options); names not listed keep their own name.
        force_zip64: always write ZIP64 records (for tests).

    .. code-block:: python

        with ZipDatasetWriter("train.zip", {"energy": "energy"}) as writer:
            for system, targets, extra_data in dataset:
                writer.write(system, targets, extra_data)
    """

    def __init__(
        self,
        path: str | Path,
        fields: Mapping[str, str] | None = None,
        force_zip64: bool = False,
    ) -> None:
        self.path = Path(path)
        self.fields = dict(fields or {})
        self._writer = ZipWriter(self.path, force_zip64=force_zip64)
        self._atom_counts = array("q")
        self._names: list[str] | None = None

    def __enter__(self) -> ZipDatasetWriter:
        return self

    def __exit__(self, exc_type, exc, traceback) -> None:
        if exc_type is None:
            self.close()
        else:
            self._writer.abort()

    def __len__(self) -> int:
        return len(self._atom_counts)

    def write(
        self,
        system: System,
        targets: Mapping[str, TensorMap],
        extra_data: Mapping[str, TensorMap] | None = None,
    ) -> None:
        """Append one structure with its per-structure TensorMaps (``system`` 0)."""
        entry = len(self._atom_counts)
        maps = {**targets, **(extra_data or {})}
        if len(maps) != len(targets) + len(extra_data or {}):
            raise ValueError(f"{self.path}: a name is both a target and extra data")
        names = sorted(maps)
        if self._names is None:
            self._names = names
            fields = [self.fields.get(name, name) for name in names]
            if len(set(fields)) != len(fields) or SYSTEM_FIELD in fields:
                raise ValueError(
                    f"{self.path}: zip fields {fields} must be distinct and not '{SYSTEM_FIELD}'"
                )
        elif names != self._names:
            raise ValueError(
                f"{self.path}: structure {entry} has fields {names}, the first had {self._names}"
            )
        system = system.to(device="cpu", dtype=torch.float64)
        self._writer.add(f"{entry}/system.mta", mta.save_buffer(system).numpy().tobytes())
        for name in names:
            stored = _to_stored_layout(maps[name], entry)
            buffer = mts.save_buffer(stored).numpy()
            self._writer.add(f"{entry}/{self.fields.get(name, name)}.mts", _npy_bytes(buffer))
        self._atom_counts.append(len(system))

    def close(self) -> None:
        """Write ``metadata/atom_counts.npy`` and the zip's central directory."""
        counts = np.frombuffer(self._atom_counts, dtype=np.int64)
        self._writer.add(ATOM_COUNTS, _npy_bytes(counts))
        self._writer.close()
