"""``pl_mtt.calculator(path)``: an ASE calculator for an exported model or a checkpoint.

.. code-block:: python

    import pl_mtt
    atoms.calc = pl_mtt.calculator("outputs/<run>/model-metatomic.pt")   # exported file
    atoms.calc = pl_mtt.calculator("outputs/<run>/checkpoints/last.ckpt")  # exported in memory

It is metatomic's own ``MetatomicCalculator`` (energies, per-atom energies, forces and
stress by autograd; the neighbour lists the model requests computed by vesin), with the
model's TorchScript extensions loaded from ``extensions/`` next to the file when that
directory exists.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from pl_mtt.interop.export import atomistic_model

__all__ = ["calculator", "is_exported_model"]


def is_exported_model(path: str | Path) -> bool:
    """Whether ``path`` is an exported metatomic model (not a checkpoint)."""
    from metatomic.torch import check_atomistic_model

    try:
        check_atomistic_model(str(path))
    except Exception:  # metatomic raises RuntimeError/ValueError for other files
        return False
    return True


def calculator(
    path: str | Path,
    *,
    extensions_directory: str | Path | None = None,
    unscaled: bool = False,
    **options: Any,
) -> Any:
    """metatomic's ASE calculator for ``path``.

    Args:
        path: a file written by :func:`pl_mtt.interop.export_model` (``python -m
            pl_mtt.export``, or the app's ``model-metatomic.pt``), or a Lightning
            checkpoint of an ``AtomisticTask`` (exported in memory).
        extensions_directory: where the model's TorchScript extensions are (default:
            ``extensions/`` next to ``path`` when it exists).
        unscaled: for a checkpoint without fitted scales (see ``export_model``).
        options: passed to ``metatomic_ase.MetatomicCalculator`` (``device``,
            ``check_consistency``, ``uncertainty_threshold``, ...).
    """
    from metatomic_ase import MetatomicCalculator

    path = Path(path)
    if not path.is_file():
        raise ValueError(f"calculator: '{path}' does not exist")
    if extensions_directory is None and (path.parent / "extensions").is_dir():
        extensions_directory = path.parent / "extensions"
    if is_exported_model(path):
        return MetatomicCalculator(
            str(path),
            extensions_directory=None
            if extensions_directory is None
            else str(extensions_directory),
            **options,
        )
    model = torch.jit.script(atomistic_model(path, unscaled=unscaled))
    return MetatomicCalculator(model, **options)
