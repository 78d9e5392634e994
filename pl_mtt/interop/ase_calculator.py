"""``pl_mtt.calculator(path)``: an ASE calculator for an exported model or a checkpoint.

.. code-block:: python

    import pl_mtt
    atoms.calc = pl_mtt.calculator("outputs/<run>/model-metatomic.pt")   # exported file
    atoms.calc = pl_mtt.calculator("outputs/<run>/checkpoints/last.ckpt")  # exported in memory

It is metatomic's own ``MetatomicCalculator`` (energies, per-atom energies, forces and
stress by autograd; the neighbour lists the model requests computed by vesin), with the
model's TorchScript extensions loaded from ``extensions/`` next to the file when that
directory exists.

Extensions: loading an extension's library is not always enough. sphericart (SOAP-BPNN)
registers the autograd formulas of its operators from its Python package: a process that
only loads the library computes silently wrong forces (torch warns that no autograd
kernel is registered). The calculator therefore imports the Python package of every
extension the file records (``sphericart_torch`` -> ``sphericart.torch``), and warns
when one is not installed.
"""

from __future__ import annotations

import importlib
import json
import warnings
import zipfile
from pathlib import Path
from typing import Any

import torch

from pl_mtt.interop.export import atomistic_model

__all__ = ["calculator", "import_extension_packages", "is_exported_model", "recorded_extensions"]


def is_exported_model(path: str | Path) -> bool:
    """Whether ``path`` is an exported metatomic model (not a checkpoint)."""
    from metatomic.torch import check_atomistic_model

    try:
        check_atomistic_model(str(path))
    except Exception:  # metatomic raises RuntimeError/ValueError for other files
        return False
    return True


def recorded_extensions(path: str | Path) -> list[str]:
    """Names of the TorchScript extensions an exported model records (``[]`` if none)."""
    with zipfile.ZipFile(path) as archive:
        for member in archive.namelist():
            if member.endswith("/extra/extensions"):
                return [entry["name"] for entry in json.loads(archive.read(member) or "[]")]
    return []


def import_extension_packages(path: str | Path) -> list[str]:
    """Import the Python package of each extension recorded in ``path`` (``<name>_torch``
    -> ``<name>.torch``), which registers what the library alone does not (autograd
    formulas); returns the packages imported, warns for the missing ones."""
    imported = []
    for name in recorded_extensions(path):
        package = name.removesuffix("_torch") + ".torch" if name.endswith("_torch") else name
        try:
            importlib.import_module(package)
        except ImportError:
            warnings.warn(
                f"the model '{path}' uses the TorchScript extension '{name}', whose Python "
                f"package '{package}' is not installed: its library is loaded from the "
                f"extensions directory, but gradients through it (forces, stress) may be "
                f"wrong; install the package",
                stacklevel=2,
            )
        else:
            imported.append(package)
    return imported


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
        import_extension_packages(path)  # before the libraries: autograd formulas
        extensions = None if extensions_directory is None else str(extensions_directory)
        return MetatomicCalculator(str(path), extensions_directory=extensions, **options)
    model = torch.jit.script(atomistic_model(path, unscaled=unscaled))
    return MetatomicCalculator(model, **options)
