"""``AtomisticDataModule``: one file or an embedded dataset, split and batched.

.. code-block:: yaml

    data:                      # the arguments of AtomisticDataModule
      dataset: emt             # embedded dataset (emt, dos), used when `path` is null
      path: null               # any file ase.io.read understands (wins over `dataset`)
      n_structures: null       # embedded datasets: how many to generate
      targets:                 # spec form; empty -> the embedded dataset's targets
        energy: {quantity: energy, key: energy, forces: true, stress: true}
      extra_data: {}           # name -> {read_from: file.mts}; merged with the embedded ones
      val_fraction: 0.1        # random split of the training structures...
      test_fraction: 0.1
      indices: null            # training structures of `path`: a list or an index file
      val_set: null            # ...or {indices: list|file} (structures of `path`) or
      test_set: null           #    {path: file, targets: ..., extra_data: ..., indices: ...}
      batch_size: 8
      drop_last: false         # drop the last incomplete training batch (metatrain does)
      num_workers: 0
      split_seed: 0

After :meth:`setup` (called by Lightning, or by hand before building the model):
``target_options`` (resolved: pass them to ``LossModule`` / ``expand_loss_config``),
``layouts()`` and ``atomic_types`` (for the ``Scaler``), ``train_dataset``,
``val_dataset``, ``test_dataset`` and ``split`` (their indices in the file). Its
``transfer_batch_to_device`` hook moves batches to the model's device (a
LightningModule's own hook, if any, takes precedence).

Neighbour lists: when a Trainer calls :meth:`setup`, the lists that the LightningModule
(any submodule: the model) requests with ``requested_neighbor_lists()`` are attached to
each structure the first time it is loaded and kept: computed once per structure, not
for every batch (:meth:`request_neighbor_lists` does it by hand).

Distributed runs: the training loader is a plain shuffled loader, which Lightning
shards with its ``DistributedSampler`` (padded, so that every rank runs the same number
of steps); validation and test loaders use :class:`StridedShardSampler` (never padded,
each structure once over all ranks), which Lightning keeps as it is.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import lightning
import torch
from metatomic.torch import NeighborListOptions
from torch.utils.data import DataLoader

from pl_mtt.config import check_known_keys, to_plain
from pl_mtt.data.collate import batch_to, collate
from pl_mtt.data.dataset import AtomisticDataset
from pl_mtt.data.embedded import EmbeddedDataset, embedded_dataset
from pl_mtt.data.indices import check_indices, read_indices
from pl_mtt.data.sampler import StridedShardSampler
from pl_mtt.tensormaps.neighbors import requested_neighbor_lists

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
        path: a structure file (anything ``ase.io.read`` reads).
        n_structures: size of the embedded dataset (its default if None).
        targets: target name -> options (spec form); None/empty: the embedded ones.
        extra_data: name -> ``{read_from: file.mts}`` (added to the embedded ones).
        val_fraction, test_fraction: split fractions of the training structures
            (random, seeded by ``split_seed``); not used for a set given explicitly.
        indices: the training structures of ``path`` (a list or an index file, see
            :mod:`pl_mtt.data.indices`); default: all of them.
        val_set, test_set: an explicit set: ``{indices: ...}`` (structures of ``path``;
            the training structures are not changed, as in metatrain) or ``{path: ...,
            targets: ..., extra_data: ..., indices: ...}`` (another file; targets and
            extra data default to the training ones, without their ``read_from``).
        batch_size: structures per batch.
        drop_last: drop the last incomplete batch of each training epoch.
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
        indices: Sequence[int] | str | None = None,
        val_set: Mapping[str, Any] | None = None,
        test_set: Mapping[str, Any] | None = None,
        drop_last: bool = False,
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
        self.indices = to_plain(indices)
        self.explicit_sets = {
            "val": _explicit_set("data.val_set", to_plain(val_set)),
            "test": _explicit_set("data.test_set", to_plain(test_set)),
        }
        self.drop_last = bool(drop_last)
        self.embedded: EmbeddedDataset | None = None
        self.train_dataset: AtomisticDataset | None = None
        self.val_dataset: AtomisticDataset | None = None
        self.test_dataset: AtomisticDataset | None = None
        self.split: dict[str, list[int]] = {}
        self._atomic_types: list[int] = []
        self.neighbor_lists: list[NeighborListOptions] = []

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
        """Read the data and split it (once), and attach the neighbour lists the
        Trainer's LightningModule requests (on every call with a Trainer)."""
        self._load()
        module = self.trainer.lightning_module if self.trainer is not None else None
        if module is not None:
            self.request_neighbor_lists(requested_neighbor_lists(module))

    def request_neighbor_lists(self, options: list[NeighborListOptions]) -> None:
        """Attach these neighbour lists to every structure (all splits) when it is first
        loaded; see :meth:`AtomisticDataset.request_neighbor_lists`."""
        for item in options:
            if not any(item == have for have in self.neighbor_lists):
                self.neighbor_lists.append(item)
        for dataset in (self.train_dataset, self.val_dataset, self.test_dataset):
            if dataset is not None:
                dataset.request_neighbor_lists(self.neighbor_lists)

    def _load(self) -> None:
        if self.train_dataset is not None:
            return
        path, targets, extra = self._sources()
        full = AtomisticDataset.from_file(path, targets, extra, dtype=self.dtype)
        full.request_neighbor_lists(self.neighbor_lists)
        candidates = list(range(len(full)))
        if self.indices is not None:
            candidates = read_indices(self.indices, "data.indices")
            check_indices(candidates, len(full), "data.indices", path)
        explicit = {
            stage: self._explicit_dataset(stage, options, full, path, targets, extra)
            for stage, options in self.explicit_sets.items()
            if options is not None
        }
        val_fraction = 0.0 if "val" in explicit else self.val_fraction
        test_fraction = 0.0 if "test" in explicit else self.test_fraction
        train, val, test = split_indices(
            len(candidates), val_fraction, test_fraction, self.split_seed
        )
        # indices into the file (for a set from another file: into that file)
        self.split = {
            "train": [candidates[i] for i in train],
            "val": [candidates[i] for i in val],
            "test": [candidates[i] for i in test],
        }
        self.train_dataset = full.subset(self.split["train"])
        datasets = {"val": full.subset(self.split["val"]), "test": full.subset(self.split["test"])}
        for stage, (dataset, stage_indices) in explicit.items():
            datasets[stage] = dataset
            self.split[stage] = stage_indices
        self.val_dataset, self.test_dataset = datasets["val"], datasets["test"]
        self._atomic_types = sorted(
            {*full.atomic_types, *(t for d, _ in explicit.values() for t in d.atomic_types)}
        )

    def _explicit_dataset(
        self,
        stage: str,
        options: dict[str, Any],
        full: AtomisticDataset,
        path: str,
        targets: dict[str, Any],
        extra: dict[str, Any],
    ) -> tuple[AtomisticDataset, list[int]]:
        """An explicit validation or test set and its indices into its file."""
        what = f"data.{stage}_set"
        source, dataset = path, full
        if options.get("path") is not None:
            source = str(options["path"])
            dataset = AtomisticDataset.from_file(
                source,
                options.get("targets") or _without_read_from(targets),
                options.get("extra_data") or _without_read_from(extra),
                dtype=self.dtype,
            )
            _check_same_gradients(what, dataset.target_options, full.target_options)
            dataset.request_neighbor_lists(self.neighbor_lists)
        if options.get("indices") is None:
            return dataset, list(range(len(dataset)))
        chosen = read_indices(options["indices"], f"{what}.indices")
        check_indices(chosen, len(dataset), f"{what}.indices", source)
        return dataset.subset(chosen), chosen

    def _loaded(self) -> AtomisticDataset:
        self._load()
        return self.train_dataset

    # -- what the model, loss and scaler need ---------------------------------------
    @property
    def target_options(self) -> dict[str, dict[str, Any]]:
        """Resolved target options (explicit forces/stress/virial booleans)."""
        return self._loaded().target_options

    @property
    def atomic_types(self) -> list[int]:
        """Atomic numbers present anywhere in the data (all splits), sorted."""
        self._loaded()
        return self._atomic_types

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
    def _loader(self, dataset: AtomisticDataset, **kwargs: Any) -> DataLoader:
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
        return self._loader(
            self._loaded(), shuffle=True, generator=generator, drop_last=self.drop_last
        )

    def val_dataloader(self) -> DataLoader:
        self._loaded()
        return self._loader(self.val_dataset, sampler=StridedShardSampler(self.val_dataset))

    def test_dataloader(self) -> DataLoader:
        self._loaded()
        return self._loader(self.test_dataset, sampler=StridedShardSampler(self.test_dataset))


_EXPLICIT_SET_KEYS = ("indices", "path", "targets", "extra_data")


def _explicit_set(what: str, options: Any) -> dict[str, Any] | None:
    """A validated ``val_set``/``test_set`` mapping (None: use the fraction)."""
    if options is None:
        return None
    if not isinstance(options, Mapping):
        raise ValueError(f"{what}: expected a mapping ({', '.join(_EXPLICIT_SET_KEYS)})")
    check_known_keys(options, _EXPLICIT_SET_KEYS, what)
    if options.get("path") is None and options.get("indices") is None:
        raise ValueError(f"{what}: give `indices` (structures of data.path) or a `path`")
    return dict(options)


def _without_read_from(options: Mapping[str, Any]) -> dict[str, Any]:
    """Per-entry options without ``read_from`` (they point at the training file)."""
    return {
        name: {k: v for k, v in (entry or {}).items() if k != "read_from"}
        if isinstance(entry, Mapping)
        else entry
        for name, entry in options.items()
    }


def _check_same_gradients(
    what: str, resolved: Mapping[str, Mapping[str, Any]], training: Mapping[str, Mapping[str, Any]]
) -> None:
    """A separate validation/test file must provide the training targets and gradients."""
    for name, options in training.items():
        if name not in resolved:
            raise ValueError(f"{what}: target '{name}' of the training set is missing")
        for gradient in ("forces", "stress", "virial"):
            if bool(options.get(gradient)) != bool(resolved[name].get(gradient)):
                raise ValueError(
                    f"{what}: target '{name}' has {gradient} "
                    f"{'in' if options.get(gradient) else 'not in'} the training set but "
                    f"{'in' if resolved[name].get(gradient) else 'not in'} this set"
                )
