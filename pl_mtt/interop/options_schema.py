"""The schema of a metatrain 2026.4 options file (``mtt train options.yaml``), written for
pl_mtt from metatrain's documentation: keys, types and defaults, and the checks
metatrain applies (strict types: ``seed: "1"`` is an error; unknown keys are errors).

Top level (metatrain's defaults where a key is missing):

==================  ================================================  ==============
key                 type                                              default
==================  ================================================  ==============
``architecture``    ``{name, atomic_types, model, training}``         required
``training_set``    a dataset mapping, a list of them, or a file      required
``validation_set``  as ``training_set``, ``{indices}``, a fraction    required
                    in [0, 1)
``test_set``        as ``validation_set``                             ``0.0``
``device``          ``cpu``, ``cuda``, ``gpu``, ``mps``, ``multi-gpu``  the first available
``base_precision``  16, 32 or 64                                      the architecture's (32)
``seed``            an integer >= 0                                   random (pl_mtt: 0)
``print_stats``     true, false or ``auto``                           ``auto``
``final_eval``      true or false                                     true
``wandb``           a mapping                                         absent
==================  ================================================  ==============

A dataset mapping has ``systems`` (a file or ``{read_from, reader, length_unit}``),
``targets`` (name -> a file or the options of :class:`TargetOptions`), ``extra_data``
and ``indices`` (a list or a file). ``architecture.model`` and ``architecture.training``
are checked against the architecture's own schema (metatrain is installed then).
"""

from __future__ import annotations

import difflib
from collections.abc import Mapping
from typing import Annotated, Any, Literal, TypedDict

from pl_mtt.typecheck import Bound, check_required, check_value

__all__ = [
    "BASE_TYPES",
    "ArchitectureOptions",
    "DatasetOptions",
    "GradientOptions",
    "SystemsOptions",
    "TargetOptions",
    "check_base_options",
    "check_dataset",
]

Reader = Literal["ase", "metatensor"] | None


class SystemsOptions(TypedDict, total=False):
    read_from: str
    reader: Reader
    length_unit: str | None


class GradientOptions(TypedDict, total=False):
    read_from: str
    reader: Reader | dict
    key: str


class CartesianType(TypedDict):
    rank: int


class SphericalType(TypedDict, total=False):
    irreps: list | dict
    product: Literal["coupled", "cartesian"] | None


class TargetOptions(TypedDict, total=False):
    quantity: str
    read_from: str
    reader: Reader | dict
    key: str
    unit: str
    sample_kind: Literal["system", "atom", "atom_pair"]
    per_atom: bool
    type: Literal["scalar"] | dict
    num_subtargets: int
    description: str
    forces: bool | str | GradientOptions
    stress: bool | str | GradientOptions
    virial: bool | str | GradientOptions


class DatasetOptions(TypedDict, total=False):
    systems: str | SystemsOptions
    targets: dict[str, TargetOptions | str]
    extra_data: dict
    indices: list[int] | str


class ArchitectureOptions(TypedDict, total=False):
    name: str
    atomic_types: list[int]
    model: dict
    training: dict


BASE_TYPES: dict[str, Any] = {
    "architecture": ArchitectureOptions,
    "training_set": Any,  # checked by check_dataset
    "validation_set": Any,
    "test_set": Any,
    "device": str,
    "base_precision": Literal[16, 32, 64],
    "seed": Annotated[int, Bound(ge=0)],
    "print_stats": bool | Literal["auto"],
    "final_eval": bool,
    "wandb": dict,
}
"""Top-level keys and their types."""

REQUIRED = ("architecture", "training_set", "validation_set")
DEVICES = ("cpu", "cuda", "gpu", "mps", "multi-gpu")


def check_base_options(options: Any) -> None:
    """Check the top level and the dataset sections; ``ValueError`` naming the key."""
    if not isinstance(options, Mapping):
        raise ValueError(f"expected a mapping of options, got {type(options).__name__}")
    for key in options:
        if key not in BASE_TYPES:
            close = difflib.get_close_matches(str(key), list(BASE_TYPES), n=1, cutoff=0.5)
            hint = f" Did you mean '{close[0]}'?" if close else ""
            raise ValueError(
                f"{key}: unknown key of a metatrain options file; valid: "
                f"{', '.join(BASE_TYPES)}.{hint}"
            )
    for key in REQUIRED:
        if key not in options:
            raise ValueError(f"{key}: missing (required in a metatrain options file)")
    for key, value in options.items():
        check_value(value, BASE_TYPES[key], key)
    check_required(options["architecture"], ["name"], "architecture")
    if "device" in options and options["device"] not in DEVICES:
        raise ValueError(f"device: expected one of {', '.join(DEVICES)}, got {options['device']!r}")
    check_dataset(options["training_set"], "training_set", training=True)
    for key in ("validation_set", "test_set"):
        if key in options:
            check_dataset(options[key], key, training=False)


def check_dataset(value: Any, path: str, *, training: bool) -> None:
    """A training set (mapping, list of mappings, file) or a validation/test set (also
    ``{indices: ...}`` or a fraction in [0, 1))."""
    if isinstance(value, str):
        return
    if isinstance(value, list):
        if not value:
            raise ValueError(f"{path}: an empty list of datasets")
        for index, item in enumerate(value):
            _check_dataset_mapping(item, f"{path}.{index}")
        return
    if isinstance(value, Mapping):
        if not training and set(value) == {"indices"}:
            check_value(value["indices"], list[int] | str, f"{path}.indices")
            return
        _check_dataset_mapping(value, path)
        return
    if not training and isinstance(value, (int, float)) and not isinstance(value, bool):
        if not 0.0 <= value < 1.0:
            raise ValueError(f"{path}: a fraction must be in [0, 1), got {value}")
        return
    forms = "a file, a dataset mapping or a list of them"
    if not training:
        forms += ", {indices: ...} or a fraction in [0, 1)"
    raise ValueError(f"{path}: expected {forms}, got {value!r} ({type(value).__name__})")


def _check_dataset_mapping(value: Any, path: str) -> None:
    check_value(value, DatasetOptions, path)
    check_required(value, ["systems", "targets"], path)
    for name, target in value["targets"].items():
        if not isinstance(target, Mapping):
            continue
        if "sample_kind" in target and "per_atom" in target:
            kind = "atom" if target["per_atom"] else "system"
            if target["sample_kind"] != kind:
                raise ValueError(
                    f"{path}.targets.{name}: per_atom: {target['per_atom']} means sample_kind "
                    f"'{kind}', but sample_kind is '{target['sample_kind']}'"
                )
        if target.get("stress") and target.get("virial"):
            raise ValueError(f"{path}.targets.{name}: give either 'stress' or 'virial', not both")
