"""Targets: ``ase.Atoms`` info/arrays/calculator results -> per-structure TensorMaps.

Target options follow the spec's ``training_set.targets`` form:

.. code-block:: yaml

    targets:
      energy:                  # an energy: forces and stress are read when present
        quantity: energy
        key: energy            # info key or calculator result (default: the target name)
        unit: eV
        forces: true           # true/false, a key name, or {key: ..., read_from: ...}
        stress: true           # ase stress (1/V) dE/d(strain), eV/Å^3
      mtt::charges:            # any other target, per structure or per atom
        key: charges
        per_atom: true         # default: detected (an ``arrays`` entry is per atom)
        num_subtargets: 1      # optional check of the number of columns

Sign and volume conventions of the stored gradients (see :mod:`pl_mtt.data.layout`):
``positions`` gradient = ``-forces``; ``strain`` gradient = ``V * stress = -virial``
with ``V = |det(cell)|`` and ase's stress ``(1/V) dE/d(strain)``. A structure that is not
periodic in all three directions gets a NaN strain gradient (the losses ignore NaN).

An energy-like target (``quantity: energy`` or the name ``energy``) reads forces and
stress (or, failing stress, virial) when every structure has them, unless its options
say otherwise (metatrain's default). :func:`read_targets` returns the RESOLVED options
(``forces``/``stress``/``virial`` as explicit booleans, ``per_atom``,
``num_subtargets``, ``key``, ``unit``, ...), which is what the loss grammar
(:func:`pl_mtt.expand_loss_config`) must see.
"""

from __future__ import annotations

import warnings
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

import ase
import numpy as np
import torch
from ase.stress import voigt_6_to_full_3x3_stress
from metatensor.torch import TensorMap

from pl_mtt.config import check_known_keys, is_energy_like, to_plain
from pl_mtt.data.layout import property_labels, structure_tensor_map
from pl_mtt.data.report import DataWarning
from pl_mtt.data.systems import read_atoms

__all__ = [
    "available_keys",
    "find_value",
    "gradient_source",
    "is_per_atom_key",
    "read_targets",
    "resolve_target_options",
]

TARGET_OPTION_KEYS = (
    "quantity",
    "key",
    "unit",
    "per_atom",
    "num_subtargets",
    "type",
    "read_from",
    "reader",
    "description",
    "forces",
    "stress",
    "virial",
)
GRADIENT_OPTION_KEYS = ("key", "read_from", "reader")
# energy-like option -> (default key, gradient name)
ENERGY_GRADIENT_KEYS = {"forces": "forces", "stress": "stress", "virial": "virial"}

FramesFor = Callable[[str], Sequence[ase.Atoms]]


def find_value(atoms: ase.Atoms, key: str) -> np.ndarray | None:
    """``atoms.info[key]``, ``atoms.arrays[key]`` or ``atoms.calc.results[key]``, or None."""
    if key in atoms.info:
        value = atoms.info[key]
    elif key in atoms.arrays and key not in ("numbers", "positions"):
        value = atoms.arrays[key]
    elif atoms.calc is not None and key in getattr(atoms.calc, "results", {}):
        value = atoms.calc.results[key]
    else:
        return None
    try:
        return np.asarray(value, dtype=np.float64)
    except (TypeError, ValueError):
        raise ValueError(f"value of key '{key}' is not numeric: {value!r}") from None


def is_per_atom_key(atoms: ase.Atoms, key: str) -> bool:
    """Whether ``key`` of ``atoms`` has one row per atom (an ``arrays`` key, or a
    calculator result with one row per atom)."""
    if key in atoms.info:
        return False
    if key in atoms.arrays:
        return True
    value = find_value(atoms, key)
    # calculator results: per-atom ones have one row per atom (e.g. 'energies', 'forces')
    return value is not None and value.ndim >= 1 and value.shape[0] == len(atoms) > 1


def available_keys(atoms: ase.Atoms) -> str:
    info = sorted(atoms.info)
    arrays = sorted(k for k in atoms.arrays if k not in ("numbers", "positions"))
    results = sorted(getattr(atoms.calc, "results", {}) if atoms.calc is not None else {})
    return f"info keys {info}, arrays keys {arrays}, calculator results {results}"


def _missing(target: str, what: str, key: str, index: int, path: str, atoms: ase.Atoms) -> str:
    return (
        f"target '{target}': {what} key '{key}' not found in structure {index} of "
        f"'{path}' (available: {available_keys(atoms)})"
    )


def gradient_source(
    target: str, option: str, value: Any, read_from: str
) -> tuple[bool | None, str, str]:
    """``(on, key, read_from)`` of ``forces``/``stress``/``virial`` (None: not given)."""
    default_key = ENERGY_GRADIENT_KEYS[option]
    path = f"targets.{target}.{option}"
    if value is None:
        return None, default_key, read_from
    if isinstance(value, bool):
        return value, default_key, read_from
    if isinstance(value, str):
        return True, value, read_from
    if isinstance(value, Mapping):
        for key in value:
            if key not in GRADIENT_OPTION_KEYS:
                raise ValueError(
                    f"{path}.{key}: unknown key; valid keys: {', '.join(GRADIENT_OPTION_KEYS)}"
                )
        if value.get("reader") not in (None, "ase"):
            raise ValueError(f"{path}.reader: only the 'ase' reader is available")
        return True, str(value.get("key") or default_key), str(value.get("read_from") or read_from)
    raise ValueError(f"{path}: expected true, false, a key name or a mapping, got {value!r}")


def resolve_target_options(
    name: str, options: Mapping[str, Any] | None, path: str, frames_for: FramesFor
) -> tuple[dict[str, Any], dict[str, tuple[str, str]]]:
    """Resolve one target's options against the data.

    Returns ``(resolved, sources)``: the resolved options (explicit booleans for
    ``forces``/``stress``/``virial``, detected ``per_atom``/``num_subtargets``) and, for
    each gradient read, ``option -> (key, file)``.
    """
    options = to_plain(options) or {}
    if not isinstance(options, Mapping):
        raise ValueError(f"targets.{name}: expected a mapping of options, got {options!r}")
    check_known_keys(options, TARGET_OPTION_KEYS, f"targets.{name}", "target option")
    if options.get("type", "scalar") != "scalar":
        raise ValueError(
            f"targets.{name}.type: only scalar targets are supported, got {options['type']!r}"
        )
    if options.get("reader") not in (None, "ase"):
        raise ValueError(f"targets.{name}.reader: only the 'ase' reader is available")
    energy_like = is_energy_like(name, options)
    read_from = str(options.get("read_from") or path)
    key = str(options.get("key") or name)
    frames = frames_for(read_from)
    first = next((a for a in frames if find_value(a, key) is not None), frames[0])
    per_atom = options.get("per_atom")
    if per_atom is None:
        per_atom = is_per_atom_key(first, key)
    resolved: dict[str, Any] = {
        "quantity": options.get("quantity") or ("energy" if energy_like else ""),
        "key": key,
        "unit": options.get("unit") or ("eV" if energy_like else ""),
        "per_atom": bool(per_atom),
        "type": "scalar",
        "read_from": read_from,
        "num_subtargets": options.get("num_subtargets"),
    }
    if options.get("description"):
        resolved["description"] = options["description"]

    sources: dict[str, tuple[str, str]] = {}
    given = {
        opt: gradient_source(name, opt, options.get(opt), read_from)
        for opt in ("forces", "stress", "virial")
    }
    if not energy_like:
        for opt, (on, _, _) in given.items():
            if on:
                raise ValueError(
                    f"targets.{name}.{opt}: '{opt}' is only available for energy-like "
                    f"targets (quantity: energy or the name 'energy')"
                )
    elif resolved["per_atom"]:
        for opt, (on, _, _) in given.items():
            if on:
                raise ValueError(f"targets.{name}.{opt}: not available for a per-atom target")
    else:
        on_forces, forces_key, forces_file = given["forces"]
        if on_forces is None:
            on_forces = _present_everywhere(frames_for, name, "forces", forces_key, forces_file)
        if on_forces:
            sources["forces"] = (forces_key, forces_file)
        on_stress, stress_key, stress_file = given["stress"]
        on_virial, virial_key, virial_file = given["virial"]
        if on_stress and on_virial:
            raise ValueError(f"targets.{name}: give either 'stress' or 'virial', not both")
        if on_stress is None and on_virial is None:
            on_stress = _present_everywhere(frames_for, name, "stress", stress_key, stress_file)
            on_virial = not on_stress and _present_everywhere(
                frames_for, name, "virial", virial_key, virial_file
            )
        if on_stress:
            sources["stress"] = (stress_key, stress_file)
        elif on_virial:
            sources["virial"] = (virial_key, virial_file)
    for opt in ("forces", "stress", "virial"):
        resolved[opt] = opt in sources
    return resolved, sources


def _present_everywhere(
    frames_for: FramesFor, target: str, option: str, key: str, file: str
) -> bool:
    """Whether every structure (every periodic one for stress and virial) of ``file``
    has ``key``; a key found in only some of them is not read, with a ``DataWarning``."""
    periodic_only = option != "forces"
    relevant = [a for a in frames_for(file) if not periodic_only or bool(np.all(a.pbc))]
    present = sum(find_value(atoms, key) is not None for atoms in relevant)
    if 0 < present < len(relevant):
        scope = "periodic structures" if periodic_only else "structures"
        warnings.warn(
            f"targets.{target}.{option}: key '{key}' is in only {present} of the "
            f"{len(relevant)} {scope} of '{file}', so it is not read; set "
            f"targets.{target}.{option}: {key} to read them (then every one of these "
            f"structures needs it)",
            DataWarning,
            stacklevel=2,
        )
    return bool(relevant) and present == len(relevant)


def _to_3x3(value: np.ndarray, what: str) -> np.ndarray:
    if value.size == 9:
        return value.reshape(3, 3)
    if value.size == 6:
        return voigt_6_to_full_3x3_stress(value.reshape(6))
    raise ValueError(f"{what}: expected 9 (3x3) or 6 (Voigt) values, got shape {value.shape}")


def _structure_values(
    name: str, resolved: Mapping[str, Any], index: int, atoms: ase.Atoms, path: str
) -> np.ndarray:
    """``(1, P)`` or ``(n_atoms, P)`` values of one structure."""
    key = resolved["key"]
    value = find_value(atoms, key)
    if value is None:
        raise ValueError(_missing(name, "target", key, index, path, atoms))
    if resolved["per_atom"]:
        if value.ndim == 0 or value.shape[0] != len(atoms):
            raise ValueError(
                f"target '{name}': per-atom key '{key}' of structure {index} of '{path}' "
                f"has shape {value.shape}, expected {len(atoms)} rows (one per atom)"
            )
        return value.reshape(len(atoms), -1)
    return value.reshape(1, -1)


def _check_frames(frames: Sequence[ase.Atoms], file: str, reference, path: str) -> None:
    """Targets read from another file must describe the same structures."""
    if len(frames) != len(reference):
        raise ValueError(f"'{file}' has {len(frames)} structures but '{path}' has {len(reference)}")
    for index, (atoms, ref) in enumerate(zip(frames, reference, strict=True)):
        if len(atoms) != len(ref):
            raise ValueError(
                f"structure {index} has {len(atoms)} atoms in '{file}' but {len(ref)} atoms "
                f"in '{path}' (inconsistent atom counts)"
            )


def read_targets(
    path: str | Path,
    targets: Mapping[str, Any],
    frames: Sequence[ase.Atoms] | None = None,
    dtype: torch.dtype = torch.float64,
    sources: dict[str, dict[str, tuple[str, str]]] | None = None,
) -> tuple[dict[str, list[TensorMap]], dict[str, dict[str, Any]]]:
    """Read every target of every structure of ``path``.

    Args:
        path: the structure file (targets are read from it unless ``read_from`` says
            otherwise).
        targets: target name -> options (the spec's ``training_set.targets`` form).
        frames: the already-read frames of ``path`` (read here if None).
        dtype: floating dtype of the values.
        sources: if given, filled with target name -> ``{"forces"|"stress"|"virial":
            (key, file)}`` for every gradient read (what the start-up summary reports).

    Returns:
        ``(tensors, resolved)``: ``tensors[name][i]`` is the TensorMap of structure
        ``i`` (sample ``system`` 0) and ``resolved[name]`` the resolved options.
    """
    path = str(path)
    cache: dict[str, Sequence[ase.Atoms]] = {}
    if frames is not None:
        cache[path] = frames

    def frames_for(file: str) -> Sequence[ase.Atoms]:
        if file not in cache:
            cache[file] = read_atoms(file)
            if file != path:
                _check_frames(cache[file], file, frames_for(path), path)
        return cache[file]

    main = frames_for(path)
    tensors: dict[str, list[TensorMap]] = {}
    resolved_all: dict[str, dict[str, Any]] = {}
    for name, options in (to_plain(targets) or {}).items():
        resolved, gradient_sources = resolve_target_options(name, options, path, frames_for)
        tensors[name] = _read_one_target(name, resolved, gradient_sources, frames_for, main, dtype)
        resolved_all[name] = resolved
        if sources is not None:
            sources[name] = dict(gradient_sources)
    return tensors, resolved_all


def _read_one_target(
    name: str,
    resolved: dict[str, Any],
    sources: Mapping[str, tuple[str, str]],
    frames_for: FramesFor,
    main: Sequence[ase.Atoms],
    dtype: torch.dtype,
) -> list[TensorMap]:
    file = resolved["read_from"]
    frames = frames_for(file)
    energy_like = is_energy_like(name, resolved)
    values = [_structure_values(name, resolved, i, a, file) for i, a in enumerate(frames)]
    n_properties = values[0].shape[1]
    for index, value in enumerate(values):
        if value.shape[1] != n_properties:
            raise ValueError(
                f"target '{name}': structure {index} has {value.shape[1]} properties, "
                f"structure 0 has {n_properties}"
            )
    expected = resolved.get("num_subtargets")
    if expected is not None and int(expected) != n_properties:
        raise ValueError(
            f"targets.{name}.num_subtargets: {expected} given but key '{resolved['key']}' "
            f"has {n_properties} values per sample"
        )
    resolved["num_subtargets"] = n_properties
    if sources and n_properties != 1:
        raise ValueError(
            f"target '{name}': forces/stress/virial need a single-property energy, "
            f"key '{resolved['key']}' has {n_properties} values"
        )
    properties = property_labels(n_properties, energy_like)

    forces = _read_forces(name, sources.get("forces"), frames_for, main)
    strain = _read_strain(name, sources, frames_for, main)
    result = []
    for index, value in enumerate(values):
        result.append(
            structure_tensor_map(
                torch.from_numpy(value).to(dtype),
                properties,
                per_atom=resolved["per_atom"],
                positions_gradient=None
                if forces is None
                else torch.from_numpy(-forces[index]).to(dtype).reshape(-1, 3, 1),
                strain_gradient=None
                if strain is None
                else torch.from_numpy(strain[index]).to(dtype).reshape(3, 3, 1),
            )
        )
    return result


def _read_forces(
    name: str, source: tuple[str, str] | None, frames_for: FramesFor, main
) -> list[np.ndarray] | None:
    if source is None:
        return None
    key, file = source
    result = []
    for index, atoms in enumerate(frames_for(file)):
        value = find_value(atoms, key)
        if value is None:
            raise ValueError(_missing(name, "forces", key, index, file, atoms))
        if value.shape != (len(main[index]), 3):
            raise ValueError(
                f"target '{name}': forces key '{key}' of structure {index} of '{file}' has "
                f"shape {value.shape}, expected ({len(main[index])}, 3)"
            )
        result.append(value)
    return result


def _read_strain(
    name: str, sources: Mapping[str, tuple[str, str]], frames_for: FramesFor, main
) -> list[np.ndarray] | None:
    """``dE/d(strain)`` per structure: ``V * stress`` or ``-virial``; NaN without a cell."""
    option = "stress" if "stress" in sources else "virial" if "virial" in sources else None
    if option is None:
        return None
    key, file = sources[option]
    result = []
    for index, atoms in enumerate(frames_for(file)):
        reference = main[index]
        if not np.all(reference.pbc):
            result.append(np.full((3, 3), np.nan))
            continue
        value = find_value(atoms, key)
        if value is None:
            raise ValueError(_missing(name, option, key, index, file, atoms))
        matrix = _to_3x3(value, f"target '{name}': {option} key '{key}' of structure {index}")
        # dE/d(strain) = V * stress = -virial
        volume = abs(reference.cell.volume)
        result.append(matrix * volume if option == "stress" else -matrix)
    return result
