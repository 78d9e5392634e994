"""Explicit splits: index lists or index files (metatrain's ``indices/*.txt`` format).

.. code-block:: yaml

    data:
      path: all.xyz
      indices: outputs/<run>/indices/training.txt   # the training structures of all.xyz
      val_set: {indices: outputs/<run>/indices/validation.txt}   # also structures of all.xyz
      test_set: {path: test.xyz}                    # or another file (its own targets)

An index file holds one 0-based integer per line (what ``mtt train`` writes into its
``indices/`` folder and what :func:`write_indices` writes); an empty file is an empty set.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Sequence
from pathlib import Path

__all__ = ["check_indices", "read_indices", "write_indices"]


def read_indices(spec: Sequence[int] | str | Path, what: str) -> list[int]:
    """A list of indices, or the indices in a text file (one integer per line).

    ``what`` names the config key in errors (``data.val_set.indices``...).
    """
    if isinstance(spec, (str, Path)):
        path = Path(spec)
        if not path.is_file():
            raise ValueError(f"{what}: index file '{path}' does not exist")
        values = []
        for number, line in enumerate(path.read_text().splitlines(), start=1):
            text = line.strip()
            if not text or text.startswith("#"):
                continue
            try:
                value = float(text)
            except ValueError:
                value = None
            if value is None or value != int(value):
                raise ValueError(
                    f"{what}: line {number} of '{path}' is {text!r}, expected one integer"
                )
            values.append(int(value))
        return values
    if isinstance(spec, (bytes, dict)) or not isinstance(spec, Sequence):
        raise ValueError(f"{what}: expected a list of indices or a file path, got {spec!r}")
    if any(isinstance(i, bool) or not isinstance(i, int) for i in spec):
        raise ValueError(f"{what}: expected integers, got {list(spec)!r}")
    return [int(i) for i in spec]


def check_indices(indices: Sequence[int], size: int, what: str, source: str) -> None:
    """Every index within ``0..size-1`` and none repeated, else a ``ValueError``."""
    bad = [i for i in indices if not 0 <= i < size]
    if bad:
        raise ValueError(
            f"{what}: index {bad[0]} is out of range for the {size} structures of '{source}'"
        )
    repeated = sorted(i for i, count in Counter(indices).items() if count > 1)
    if repeated:
        raise ValueError(f"{what}: indices {repeated[:5]} appear more than once")


def write_indices(path: str | Path, indices: Sequence[int]) -> None:
    """Write ``indices`` one per line (metatrain's format)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(f"{int(i)}\n" for i in indices))
