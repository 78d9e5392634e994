"""Precomputed statistics: the fitted composition baseline and scales in a small YAML file.

A fit over a large dataset is done once; later runs load its result instead of passing
over the data again (as nequip ships statistics files for its large datasets):

.. code-block:: yaml

    # pl_mtt statistics: composition baseline and target scales
    pl_mtt_statistics: 1
    atomic_types: [29, 79]
    targets:
      energy:
        unit: eV
        sample_kind: system        # system | atom | atom_pair
        divided_by_atoms: true     # scales and residuals are per atom
        scale: 0.0213              # per-target scale; per-atom targets: {type: scale}
        scale_unit: eV/atom
        baseline: {29: -3.512, 79: -3.826}   # per atom of each type (one value, or
        baseline_unit: eV/atom                #  a list with one per property)
      mtt::dipole_moments:
        sample_kind: system
        scale: 0.71
        per_property_scales: [1.02, 0.97, 1.01]   # multi-property targets only
        baseline: {1: [0.0, 0.1, 0.0], 8: [0.2, 0.0, 0.0]}

Targets with several blocks list them under ``blocks:`` (each with its ``key``,
``per_property_scales`` and ``baseline``). Numbers are written with Python's shortest
round-trip ``repr``, so loading gives back the fitted values exactly.

- :func:`write_statistics` / :func:`statistics_of`: from a fitted :class:`Scaler` and
  :class:`CompositionModel`;
- :func:`read_statistics`, then :func:`load_statistics`: into unfitted ones (no pass), with a
  clear error when types, targets, blocks, properties or units do not match;
- :func:`fixed_scales_from`, :func:`fixed_baseline_from`: the file's per-target scales or
  baseline as ``fixed_scales`` / ``fixed_weights`` of a fit (metatrain's
  ``fixed_scaling_weights`` and ``atomic_baseline`` given as a path).
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
import yaml

from pl_mtt.scaling.composition import CompositionModel
from pl_mtt.scaling.scaler import Scaler
from pl_mtt.tensormaps.builders import ATOM_PAIR, PER_ATOM

__all__ = [
    "fixed_baseline_from",
    "fixed_scales_from",
    "load_statistics",
    "read_statistics",
    "statistics_of",
    "write_statistics",
]

FORMAT_KEY = "pl_mtt_statistics"
VERSION = 1
HEADER = (
    "# pl_mtt statistics: composition baseline and target scales "
    "(pl_mtt.scaling.statistics).\n"
    "# scale: per-target scale (per type for per-atom targets); per_property_scales:\n"
    "# multi-property targets; baseline: per atomic type, per atom of that type.\n"
)
SAMPLE_KINDS = {"per_structure": "system", PER_ATOM: "atom", ATOM_PAIR: "atom_pair"}
TARGET_KEYS = (
    "unit",
    "sample_kind",
    "divided_by_atoms",
    "scale",
    "scale_unit",
    "per_property_scales",
    "baseline",
    "baseline_unit",
    "blocks",
)
BLOCK_KEYS = ("key", "per_property_scales", "baseline")


def _numbers(values: torch.Tensor) -> float | list[float]:
    listed = [float(v) for v in values.tolist()]
    return listed[0] if len(listed) == 1 else listed


def _units(unit: str, divided: bool) -> tuple[str, str]:
    if not divided:
        return unit, unit
    per_atom = f"{unit}/atom" if unit else "per atom"
    return per_atom, per_atom


def statistics_of(
    scaler: Scaler,
    composition: CompositionModel | None = None,
    units: Mapping[str, str] | None = None,
) -> dict[str, Any]:
    """The fitted state of ``scaler`` (and ``composition``) as plain, YAML-ready data.

    Args:
        scaler: a fitted :class:`Scaler`.
        composition: its :class:`CompositionModel` (None: no baseline).
        units: target name -> unit, written with the numbers.
    """
    if not bool(scaler.fitted):
        raise ValueError("statistics_of: the scaler is not fitted")
    types = scaler.atomic_types
    rows = [scaler.type_table.row_of(t) for t in types]
    units = dict(units or {})
    targets: dict[str, Any] = {}
    for name, info in scaler.targets.items():
        divided = info.per_structure and name not in scaler.per_structure_targets
        unit = str(units.get(name) or "")
        scale_unit, baseline_unit = _units(unit, divided)
        entry: dict[str, Any] = {"unit": unit, "sample_kind": SAMPLE_KINDS[info.kind]}
        if info.per_structure:
            entry["divided_by_atoms"] = divided
        per_target, per_property = scaler.scale_tables(name)
        if info.per_atom:
            entry["scale"] = {t: float(per_target[r]) for t, r in zip(types, rows, strict=True)}
        else:
            entry["scale"] = float(per_target[0])
        entry["scale_unit"] = scale_unit
        pooled = not info.multi_property or name in scaler.no_per_property_scales
        weights = {} if composition is None else composition.weight_tables(name)
        blocks = []
        for b, table in enumerate(per_property):
            block: dict[str, Any] = {}
            if len(info.blocks) > 1:
                block["key"] = dict(zip(info.keys.names, info.keys.values[b].tolist(), strict=True))
            if not pooled and not info.atom_pair:
                if info.per_atom:
                    block["per_property_scales"] = {
                        t: [float(v) for v in table[r].tolist()]
                        for t, r in zip(types, rows, strict=True)
                    }
                else:
                    block["per_property_scales"] = [float(v) for v in table[0].tolist()]
            if b in weights:
                block["baseline"] = {
                    t: _numbers(weights[b][r]) for t, r in zip(types, rows, strict=True)
                }
            blocks.append(block)
        if len(blocks) == 1:
            entry.update(blocks[0])
        else:
            entry["blocks"] = blocks
        if weights:
            entry["baseline_unit"] = baseline_unit
        targets[name] = entry
    return {FORMAT_KEY: VERSION, "atomic_types": list(types), "targets": targets}


def write_statistics(
    path: str | Path,
    scaler: Scaler,
    composition: CompositionModel | None = None,
    units: Mapping[str, str] | None = None,
) -> dict[str, Any]:
    """Write :func:`statistics_of` to ``path`` (YAML); returns what was written."""
    statistics = statistics_of(scaler, composition, units)
    text = yaml.safe_dump(statistics, sort_keys=False, default_flow_style=None, width=100)
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    Path(path).write_text(HEADER + text)
    return statistics


def read_statistics(source: str | Path | Mapping[str, Any]) -> dict[str, Any]:
    """A statistics file (or its already-parsed content), checked for its overall form.

    Raises:
        ValueError: naming the file, for a missing or unreadable file or one that is
            not a pl_mtt statistics file.
    """
    if isinstance(source, Mapping):
        # what an earlier read returned keeps naming its file
        what = str(source.get("_source", "statistics"))
        data = dict(source)
    else:
        what = f"statistics file '{source}'"
        if not Path(source).is_file():
            raise ValueError(f"{what} does not exist")
        try:
            data = yaml.safe_load(Path(source).read_text())
        except yaml.YAMLError as error:
            raise ValueError(f"{what}: not valid YAML: {error}") from None
    if not isinstance(data, Mapping) or FORMAT_KEY not in data:
        raise ValueError(
            f"{what}: not a pl_mtt statistics file (no '{FORMAT_KEY}: {VERSION}' entry); "
            f"write one with pl_mtt.scaling.statistics.write_statistics"
        )
    if data[FORMAT_KEY] != VERSION:
        raise ValueError(f"{what}: version {data[FORMAT_KEY]!r}, this pl_mtt reads {VERSION}")
    types = data.get("atomic_types")
    if not isinstance(types, list) or not all(isinstance(t, int) for t in types):
        raise ValueError(f"{what}: 'atomic_types' must be a list of atomic numbers")
    if not isinstance(data.get("targets"), Mapping) or not data["targets"]:
        raise ValueError(f"{what}: 'targets' must be a mapping of target name -> statistics")
    for name, entry in data["targets"].items():
        if not isinstance(entry, Mapping):
            raise ValueError(f"{what}: targets.{name} must be a mapping")
        unknown = sorted(set(entry) - set(TARGET_KEYS))
        if unknown:
            raise ValueError(
                f"{what}: targets.{name}.{unknown[0]}: unknown key; valid: {', '.join(TARGET_KEYS)}"
            )
    return {**data, "_source": what}


def _blocks(entry: Mapping[str, Any], n_blocks: int, path: str) -> list[Mapping[str, Any]]:
    if "blocks" in entry:
        blocks = entry["blocks"]
        if not isinstance(blocks, list) or len(blocks) != n_blocks:
            raise ValueError(
                f"{path}.blocks: the target has {n_blocks} blocks, the file lists "
                f"{len(blocks) if isinstance(blocks, list) else blocks!r}"
            )
        for index, block in enumerate(blocks):
            unknown = sorted(set(block) - set(BLOCK_KEYS)) if isinstance(block, Mapping) else []
            if not isinstance(block, Mapping) or unknown:
                raise ValueError(
                    f"{path}.blocks[{index}]: expected a mapping with {', '.join(BLOCK_KEYS)}"
                )
        return blocks
    if n_blocks != 1:
        raise ValueError(f"{path}: the target has {n_blocks} blocks; list them under 'blocks:'")
    return [entry]


class _Tables:
    """Per-type values of one file, placed on the rows of a model's type table."""

    def __init__(self, model: Scaler | CompositionModel, types: list[int], what: str) -> None:
        self.types = types
        self.what = what
        table = model.type_table
        if not table.discover and sorted(table.types) != sorted(types):
            raise ValueError(
                f"{what}: atomic types {sorted(types)} do not match the model's "
                f"{sorted(table.types)}"
            )
        self.rows = {}
        for atomic_type in types:
            row = table.row_of(atomic_type)
            if row >= table.n_rows:
                raise ValueError(f"{what}: atomic type {atomic_type} is not a valid atomic number")
            self.rows[atomic_type] = row
        self.n_rows = table.n_rows
        self.seen = torch.zeros(table.n_rows, dtype=torch.bool)
        self.seen[list(self.rows.values())] = True

    def per_type(self, value: Any, n_properties: int, path: str, fill: float) -> torch.Tensor:
        """``{type: number or list}`` (every type of the file) -> ``[n_rows, P]``."""
        if not isinstance(value, Mapping):
            raise ValueError(f"{self.what}: {path} must map each atomic type to its value(s)")
        missing = [t for t in self.types if t not in value]
        extra = [t for t in value if t not in self.rows]
        if missing or extra:
            raise ValueError(
                f"{self.what}: {path} has types {sorted(value)}, the file's atomic_types are "
                f"{self.types}"
            )
        table = torch.full((self.n_rows, n_properties), fill, dtype=torch.float64)
        for atomic_type, numbers in value.items():
            table[self.rows[atomic_type]] = _vector(
                numbers, n_properties, f"{path}.{atomic_type}", self.what
            )
        return table


def _vector(value: Any, n: int, path: str, what: str) -> torch.Tensor:
    numbers = value if isinstance(value, list) else [value]
    try:
        vector = torch.tensor([float(v) for v in numbers], dtype=torch.float64)
    except (TypeError, ValueError):
        raise ValueError(f"{what}: {path}: expected numbers, got {value!r}") from None
    if len(vector) != n:
        raise ValueError(
            f"{what}: {path}: expected {n} value(s) (one per property), got {len(vector)}"
        )
    if not bool(torch.isfinite(vector).all()):
        raise ValueError(f"{what}: {path}: expected finite numbers, got {value!r}")
    return vector


def _check_targets(statistics: Mapping[str, Any], scaler: Scaler, what: str) -> None:
    given, expected = set(statistics["targets"]), set(scaler.targets)
    if given != expected:
        raise ValueError(
            f"{what} has targets {sorted(given)}, the training has {sorted(expected)} "
            f"(missing: {sorted(expected - given)}, not trained: {sorted(given - expected)})"
        )


def load_statistics(
    statistics: str | Path | Mapping[str, Any],
    scaler: Scaler,
    composition: CompositionModel | None = None,
    units: Mapping[str, str] | None = None,
) -> None:
    """Set ``scaler`` (and ``composition``) to the statistics of a file, without a pass.

    Args:
        statistics: a path, or what :func:`read_statistics` returned.
        scaler, composition: built for the training targets (fitted or not).
        units: target name -> unit of the training data; a file whose unit differs is
            an error (an empty unit on either side is not checked).

    Raises:
        ValueError: naming the file and what differs: atomic types (against the
            model's explicit types), targets, sample kinds, division by atoms, blocks,
            property counts, a baseline missing or unexpected, units.
    """
    statistics = read_statistics(statistics)
    what = statistics["_source"]
    types = list(statistics["atomic_types"])
    _check_targets(statistics, scaler, what)
    scale_rows = _Tables(scaler, types, what)
    weight_rows = None if composition is None else _Tables(composition, types, what)
    units = dict(units or {})
    per_target: dict[str, torch.Tensor] = {}
    per_property: dict[str, list[torch.Tensor]] = {}
    weights: dict[str, dict[int, torch.Tensor]] = {}
    for name, info in scaler.targets.items():
        entry = statistics["targets"][name]
        path = f"targets.{name}"
        kind = SAMPLE_KINDS[info.kind]
        if entry.get("sample_kind", kind) != kind:
            raise ValueError(
                f"{what}: {path}.sample_kind is {entry.get('sample_kind')!r}, the training "
                f"target is '{kind}'"
            )
        divided = info.per_structure and name not in scaler.per_structure_targets
        if info.per_structure and bool(entry.get("divided_by_atoms", divided)) != divided:
            raise ValueError(
                f"{what}: {path}.divided_by_atoms is {entry.get('divided_by_atoms')}, the "
                f"training {'divides' if divided else 'does not divide'} '{name}' by atoms "
                f"(per_structure_targets)"
            )
        unit, file_unit = str(units.get(name) or ""), str(entry.get("unit") or "")
        if unit and file_unit and unit != file_unit:
            raise ValueError(
                f"{what}: {path}.unit is '{file_unit}', the training data has '{unit}'"
            )
        if "scale" not in entry:
            raise ValueError(f"{what}: {path} has no 'scale'")
        if info.per_atom:
            per_target[name] = scale_rows.per_type(entry["scale"], 1, f"{path}.scale", 1.0)[:, 0]
        else:
            per_target[name] = _vector(entry["scale"], 1, f"{path}.scale", what)
        if bool((per_target[name] <= 0).any()):
            raise ValueError(f"{what}: {path}.scale must be positive")
        blocks = _blocks(entry, len(info.blocks), path)
        per_property[name] = []
        baselined = set() if composition is None else set(composition.blocks[name])
        for b, (block_info, block) in enumerate(zip(info.blocks, blocks, strict=True)):
            where = path if len(blocks) == 1 else f"{path}.blocks[{b}]"
            if "key" in block:
                expected = dict(zip(info.keys.names, info.keys.values[b].tolist(), strict=True))
                if dict(block["key"]) != expected:
                    raise ValueError(
                        f"{what}: {where}.key is {dict(block['key'])}, the training target's "
                        f"block {b} has key {expected}"
                    )
            n = block_info.n_properties
            rows = scale_rows.n_rows if info.per_atom else 1
            table = torch.ones(rows, n, dtype=torch.float64)
            if "per_property_scales" in block:
                factors = block["per_property_scales"]
                if info.per_atom:
                    table = scale_rows.per_type(factors, n, f"{where}.per_property_scales", 1.0)
                else:
                    table = _vector(factors, n, f"{where}.per_property_scales", what)[None, :]
            per_property[name].append(table)
            if "baseline" in block and b not in baselined:
                raise ValueError(
                    f"{what}: {where} has a baseline, but the training has none for "
                    f"'{name}' (composition off or the target excluded from it)"
                )
            if b in baselined:
                if "baseline" not in block:
                    raise ValueError(
                        f"{what}: {where} has no baseline, but the training fits one for "
                        f"'{name}' (exclude it from the composition, or add it)"
                    )
                weights.setdefault(name, {})[b] = weight_rows.per_type(
                    block["baseline"], n, f"{where}.baseline", 0.0
                )
    scaler.set_scales(per_target, per_property, scale_rows.seen)
    if composition is not None:
        composition.set_weights(weights, weight_rows.seen)


def fixed_scales_from(statistics: str | Path | Mapping[str, Any]) -> dict[str, Any]:
    """The per-target scales of a statistics file, as ``fixed_scales`` for a fit."""
    statistics = read_statistics(statistics)
    return {
        name: dict(entry["scale"]) if isinstance(entry.get("scale"), Mapping) else entry["scale"]
        for name, entry in statistics["targets"].items()
        if "scale" in entry
    }


def fixed_baseline_from(statistics: str | Path | Mapping[str, Any]) -> dict[str, Any]:
    """The baseline of a statistics file, as ``fixed_weights`` for a fit (one mapping
    ``type -> values`` per baselined block)."""
    statistics = read_statistics(statistics)
    result = {}
    for name, entry in statistics["targets"].items():
        blocks = entry.get("blocks", [entry])
        baselines = [dict(block["baseline"]) for block in blocks if "baseline" in block]
        if baselines:
            result[name] = baselines
    return result
