"""Embedded datasets: generated deterministically, cached as files, read back normally.

.. code-block:: python

    data = embedded_dataset("emt")          # or "dos"
    data.path, data.targets, data.extra_data
    AtomisticDataset.from_file(data.path, data.targets, data.extra_data)

Files go to ``$PL_MTT_CACHE`` (default ``~/.cache/pl_mtt``); they are written to a
temporary name and renamed, so concurrent processes (DDP ranks) never see half a file.

========  =========  ============================================================
name      default n  content
========  =========  ============================================================
``emt``   300        Cu/Au bulk and slabs (8-32 atoms), EMT energy/forces/stress
``dos``   200        same kind of cells, tight-binding DOS ``mtt::dos`` (130 points
                     at 0.05 eV) and mask ``mtt::dos_mask`` (``.mts``)
========  =========  ============================================================
"""

from __future__ import annotations

import os
import tempfile
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import ase.io
import metatensor.torch as mts

from pl_mtt.data import dos as dos_data
from pl_mtt.data.emt import generate_emt_structures

__all__ = ["EmbeddedDataset", "cache_dir", "embedded_dataset", "embedded_dataset_names"]

VERSION = 1


@dataclass(frozen=True)
class EmbeddedDataset:
    """Where an embedded dataset lives and how to read it."""

    name: str
    path: str
    targets: dict[str, Any]
    extra_data: dict[str, Any] = field(default_factory=dict)
    info: dict[str, Any] = field(default_factory=dict)


def cache_dir() -> Path:
    """``$PL_MTT_CACHE`` or ``~/.cache/pl_mtt`` (created if needed)."""
    path = Path(os.environ.get("PL_MTT_CACHE") or Path.home() / ".cache" / "pl_mtt")
    path.mkdir(parents=True, exist_ok=True)
    return path


def _atomic_write(path: Path, write: Callable[[str], None]) -> None:
    handle, tmp = tempfile.mkstemp(dir=path.parent, prefix=path.name, suffix=".tmp")
    os.close(handle)
    try:
        write(tmp)
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)


def _write_frames(path: Path, frames) -> None:
    _atomic_write(path, lambda tmp: ase.io.write(tmp, frames, format="extxyz"))


def _emt(n_structures: int, seed: int, directory: Path) -> EmbeddedDataset:
    path = directory / f"emt-v{VERSION}-n{n_structures}-s{seed}.xyz"
    if not path.is_file():
        _write_frames(path, generate_emt_structures(n_structures, seed))
    targets = {"energy": {"quantity": "energy", "key": "energy", "unit": "eV"}}
    return EmbeddedDataset("emt", str(path), targets)


def _dos(n_structures: int, seed: int, directory: Path) -> EmbeddedDataset:
    stem = directory / f"dos-v{VERSION}-n{n_structures}-s{seed}"
    path, mask_path = stem.with_suffix(".xyz"), stem.with_suffix(".mts")
    if not (path.is_file() and mask_path.is_file()):
        frames, masks = dos_data.generate_dos_structures(n_structures, seed)
        tensor_map = dos_data.mask_tensor_map(masks)
        _atomic_write(mask_path, lambda tmp: mts.save(tmp, tensor_map))
        _write_frames(path, frames)
    targets = {
        "mtt::dos": {"quantity": "dos", "key": "dos", "unit": "states/eV", "per_atom": False}
    }
    extra_data = {"mtt::dos_mask": {"read_from": str(mask_path)}}
    info = {
        "n_points": dos_data.DOS_N_POINTS,
        "extra_targets": dos_data.DOS_EXTRA_TARGETS,
        "grid_spacing": dos_data.DOS_GRID_SPACING,
        "energy_min": dos_data.DOS_E_MIN,
        "broadening": dos_data.DOS_SIGMA,
    }
    return EmbeddedDataset("dos", str(path), targets, extra_data, info)


_REGISTRY: dict[str, tuple[Callable[[int, int, Path], EmbeddedDataset], int]] = {
    "emt": (_emt, 300),
    "dos": (_dos, 200),
}


def embedded_dataset_names() -> list[str]:
    """Names accepted by :func:`embedded_dataset`."""
    return sorted(_REGISTRY)


def embedded_dataset(
    name: str, n_structures: int | None = None, seed: int = 0, directory: str | Path | None = None
) -> EmbeddedDataset:
    """Generate (first use) or find (cached) the embedded dataset ``name``.

    ``n_structures`` defaults to the dataset's size (``emt`` 300, ``dos`` 200); the
    first ``n`` structures are the same whatever ``n``.
    """
    if name not in _REGISTRY:
        raise ValueError(
            f"unknown embedded dataset '{name}'; available: {', '.join(embedded_dataset_names())}"
        )
    make, default = _REGISTRY[name]
    n_structures = default if n_structures is None else int(n_structures)
    if n_structures < 1:
        raise ValueError(f"n_structures must be >= 1, got {n_structures}")
    directory = Path(directory) if directory is not None else cache_dir()
    directory.mkdir(parents=True, exist_ok=True)
    return make(n_structures, seed, directory)
