"""``AtomisticDataModule``: one file or an embedded dataset, split and batched.

.. code-block:: yaml

    data:                      # the arguments of AtomisticDataModule
      dataset: emt             # embedded dataset (emt, dos), used when `path` is null
      path: null               # a file ase.io.read understands, a metatrain DiskDataset
                               # .zip or MemmapDataset directory (wins over `dataset`)
      n_structures: null       # embedded datasets: how many to generate
      targets:                 # spec form; empty -> the embedded dataset's targets
        energy: {quantity: energy, key: energy, forces: true, stress: true}
      extra_data: {}           # name -> {read_from: file.mts}; merged with the embedded ones
      val_fraction: 0.1
      test_fraction: 0.1
      batch_size: 8
      num_workers: 0
      split_seed: 0

After :meth:`setup` (called by Lightning, or by hand before building the model):
``target_options`` (resolved: pass them to ``LossModule`` / ``expand_loss_config``),
``layouts()`` and ``atomic_types`` (for the ``Scaler``), ``train_dataset``,
``val_dataset``, ``test_dataset`` and ``split`` (their indices in the file). A ``.zip``
or a directory stays on disk (:func:`pl_mtt.data.open_dataset`): structures are read on
access, in the loader's workers. Its
``transfer_batch_to_device`` hook moves batches to the model's device (a
LightningModule's own hook, if any, takes precedence).

Distributed runs: the training loader is a plain shuffled loader, which Lightning
shards with its ``DistributedSampler`` (padded, so that every rank runs the same number
of steps); validation and test loaders use :class:`StridedShardSampler` (never padded,
each structure once over all ranks), which Lightning keeps as it is.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import lightning
import torch
from torch.utils.data import DataLoader

from pl_mtt.config import to_plain
from pl_mtt.data.collate import batch_to, collate
from pl_mtt.data.dataset import AtomisticDataset
from pl_mtt.data.embedded import EmbeddedDataset, embedded_dataset
from pl_mtt.data.file_dataset import FileDataset
from pl_mtt.data.sampler import StridedShardSampler
from pl_mtt.data.sources import open_dataset

__all__ = ["AtomisticDataModule", "split_indices"]

_DTYPES = {"float64": torch.float64, "float32": torch.float32}


def split_indices(
    n: int, val_fraction: float, test_fraction: float, seed: int
) -> tuple[list[int], list[int], list[int]]:
    """A seeded random split of ``range(n)`` into train/val/test index lists.

    Sizes are ``round(fraction * n)`` (at least 1 when the fraction is positive and
    ``n >= 3``); the training set gets the rest and must not be empty.
    """
    for name, fraction in (("val_fraction", val_fraction), ("test_fraction", test_fraction)):
        if not 0.0 <= fraction < 1.0:
            raise ValueError(f"{name} must be in [0, 1), got {fraction}")

    def size(fraction: float) -> int:
        count = round(fraction * n)
        return max(count, 1) if fraction > 0 and n >= 3 else count

    n_val, n_test = size(val_fraction), size(test_fraction)
    if n_val + n_test >= n:
        raise ValueError(
            f"{n} structures leave no training set with val_fraction={val_fraction} and "
            f"test_fraction={test_fraction}"
        )
    generator = torch.Generator().manual_seed(int(seed))
    order = torch.randperm(n, generator=generator).tolist()
    return order[n_val + n_test :], order[:n_val], order[n_val : n_val + n_test]


class AtomisticDataModule(lightning.LightningDataModule):
    """Structures and targets for training, validation and test.

    Args:
        dataset: an embedded dataset name (``emt``, ``dos``), used when ``path`` is None.
        path: a structure file (anything ``ase.io.read`` reads), a metatrain
            ``DiskDataset`` ``.zip`` or a ``MemmapDataset`` directory.
        n_structures: size of the embedded dataset (its default if None).
        targets: target name -> options (spec form); None/empty: the embedded ones.
        extra_data: name -> ``{read_from: file.mts}`` (added to the embedded ones).
        val_fraction, test_fraction: split fractions (random, seeded by ``split_seed``).
        batch_size: structures per batch.
        num_workers: ``DataLoader`` workers.
        split_seed: seed of the split (and of the training shuffle).
        dtype: ``"float64"`` (default) or ``"float32"``.
    """

    def __init__(
        self,
        dataset: str | None = "emt",
        path: str | None = None,
        n_structures: int | None = None,
        targets: Mapping[str, Any] | None = None,
        extra_data: Mapping[str, Any] | None = None,
        val_fraction: float = 0.1,
        test_fraction: float = 0.1,
        batch_size: int = 8,
        num_workers: int = 0,
        split_seed: int = 0,
        dtype: str | torch.dtype = "float64",
    ) -> None:
        super().__init__()
        if path is None and dataset is None:
            raise ValueError("data: give an embedded `dataset` name or a structure file `path`")
        if isinstance(dtype, str):
            if dtype not in _DTYPES:
                raise ValueError(f"data.dtype must be one of {sorted(_DTYPES)}, got {dtype!r}")
            dtype = _DTYPES[dtype]
        if batch_size < 1:
            raise ValueError(f"data.batch_size must be >= 1, got {batch_size}")
        self.dataset_name = dataset
        self.path = path
        self.n_structures = n_structures
        self.targets_config = dict(to_plain(targets) or {})
        self.extra_data_config = dict(to_plain(extra_data) or {})
        self.val_fraction = float(val_fraction)
        self.test_fraction = float(test_fraction)
        self.batch_size = int(batch_size)
        self.num_workers = int(num_workers)
        self.split_seed = int(split_seed)
        self.dtype = dtype
        self.embedded: EmbeddedDataset | None = None
        self.full_dataset: AtomisticDataset | FileDataset | None = None
        self.train_dataset: AtomisticDataset | FileDataset | None = None
        self.val_dataset: AtomisticDataset | FileDataset | None = None
        self.test_dataset: AtomisticDataset | FileDataset | None = None
        self.split: dict[str, list[int]] = {}

    # -- loading --------------------------------------------------------------------
    def _sources(self) -> tuple[str, dict[str, Any], dict[str, Any]]:
        targets, extra = dict(self.targets_config), {}
        if self.path is not None:
            path = str(self.path)
        else:
            self.embedded = embedded_dataset(self.dataset_name, self.n_structures)
            path = self.embedded.path
            targets = targets or dict(self.embedded.targets)
            extra = dict(self.embedded.extra_data)
        extra.update(self.extra_data_config)
        if not targets:
            raise ValueError(f"data.targets: no targets given for '{path}'")
        return path, targets, extra

    def prepare_data(self) -> None:
        """Generate the embedded dataset's files (once, on local rank 0)."""
        if self.path is None:
            embedded_dataset(self.dataset_name, self.n_structures)

    def setup(self, stage: str | None = None) -> None:
        """Read the data and split it (once; later calls do nothing)."""
        if self.train_dataset is not None:
            return
        path, targets, extra = self._sources()
        full = open_dataset(path, targets, extra, dtype=self.dtype)
        self.full_dataset = full
        train, val, test = split_indices(
            len(full), self.val_fraction, self.test_fraction, self.split_seed
        )
        self.split = {"train": train, "val": val, "test": test}  # indices into the file
        self.train_dataset = full.subset(train)
        self.val_dataset = full.subset(val)
        self.test_dataset = full.subset(test)

    def _loaded(self) -> AtomisticDataset | FileDataset:
        if self.train_dataset is None:
            self.setup()
        return self.train_dataset

    # -- what the model, loss and scaler need ---------------------------------------
    @property
    def target_options(self) -> dict[str, dict[str, Any]]:
        """Resolved target options (explicit forces/stress/virial booleans)."""
        return self._loaded().target_options

    @property
    def atomic_types(self) -> list[int]:
        """Atomic numbers present anywhere in the data (all splits), sorted (for a zip,
        computed on first use by reading every structure's types)."""
        self._loaded()
        return self.full_dataset.atomic_types

    def layouts(self) -> dict[str, Any]:
        """Zero-sample TensorMaps describing each target (``Scaler`` layouts)."""
        return self._loaded().layouts()

    def transfer_batch_to_device(self, batch: Any, device: torch.device, dataloader_idx: int):
        """Lightning hook: move ``(systems, targets, extra_data)`` batches (Lightning
        itself does not know ``System``/``TensorMap``)."""
        if isinstance(batch, tuple) and len(batch) == 3 and isinstance(batch[0], list):
            return batch_to(batch, device)
        return super().transfer_batch_to_device(batch, device, dataloader_idx)

    # -- loaders --------------------------------------------------------------------
    def _loader(self, dataset: AtomisticDataset | FileDataset, **kwargs: Any) -> DataLoader:
        return DataLoader(
            dataset,
            batch_size=self.batch_size,
            collate_fn=collate,
            num_workers=self.num_workers,
            persistent_workers=self.num_workers > 0,
            **kwargs,
        )

    def train_dataloader(self) -> DataLoader:
        generator = torch.Generator().manual_seed(self.split_seed)
        return self._loader(self._loaded(), shuffle=True, generator=generator)

    def val_dataloader(self) -> DataLoader:
        self._loaded()
        return self._loader(self.val_dataset, sampler=StridedShardSampler(self.val_dataset))

    def test_dataloader(self) -> DataLoader:
        self._loaded()
        return self._loader(self.test_dataset, sampler=StridedShardSampler(self.test_dataset))
