"""Convert a structure file to metatrain's disk formats, one structure at a time.

.. code-block:: bash

    python -m pl_mtt.data.convert train.xyz train.zip          # DiskDataset zip
    python -m pl_mtt.data.convert train.xyz train_dir/         # MemmapDataset directory
    python -m pl_mtt.data.convert train.xyz train.zip \\
        --targets "{energy: {key: dft_energy, forces: dft_forces}}" \\
        --extra-data "{energy_mask: {read_from: mask.mts}, weight: {key: config_weight}}"
    python -m pl_mtt.data.convert train.zip train_dir/         # between the disk formats

The input is read frame by frame (``ase.io.iread``), never whole. Target options are
those of :func:`pl_mtt.data.read_targets`; what they leave open (forces and stress of an
energy, per-atom or not) is decided on the first structure, and a later structure that
lacks a detected entry, or has one that was not detected, is an error naming it, so
nothing is dropped without a word. Extra data come from a ``.mts`` file (``read_from``,
held in memory) or from a key of each frame's ``info``/``arrays``. Reading the output
with the same options (:func:`pl_mtt.data.open_dataset`) gives the same structures and
TensorMaps back (a directory stores float32).
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any

import ase
import ase.io
import numpy as np
import torch
import yaml
from metatensor.torch import TensorMap

from pl_mtt.config import is_energy_like, to_plain
from pl_mtt.data.extra_data import read_extra_data_from_frames, same_file, split_by_system
from pl_mtt.data.sources import ASE, dataset_format, open_dataset, write_dataset
from pl_mtt.data.systems import atoms_to_system
from pl_mtt.data.targets import find_value, gradient_source, read_targets

__all__ = ["convert", "main"]

DEFAULT_TARGETS = {"energy": {}}


def _frames(path: str) -> Iterator[ase.Atoms]:
    if not Path(path).is_file():
        raise ValueError(f"structure file '{path}' does not exist")
    try:
        yield from ase.io.iread(path, index=":")
    except ValueError:
        raise
    except Exception as error:  # ase raises many exception types for bad files
        raise ValueError(
            f"could not read structures from '{path}' with ase.io.iread: "
            f"{type(error).__name__}: {error}"
        ) from error


def _fixed_options(user: Mapping[str, Any], resolved: Mapping[str, Any]) -> dict[str, Any]:
    """Options decided on the first frame, keeping the user's gradient keys."""
    fixed = {**user, **{k: resolved[k] for k in ("key", "per_atom", "num_subtargets")}}
    for option in ("forces", "stress", "virial"):
        given = user.get(option)
        fixed[option] = (
            given if resolved[option] and given not in (None, True) else resolved[option]
        )
    fixed.pop("read_from", None)
    return fixed


def _undetected_gradients(
    targets: Mapping[str, Any], resolved: Mapping[str, Mapping[str, Any]]
) -> dict[str, list[tuple[str, str]]]:
    """Per target, the ``(option, key)`` left off by detection on the first frame."""
    result = {}
    for name, options in targets.items():
        if not is_energy_like(name, options) or resolved[name]["per_atom"]:
            continue
        result[name] = [
            (option, gradient_source(name, option, None, "")[1])
            for option in ("forces", "stress", "virial")
            if (options or {}).get(option) is None and not resolved[name][option]
        ]
    return result


class _ExtraData:
    """Extra data per frame: a ``.mts`` file (split once) or an info/arrays key."""

    def __init__(self, input_path: str, options: Mapping[str, Any], dtype: torch.dtype) -> None:
        self.from_files: dict[str, list[TensorMap]] = {}
        self.from_keys: dict[str, dict[str, Any]] = {}  # name -> options
        self.counts: dict[str, int] = {}
        for name, entry in options.items():
            entry = to_plain(entry) or {}
            if isinstance(entry, str):
                entry = {"read_from": entry}
            if entry.get("read_from") and not same_file(entry["read_from"], input_path):
                import metatensor.torch as mts

                try:
                    tensor_map = mts.load(str(entry["read_from"])).to(dtype=dtype)
                except Exception as error:
                    raise ValueError(
                        f"extra_data.{name}: could not load '{entry['read_from']}' as a "
                        f"metatensor TensorMap: {error}"
                    ) from error
                systems = [
                    int(block.samples.column("system").max()) + 1
                    for block in tensor_map.blocks()
                    if len(block.samples)
                ]
                count = max(systems, default=0)
                self.counts[name] = count
                self.from_files[name] = split_by_system(tensor_map, count)
            else:
                self.from_keys[name] = entry

    def for_frame(
        self, index: int, atoms: ase.Atoms, path: str, dtype: torch.dtype
    ) -> dict[str, TensorMap]:
        extra = {}
        for name, values in self.from_files.items():
            if index >= len(values):
                raise ValueError(
                    f"extra_data.{name}: its file has {len(values)} structures, '{path}' has more"
                )
            extra[name] = values[index]
        for name, options in self.from_keys.items():
            try:
                (extra[name],) = read_extra_data_from_frames(name, options, [atoms], path, dtype)
            except ValueError as error:
                message = str(error).replace("structure 0 ", f"structure {index} ")
                raise ValueError(message) from None
        return extra

    def check_count(self, written: int) -> None:
        for name, count in self.counts.items():
            if count > written:
                raise ValueError(
                    f"extra_data.{name}: its file has {count} structures, the input has {written}"
                )


def _items(
    path: str,
    targets: Mapping[str, Any],
    extra: _ExtraData,
    resolved_out: dict[str, dict[str, Any]],
    dtype: torch.dtype,
) -> Iterator[tuple]:
    fixed: dict[str, Any] | None = None
    undetected: dict[str, list[tuple[str, str]]] = {}
    for index, atoms in enumerate(_frames(path)):
        options = targets if fixed is None else fixed
        try:
            tensors, resolved = read_targets(path, options, frames=[atoms], dtype=dtype)
        except ValueError as error:
            message = str(error).replace("structure 0 ", f"structure {index} ")
            raise ValueError(message) from None
        if fixed is None:
            resolved_out.update(resolved)
            fixed = {
                name: _fixed_options(to_plain(targets[name]) or {}, resolved[name])
                for name in targets
            }
            undetected = _undetected_gradients(targets, resolved)
        for name, missing in undetected.items():
            for option, key in missing:
                periodic = bool(np.all(atoms.pbc))
                if (option == "forces" or periodic) and find_value(atoms, key) is not None:
                    raise ValueError(
                        f"targets.{name}.{option}: structure {index} of '{path}' has '{key}' "
                        f"but structure 0 has not, so it was not detected; give "
                        f"{option}: true (or false) explicitly"
                    )
        yield (
            atoms_to_system(atoms, dtype),
            {name: values[0] for name, values in tensors.items()},
            extra.for_frame(index, atoms, path, dtype),
        )


def convert(
    input_path: str | Path,
    output_path: str | Path,
    targets: Mapping[str, Any] | None = None,
    extra_data: Mapping[str, Any] | None = None,
    overwrite: bool = False,
) -> tuple[int, dict[str, dict[str, Any]]]:
    """Write the structures of ``input_path`` to ``output_path`` (``.zip`` or a
    directory), one at a time.

    Args:
        input_path: any file ``ase.io.iread`` reads, or a zip/directory dataset.
        output_path: ``*.zip`` (DiskDataset) or a directory (MemmapDataset).
        targets: target name -> options (default ``{energy: {}}``: an energy with forces
            and stress when present).
        extra_data: name -> ``{read_from: file.mts}`` or ``{key: <info/arrays key>}``.
        overwrite: replace an existing output file (a directory must be empty).

    Returns:
        ``(number of structures, resolved target options)``.
    """
    input_path, output_path = str(input_path), str(output_path)
    targets = dict(to_plain(targets) or DEFAULT_TARGETS)
    extra_data = dict(to_plain(extra_data) or {})
    kind = dataset_format(output_path)
    if kind == ASE:
        raise ValueError(
            f"convert: the output '{output_path}' must be a .zip or a directory (ending in '/')"
        )
    if Path(output_path).is_file() and not overwrite:
        raise ValueError(f"convert: '{output_path}' exists (pass overwrite=True / --overwrite)")
    for name, options in targets.items():
        source = (options or {}).get("read_from") if isinstance(options, Mapping) else None
        if source is not None and not same_file(source, input_path):
            raise ValueError(
                f"targets.{name}.read_from: convert reads every target from the input "
                f"'{input_path}', got '{source}'"
            )
    if dataset_format(input_path) != ASE:
        dataset = open_dataset(input_path, targets, extra_data)
        extra_options = {
            name: {"key": (opts or {}).get("key") or name}
            for name, opts in extra_data.items()
            if not (opts or {}).get("read_from")
        }
        count = write_dataset(output_path, dataset, None, extra_options or None)
        return count, dataset.target_options
    dtype = torch.float64
    extra = _ExtraData(input_path, extra_data, dtype)
    resolved: dict[str, dict[str, Any]] = {}
    items = _items(input_path, targets, extra, resolved, dtype)
    first = next(items, None)
    if first is None:
        raise ValueError(f"structure file '{input_path}' contains no structures")
    writer_options = {
        name: _fixed_options(to_plain(targets[name]) or {}, resolved[name]) for name in targets
    }
    extra_options = {
        name: {"key": str(options.get("key") or name)} for name, options in extra.from_keys.items()
    }
    extra_options.update({name: {} for name in extra.from_files})

    def stream() -> Iterator[tuple]:
        yield first
        yield from items

    count = write_dataset(output_path, stream(), writer_options, extra_options)
    extra.check_count(count)
    return count, resolved


def _yaml_mapping(text: str | None, what: str) -> dict[str, Any] | None:
    if text is None:
        return None
    try:
        value = yaml.safe_load(text)
    except yaml.YAMLError as error:
        raise ValueError(f"{what}: not valid YAML: {error}") from None
    if not isinstance(value, dict):
        raise ValueError(f"{what}: expected a mapping such as '{{energy: {{key: E}}}}'")
    return value


def main(argv: list[str] | None = None) -> int:
    """Command-line entry point (``python -m pl_mtt.data.convert``)."""
    parser = argparse.ArgumentParser(
        prog="python -m pl_mtt.data.convert",
        description="Convert a structure file (extxyz, ...) or dataset to metatrain's "
        "DiskDataset zip (output.zip) or MemmapDataset directory (output_dir/).",
    )
    parser.add_argument("input", help="input: any file ase reads, a .zip or a directory")
    parser.add_argument("output", help="output: name.zip or a directory (trailing /)")
    parser.add_argument("--targets", help="target options as YAML (default: {energy: {}})")
    parser.add_argument("--extra-data", help="extra data options as YAML")
    parser.add_argument("--overwrite", action="store_true", help="replace an existing zip")
    args = parser.parse_args(argv)
    try:
        count, resolved = convert(
            args.input,
            args.output,
            _yaml_mapping(args.targets, "--targets"),
            _yaml_mapping(args.extra_data, "--extra-data"),
            overwrite=args.overwrite,
        )
    except ValueError as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    described = []
    for name, options in resolved.items():
        gradients = [g for g in ("forces", "stress", "virial") if options.get(g)]
        described.append(name + (f" ({', '.join(gradients)})" if gradients else ""))
    print(f"wrote {count} structures to {args.output}: {', '.join(described)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
