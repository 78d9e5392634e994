"""Target and extra-data options of the disk formats: the same grammar as for extxyz.

.. code-block:: yaml

    targets:
      energy:
        key: energy          # zip: member <i>/energy.mts; memmap: energy.bin
        forces: true         # true/false/null (null: when stored), a key, or {key: ...}
        stress: true
      mtt::charges: {key: charges, per_atom: true}
    extra_data:
      energy_mask: {key: energy_mask}            # a field of the zip / directory
      mtt::dos_mask: {read_from: dos_mask.mts}   # or a separate .mts file

In a zip, forces and stress are gradients stored inside the target's member, so their
keys are not used; in a memmap directory they name ``<key>.bin`` files (default
``forces``, ``stress``, ``virial``). ``read_from`` of a target must be the dataset itself.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from pl_mtt.config import check_known_keys, is_energy_like, to_plain
from pl_mtt.data.extra_data import EXTRA_DATA_OPTION_KEYS, reads_structure_file, same_file
from pl_mtt.data.targets import TARGET_OPTION_KEYS, gradient_source

__all__ = ["DiskExtraOptions", "DiskTargetOptions", "parse_extra_options", "parse_target_options"]


@dataclass
class DiskTargetOptions:
    """One target's options as given, checked: what the readers resolve against a file."""

    name: str
    options: dict[str, Any]
    energy_like: bool
    key: str
    per_atom: bool | None
    num_subtargets: int | None
    # forces / stress / virial -> (True/False/None (= when stored), key)
    gradients: dict[str, tuple[bool | None, str]]

    def resolved(self, path: str, per_atom: bool, num_subtargets: int, on: dict[str, bool]):
        """The resolved options (the form :func:`pl_mtt.data.read_targets` returns)."""
        resolved: dict[str, Any] = {
            "quantity": self.options.get("quantity") or ("energy" if self.energy_like else ""),
            "key": self.key,
            "unit": self.options.get("unit") or ("eV" if self.energy_like else ""),
            "per_atom": per_atom,
            "type": self.options.get("type", "scalar"),
            "read_from": path,
            "num_subtargets": num_subtargets,
        }
        if self.options.get("description"):
            resolved["description"] = self.options["description"]
        for option in ("forces", "stress", "virial"):
            resolved[option] = bool(on.get(option, False))
        return resolved

    def check_found(self, found: Mapping[str, bool], where: str) -> dict[str, bool]:
        """Which gradients to read: requested ones must be ``found``; unrequested
        (``None``) ones are read when found; stress wins over virial when both are."""
        on: dict[str, bool] = {}
        for option, (requested, key) in self.gradients.items():
            if requested and not found.get(option, False):
                raise ValueError(
                    f"targets.{self.name}.{option}: requested, but {where} has no {option} "
                    f"(key '{key}'); set {option}: false or point it at the right key"
                )
            on[option] = bool(found.get(option, False)) if requested is None else requested
        if on.get("stress") and on.get("virial"):
            if self.gradients["virial"][0] is None:
                on["virial"] = False
            elif self.gradients["stress"][0] is None:
                on["stress"] = False
        return on


def parse_target_options(name: str, options: Any, path: str) -> DiskTargetOptions:
    """Check one target's options for a disk dataset at ``path``.

    Raises:
        ValueError: naming ``targets.<name>.<key>`` for an unknown key, a ``reader``, a
            ``read_from`` other than ``path``, gradients on a target that is not
            energy-like or is per atom, or both stress and virial.
    """
    options = to_plain(options) or {}
    if not isinstance(options, Mapping):
        raise ValueError(f"targets.{name}: expected a mapping of options, got {options!r}")
    options = dict(options)
    check_known_keys(options, TARGET_OPTION_KEYS, f"targets.{name}", "target option")
    if options.get("reader") is not None:
        raise ValueError(
            f"targets.{name}.reader: the targets of '{path}' are read from the dataset "
            f"itself; remove 'reader'"
        )
    read_from = options.get("read_from")
    if read_from is not None and not same_file(read_from, path):
        raise ValueError(
            f"targets.{name}.read_from: the targets of '{path}' are read from the dataset "
            f"itself, got '{read_from}'"
        )
    energy_like = is_energy_like(name, options)
    gradients = {}
    for option in ("forces", "stress", "virial"):
        on, key, source = gradient_source(name, option, options.get(option), path)
        if on and not same_file(source, path):
            raise ValueError(
                f"targets.{name}.{option}.read_from: gradients of '{path}' are read from the "
                f"dataset itself, got '{source}'"
            )
        gradients[option] = (on, key)
    requested = [option for option, (on, _) in gradients.items() if on]
    per_atom = options.get("per_atom")
    if requested and not energy_like:
        raise ValueError(
            f"targets.{name}.{requested[0]}: '{requested[0]}' is only available for "
            f"energy-like targets (quantity: energy or the name 'energy')"
        )
    if requested and per_atom:
        raise ValueError(f"targets.{name}.{requested[0]}: not available for a per-atom target")
    if gradients["stress"][0] and gradients["virial"][0]:
        raise ValueError(f"targets.{name}: give either 'stress' or 'virial', not both")
    if not energy_like or per_atom:
        gradients = {option: (False, key) for option, (_, key) in gradients.items()}
    num_subtargets = options.get("num_subtargets")
    return DiskTargetOptions(
        name=name,
        options=options,
        energy_like=energy_like,
        key=str(options.get("key") or name),
        per_atom=None if per_atom is None else bool(per_atom),
        num_subtargets=None if num_subtargets is None else int(num_subtargets),
        gradients=gradients,
    )


@dataclass
class DiskExtraOptions:
    """One extra-data field: from the dataset (``key``) or a separate ``.mts`` file."""

    name: str
    options: dict[str, Any]
    key: str
    per_atom: bool | None
    num_subtargets: int | None
    external: bool  # read_from a separate .mts file


def parse_extra_options(name: str, options: Any, path: str) -> DiskExtraOptions:
    """Check one extra-data entry for a disk dataset at ``path``."""
    options = to_plain(options)
    if options is None:
        options = {}
    if isinstance(options, (str, Path)):
        options = {"read_from": str(options)}
    if not isinstance(options, Mapping):
        raise ValueError(f"extra_data.{name}: expected a mapping of options, got {options!r}")
    options = dict(options)
    check_known_keys(options, EXTRA_DATA_OPTION_KEYS, f"extra_data.{name}", "option")
    external = not reads_structure_file(options, path)
    if not external and options.get("reader") is not None:
        raise ValueError(
            f"extra_data.{name}.reader: read from '{path}' itself; remove 'reader' or give "
            f"'read_from: <file.mts>'"
        )
    per_atom = options.get("per_atom")
    num_subtargets = options.get("num_subtargets")
    return DiskExtraOptions(
        name=name,
        options=options,
        key=str(options.get("key") or name),
        per_atom=None if per_atom is None else bool(per_atom),
        num_subtargets=None if num_subtargets is None else int(num_subtargets),
        external=external,
    )
