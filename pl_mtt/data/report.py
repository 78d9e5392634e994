"""What the data holds: the start-up summary and the warnings about partly unusable data.

.. code-block:: python

    datamodule = AtomisticDataModule(path="train.xyz", targets={"energy": {"key": "dft_energy"}})
    datamodule.setup()          # DataWarning: NaN entries, an element missing from training
    print(datamodule.summary())

.. code-block:: text

    data: 40 structures in 'train.xyz', the first 24 used (data.n_structures=24)
    split (seed 0): train 12, val 6, test 6
    targets:
      energy: key 'dft_energy' (eV, per structure)
        forces: key 'dft_forces'
        stress: not read (key 'stress' is not in every periodic structure)
    elements (atoms per split):
      train: Cu 60, Ni 36
      ...

:class:`DataReport` is built from any dataset with ``systems``, ``targets`` (name -> one
TensorMap per structure), ``target_options`` and, optionally, ``target_sources``
(name -> ``{"forces"|"stress"|"virial": (key, file)}``), so other readers can feed it.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from ase.data import chemical_symbols
from metatensor.torch import TensorMap

from pl_mtt.config import gradient_alias, is_energy_like

__all__ = ["DataReport", "DataWarning", "NanEntries", "TargetReport"]

SPLITS = ("train", "val", "test")
ENERGY_GRADIENT_OPTIONS = ("forces", "stress", "virial")
MAX_LISTED = 8  # structure indices named in a message


class DataWarning(UserWarning):
    """Data that was read but is partly left out or cannot be learnt (NaN entries, an
    element absent from the training split, a gradient present in only some structures)."""


def _symbol(atomic_number: int) -> str:
    if 0 < atomic_number < len(chemical_symbols):
        return chemical_symbols[atomic_number]
    return f"Z={atomic_number}"


def _structures(count: int) -> str:
    return f"{count} structure" + ("" if count == 1 else "s")


def _listed(indices: Sequence[int]) -> str:
    shown = ", ".join(str(i) for i in indices[:MAX_LISTED])
    more = ", ..." if len(indices) > MAX_LISTED else ""
    return f"{'index' if len(indices) == 1 else 'indices'} {shown}{more}"


@dataclass
class NanEntries:
    """NaN entries of one target or gradient: left out of the loss and the scale fit."""

    what: str  # "target 'energy'", "target 'energy' forces (key 'dft_forces')"
    n_values: int
    n_total: int
    structures: list[int]  # indices in the file

    def message(self, files: str) -> str:
        return (
            f"{self.what}: {self.n_values} of {self.n_total} values are NaN, in "
            f"{_structures(len(self.structures))} ({_listed(self.structures)} in "
            f"{files}); they are left out of the loss and of the scale fit"
        )


@dataclass
class TargetReport:
    """How one target was read: its key, its gradients and where they came from."""

    name: str
    key: str
    unit: str
    per_atom: bool
    n_properties: int
    gradients: dict[str, str] = field(default_factory=dict)  # alias -> key read
    absent: dict[str, str] = field(default_factory=dict)  # alias -> why it is not read

    def lines(self) -> list[str]:
        unit = f"{self.unit}, " if self.unit else ""
        kind = "per atom" if self.per_atom else "per structure"
        width = f", {self.n_properties} properties" if self.n_properties != 1 else ""
        lines = [f"  {self.name}: key '{self.key}' ({unit}{kind}{width})"]
        lines += [f"    {alias}: key '{key}'" for alias, key in self.gradients.items()]
        lines += [f"    {alias}: {why}" for alias, why in self.absent.items()]
        return lines


def _nan_counts(
    values: Sequence[TensorMap], gradient: str | None
) -> tuple[torch.Tensor, torch.Tensor]:
    """Per structure: the number of NaN entries and of all entries (of every block)."""
    nan, total = [], []
    for tensor_map in values:
        arrays = [
            block.values if gradient is None else block.gradient(gradient).values
            for block in tensor_map.blocks()
        ]
        nan.append(sum(torch.isnan(array).sum() for array in arrays))
        total.append(sum(array.numel() for array in arrays))
    return torch.stack([torch.as_tensor(n) for n in nan]), torch.tensor(total)


def _target_report(
    name: str,
    options: Mapping[str, Any],
    sources: Mapping[str, tuple[str, str]],
    configured: Mapping[str, Any] | None,
    main_file: str,
) -> TargetReport:
    def where(key: str, file: str) -> str:
        return key if file == main_file else f"{key}' of '{file}"

    report = TargetReport(
        name=name,
        key=where(str(options.get("key", name)), str(options.get("read_from", main_file))),
        unit=str(options.get("unit") or ""),
        per_atom=bool(options.get("per_atom")),
        n_properties=int(options.get("num_subtargets") or 1),
    )
    for option, (key, file) in sources.items():
        report.gradients[option] = where(key, file)
    if is_energy_like(name, options) and not report.per_atom:
        configured = configured or {}
        for option in ("forces", "stress"):
            if option in sources or (option == "stress" and "virial" in sources):
                continue
            if configured.get(option) is False:
                report.absent[option] = f"off (targets.{name}.{option}: false)"
            else:
                scope = "periodic structure" if option == "stress" else "structure"
                report.absent[option] = (
                    f"not read (key '{option}' is not in every {scope}; "
                    f"targets.{name}.{option}: <key> reads another key)"
                )
    return report


@dataclass
class DataReport:
    """What was read and how it was split (:meth:`text`), and what deserves a warning
    (:meth:`warnings`)."""

    files: list[str]
    n_available: int
    n_used: int
    limit: str | None
    split_seed: int
    split_sizes: dict[str, int]
    elements: dict[str, dict[int, int]]  # split -> atomic number -> atoms
    element_structures: dict[str, dict[int, int]]  # split -> atomic number -> structures
    targets: dict[str, TargetReport]
    nan: list[NanEntries]
    non_periodic: int  # structures without a full cell (no stress/virial)
    has_strain: bool

    @classmethod
    def from_dataset(
        cls,
        dataset: Any,
        split: Mapping[str, Sequence[int]],
        *,
        files: Sequence[str],
        n_available: int | None = None,
        limit: str | None = None,
        split_seed: int = 0,
        configured_targets: Mapping[str, Any] | None = None,
    ) -> DataReport:
        """Report on ``dataset`` (all structures used, in file order) and its ``split``
        (split name -> indices into ``dataset``; only the splits given are reported,
        e.g. ``{"test": range(n)}`` for an evaluation)."""
        systems = dataset.systems
        files = [str(f) for f in files]
        sources = getattr(dataset, "target_sources", {}) or {}
        configured = configured_targets or {}
        targets = {
            name: _target_report(
                name, options, sources.get(name, {}), configured.get(name), files[0]
            )
            for name, options in dataset.target_options.items()
        }
        periodic = torch.tensor([bool(system.pbc.all()) for system in systems])
        nan: list[NanEntries] = []
        has_strain = False
        for name, values in dataset.targets.items():
            options = dataset.target_options.get(name, {})
            n_nan, n_total = _nan_counts(values, None)
            nan.append(NanEntries(f"target '{name}'", 0, int(n_total.sum()), []))
            entries = [(nan[-1], n_nan)]
            for gradient in values[0].block_by_id(0).gradients_list() if values else []:
                alias = gradient_alias(name, options, gradient)
                key = targets[name].gradients.get(alias)
                label = f"target '{name}' {alias}" + (f" (key '{key}')" if key else "")
                n_nan, n_total = _nan_counts(values, gradient)
                if gradient == "strain":  # NaN by construction without a cell
                    has_strain = True
                    n_nan, n_total = n_nan * periodic, n_total * periodic
                nan.append(NanEntries(label, 0, int(n_total.sum()), []))
                entries.append((nan[-1], n_nan))
            for entry, counts in entries:
                entry.n_values = int(counts.sum())
                entry.structures = torch.nonzero(counts).reshape(-1).tolist()
        elements, element_structures = {}, {}
        for stage in [stage for stage in SPLITS if stage in split]:
            indices = list(split[stage])
            types = [systems[i].types.to(torch.long) for i in indices]
            atoms = torch.bincount(torch.cat(types)) if types else torch.zeros(0, dtype=int)
            present = [torch.bincount(t.unique(), minlength=len(atoms)) for t in types]
            structures = torch.stack(present).sum(0) if present else atoms
            elements[stage] = {z: int(atoms[z]) for z in torch.nonzero(atoms).reshape(-1).tolist()}
            element_structures[stage] = {z: int(structures[z]) for z in elements[stage]}
        return cls(
            files=files,
            n_available=len(systems) if n_available is None else int(n_available),
            n_used=len(systems),
            limit=limit,
            split_seed=int(split_seed),
            split_sizes={stage: len(split[stage]) for stage in SPLITS if stage in split},
            elements=elements,
            element_structures=element_structures,
            targets=targets,
            nan=[entry for entry in nan if entry.n_values],
            non_periodic=int((~periodic).sum()),
            has_strain=has_strain,
        )

    @property
    def _file_names(self) -> str:
        return ", ".join(f"'{f}'" for f in self.files)

    def text(self) -> str:
        """The summary printed at start-up (facts only; see :meth:`warnings`)."""
        used = (
            f"the first {self.n_used} used ({self.limit})"
            if self.n_used != self.n_available
            else "all used"
        )
        lines = [f"data: {self.n_available} structures in {self._file_names}, {used}"]
        sizes = ", ".join(f"{stage} {n}" for stage, n in self.split_sizes.items())
        seed = f" (seed {self.split_seed})" if "train" in self.split_sizes else ""
        lines.append(f"split{seed}: {sizes}")
        lines.append("targets:")
        for target in self.targets.values():
            lines += target.lines()
        if self.has_strain and self.non_periodic:
            lines.append(
                f"  ({self.non_periodic} structures without a periodic cell have no "
                f"stress/virial: left out of those terms)"
            )
        lines.append("elements (atoms per split):")
        for stage, counts in self.elements.items():
            listed = ", ".join(f"{_symbol(z)} {n}" for z, n in counts.items()) or "none"
            lines.append(f"  {stage}: {listed}")
        return "\n".join(lines)

    def warnings(self) -> list[str]:
        """NaN entries left out, and elements absent from a (non-empty) training split."""
        messages = [f"data: {entry.message(self._file_names)}" for entry in self.nan]
        if not self.split_sizes.get("train"):
            return messages
        trained = set(self.elements.get("train", {}))
        for z in sorted({z for stage in ("val", "test") for z in self.elements.get(stage, {})}):
            if z in trained:
                continue
            where = ", ".join(
                f"{stage} ({_structures(self.element_structures[stage][z])})"
                for stage in ("val", "test")
                if z in self.elements.get(stage, {})
            )
            messages.append(
                f"data: element {_symbol(z)} (Z={z}) is in the {where} split but not in "
                f"the training split: the model and the composition baseline learn "
                f"nothing about it (change data.split_seed or the fractions, or add "
                f"structures with {_symbol(z)})"
            )
        return messages
