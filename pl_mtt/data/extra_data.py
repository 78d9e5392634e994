"""Extra data (masks, sample weights, ...): from ``.mts`` files, split per structure, or
from the structure file itself.

.. code-block:: yaml

    extra_data:
      mtt::dos_mask:
        read_from: dos_mask.mts     # one TensorMap for the whole dataset
      config_weight:
        key: config_weight          # an info key of each structure of the (ext)xyz file
      atom_weight:
        key: atom_weight            # an arrays key: one value per atom
        per_atom: true              # default: detected (an arrays key is per atom)

An ``.mts`` file holds one TensorMap whose samples have a ``system`` column indexing the
structures of the dataset (0..n_structures-1). It is split into one TensorMap per
structure (``system`` 0, other sample columns kept, rows sorted), gradient blocks included, and
batched like the targets. A mask ``<target>_mask`` has the metadata of its target.

Without ``read_from`` (or with ``read_from`` naming the structure file) the entry is read
from the structure file like a target: ``key`` (default: the entry's name) is an
``info`` key (one row per structure, samples ``system``) or an ``arrays`` key (one row
per atom, samples ``system, atom``), with properties ``properties`` 0..P-1.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import metatensor.torch as mts
import numpy as np
import torch
from metatensor.torch import Labels, TensorBlock, TensorMap

from pl_mtt.config import check_known_keys, to_plain
from pl_mtt.data.layout import property_labels, structure_tensor_map
from pl_mtt.data.targets import available_keys, find_value, is_per_atom_key

__all__ = ["read_extra_data", "read_extra_data_from_frames", "split_by_system"]

EXTRA_DATA_OPTION_KEYS = (
    "read_from",
    "reader",
    "key",
    "quantity",
    "unit",
    "per_atom",
    "type",
    "num_subtargets",
    "description",
)


def read_extra_data(
    name: str,
    options: Mapping[str, Any] | str,
    n_structures: int,
    dtype: torch.dtype = torch.float64,
) -> list[TensorMap]:
    """Load ``options["read_from"]`` (an ``.mts`` file) and split it per structure.

    ``options`` may also be the path itself. Raises ``ValueError`` naming the entry and
    the path for a missing/unreadable file or samples that do not fit the dataset.
    """
    options = to_plain(options)
    if isinstance(options, (str, Path)):
        options = {"read_from": str(options)}
    if not isinstance(options, Mapping) or not options.get("read_from"):
        raise ValueError(f"extra_data.{name}: expected a mapping with 'read_from: <file.mts>'")
    check_known_keys(options, EXTRA_DATA_OPTION_KEYS, f"extra_data.{name}", "option")
    if options.get("reader") not in (None, "metatensor"):
        raise ValueError(f"extra_data.{name}.reader: only 'metatensor' (.mts) is available")
    path = Path(options["read_from"])
    if not path.is_file():
        raise ValueError(f"extra_data.{name}: file '{path}' does not exist")
    try:
        tensor_map = mts.load(str(path))
    except Exception as error:
        raise ValueError(
            f"extra_data.{name}: could not load '{path}' as a metatensor TensorMap: {error}"
        ) from error
    tensor_map = tensor_map.to(dtype=dtype)
    try:
        return split_by_system(tensor_map, n_structures)
    except ValueError as error:
        raise ValueError(f"extra_data.{name} ('{path}'): {error}") from None


def read_extra_data_from_frames(
    name: str,
    options: Mapping[str, Any] | None,
    frames: Sequence[Any],
    path: str,
    dtype: torch.dtype = torch.float64,
) -> list[TensorMap]:
    """Read extra-data entry ``name`` from the ``info``/``arrays`` of the structures of
    ``path`` (``frames``, ``ase.Atoms``): one TensorMap per structure.

    Raises ``ValueError`` naming ``extra_data.<name>``, the key, the structure and the
    file when a structure lacks the key or its values do not fit.
    """
    options = dict(to_plain(options) or {})
    check_known_keys(options, EXTRA_DATA_OPTION_KEYS, f"extra_data.{name}", "option")
    if options.get("reader") not in (None, "ase"):
        raise ValueError(
            f"extra_data.{name}.reader: read from '{path}' itself with ase; remove 'reader' "
            f"or give 'read_from: <file.mts>'"
        )
    key = str(options.get("key") or name)
    values = []
    for index, atoms in enumerate(frames):
        try:
            value = find_value(atoms, key)
        except ValueError as error:
            raise ValueError(f"extra_data.{name}: structure {index} of '{path}': {error}") from None
        if value is None:
            raise ValueError(
                f"extra_data.{name}: key '{key}' not found in structure {index} of '{path}' "
                f"(available: {available_keys(atoms)})"
            )
        values.append(value)
    per_atom = options.get("per_atom")
    if per_atom is None:
        per_atom = bool(frames) and is_per_atom_key(frames[0], key)
    result = []
    n_properties = None
    for index, (value, atoms) in enumerate(zip(values, frames, strict=True)):
        if per_atom:
            if value.ndim == 0 or value.shape[0] != len(atoms):
                raise ValueError(
                    f"extra_data.{name}: per-atom key '{key}' of structure {index} of "
                    f"'{path}' has shape {value.shape}, expected {len(atoms)} rows (one per atom)"
                )
            rows = value.reshape(len(atoms), -1)
        else:
            rows = value.reshape(1, -1)
        if n_properties is None:
            n_properties = rows.shape[1]
            expected = options.get("num_subtargets")
            if expected is not None and int(expected) != n_properties:
                raise ValueError(
                    f"extra_data.{name}.num_subtargets: {expected} given but key '{key}' has "
                    f"{n_properties} values per sample"
                )
        elif rows.shape[1] != n_properties:
            raise ValueError(
                f"extra_data.{name}: key '{key}' has {rows.shape[1]} values per sample in "
                f"structure {index} of '{path}', {n_properties} in structure 0"
            )
        result.append(
            structure_tensor_map(
                torch.from_numpy(np.ascontiguousarray(rows)).to(dtype),
                property_labels(n_properties, False),
                per_atom=bool(per_atom),
            )
        )
    return result


def reads_structure_file(options: Mapping[str, Any] | str | None, path: str | Path) -> bool:
    """Whether an extra-data entry is read from the structure file ``path`` itself (no
    ``read_from``, or ``read_from`` naming ``path``) rather than from an ``.mts`` file."""
    options = to_plain(options)
    if isinstance(options, (str, Path)):
        return False
    read_from = (options or {}).get("read_from") if isinstance(options, Mapping) else None
    return read_from is None or same_file(read_from, path)


def same_file(a: str | Path, b: str | Path) -> bool:
    """Whether two paths name the same file (compared as given when they cannot be
    resolved)."""
    try:
        return Path(a).resolve() == Path(b).resolve()
    except OSError:
        return str(a) == str(b)


def _split_block(block: TensorBlock, n_structures: int) -> list[TensorBlock]:
    names = block.samples.names
    if "system" not in names:
        raise ValueError(f"samples {names} have no 'system' column")
    samples = block.samples.values
    column = names.index("system")
    system = samples[:, column].to(torch.int64)
    if len(system) and (int(system.min()) < 0 or int(system.max()) >= n_structures):
        raise ValueError(
            f"'system' sample values must be in 0..{n_structures - 1} (the dataset has "
            f"{n_structures} structures), got {int(system.min())}..{int(system.max())}"
        )
    # canonical order: by system, then by the other sample columns (as the targets)
    columns = samples.to(torch.int64).numpy()
    others = [columns[:, c] for c in reversed(range(len(names))) if c != column]
    order = torch.from_numpy(np.lexsort([*others, columns[:, column]]).astype(np.int64))
    counts = torch.bincount(system, minlength=n_structures).tolist()
    starts = [0, *torch.cumsum(torch.tensor(counts), 0).tolist()]
    sorted_samples = samples[order].clone()
    sorted_samples[:, column] = 0
    values = block.values[order]

    # gradient rows follow their value row: new row = position of the old row in `order`
    new_row = torch.empty_like(order)
    new_row[order] = torch.arange(len(order))
    gradients = []
    for gradient_name, gradient in block.gradients():
        g_samples = gradient.samples.values
        g_row = new_row[g_samples[:, 0].to(torch.int64)]
        g_order = torch.argsort(g_row, stable=True)
        g_row = g_row[g_order]
        g_samples = g_samples[g_order].clone()
        g_system = system[order][g_row]
        g_counts = torch.bincount(g_system, minlength=n_structures).tolist()
        g_starts = [0, *torch.cumsum(torch.tensor(g_counts), 0).tolist()]
        # local row index within the structure, other columns: system -> 0
        g_samples[:, 0] = (g_row - torch.tensor(starts[:-1])[g_system]).to(g_samples.dtype)
        g_names = gradient.samples.names
        if "system" in g_names:
            g_samples[:, g_names.index("system")] = 0
        gradients.append((gradient_name, gradient, gradient.values[g_order], g_samples, g_starts))

    result = []
    for index in range(n_structures):
        lo, hi = starts[index], starts[index + 1]
        new = TensorBlock(
            values[lo:hi],
            Labels(names, sorted_samples[lo:hi], assume_unique=True),
            block.components,
            block.properties,
        )
        for gradient_name, gradient, g_values, g_samples, g_starts in gradients:
            g_lo, g_hi = g_starts[index], g_starts[index + 1]
            new.add_gradient(
                gradient_name,
                TensorBlock(
                    g_values[g_lo:g_hi],
                    Labels(gradient.samples.names, g_samples[g_lo:g_hi], assume_unique=True),
                    gradient.components,
                    gradient.properties,
                ),
            )
        result.append(new)
    return result


def split_by_system(tensor_map: TensorMap, n_structures: int) -> list[TensorMap]:
    """One TensorMap per structure (``system`` column reset to 0), gradients included.

    Rows are sorted by ``system``, then by the other sample columns in order (the
    order of the targets' rows, e.g. ``atom`` 0..n-1); gradient rows follow the value
    row they belong to. A structure with no rows gets
    empty blocks.
    """
    per_block = [_split_block(block, n_structures) for block in tensor_map.blocks()]
    return [
        TensorMap(tensor_map.keys, [blocks[index] for blocks in per_block])
        for index in range(n_structures)
    ]
