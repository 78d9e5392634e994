"""``AtomisticDataModule``: one file or an embedded dataset, split and batched.

.. code-block:: yaml

    data:                      # the arguments of AtomisticDataModule
      dataset: emt             # embedded dataset (emt, dos), used when `path` is null
      path: null               # a file ase.io.read understands, a metatrain DiskDataset
                               # .zip or MemmapDataset directory (wins over `dataset`)
      n_structures: null       # how many: generated (embedded), or the first n of `path`
      targets:                 # spec form; empty -> the embedded dataset's targets
        energy: {quantity: energy, key: energy, forces: true, stress: true}
      extra_data: {}           # name -> {read_from: file.mts} or {key: info/arrays key of the file}
      val_fraction: 0.1        # random split of the training structures...
      test_fraction: 0.1
      indices: null            # training structures of `path`: a list or an index file
      val_set: null            # ...or {indices: list|file} (structures of `path`) or
      test_set: null           #    {path: file, targets: ..., extra_data: ..., indices: ...}
      batch_size: 8
      max_atoms_per_batch: null   # e.g. 2000: batches packed by atom count instead
      min_atoms_per_batch: 0
      drop_last: false         # drop the last incomplete training batch (metatrain does)
      num_workers: 0
      split_seed: 0

After :meth:`setup` (called by Lightning, or by hand before building the model):
``target_options`` (resolved: pass them to ``LossModule`` / ``expand_loss_config``),
``layouts()`` and ``atomic_types`` (for the ``Scaler``), ``train_dataset``,
``val_dataset``, ``test_dataset``, ``split`` (their indices in the file) and
:meth:`summary` (what was read, printed by the app at start-up). A ``.zip`` or a
directory stays on disk (:func:`pl_mtt.data.open_dataset`): structures are read on
access, in the loader's workers. Its
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

With ``max_atoms_per_batch`` (metatrain's option), every loader yields batches of at most
that many atoms (``batch_size`` is then not used) from an :class:`AtomBatchSampler`:
in training every rank runs the same number of steps with nearly the same number of
atoms per step and every structure is used once per epoch (nothing padded or dropped),
reshuffled every epoch from ``split_seed``; validation and test are strided shards
packed by atoms, never padded. ``min_atoms_per_batch`` is the fewest atoms of a training
batch (checked when the loader is made).
"""

from __future__ import annotations

import warnings
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
from pl_mtt.data.file_dataset import FileDataset
from pl_mtt.data.indices import check_indices, read_indices
from pl_mtt.data.report import DataReport, DataWarning
from pl_mtt.data.sampler import AtomBatchSampler, BatchedDataset, StridedShardSampler
from pl_mtt.data.sources import open_dataset
from pl_mtt.tensormaps.neighbors import requested_neighbor_lists

__all__ = ["AtomisticDataModule", "split_indices"]

_DTYPES = {"float64": torch.float64, "float32": torch.float32}


def split_indices(
    n: int, val_fraction: float, test_fraction: float, seed: int
) -> tuple[list[int], list[int], list[int]]:
    """A seeded random split of ``range(n)`` into train/val/test index lists.

    Sizes are ``round(fraction * n)``, at least 1 when the fraction is positive (a
    positive fraction never gives an empty split); the training set gets the rest and
    must not be empty.
    """
    for name, fraction in (("val_fraction", val_fraction), ("test_fraction", test_fraction)):
        if not 0.0 <= fraction < 1.0:
            raise ValueError(f"data.{name} must be in [0, 1), got {fraction}")

    def size(fraction: float) -> int:
        return max(round(fraction * n), 1) if fraction > 0 else 0

    n_val, n_test = size(val_fraction), size(test_fraction)
    if n_val + n_test >= n:
        raise ValueError(
            f"data: {n} structures cannot give a training split and non-empty splits for "
            f"val_fraction={val_fraction} ({n_val}) and test_fraction={test_fraction} "
            f"({n_test}); use more structures, or set data.val_fraction=0 / "
            f"data.test_fraction=0 to have no such split"
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
        n_structures: how many structures to use: the size of the embedded dataset
            (its default if None), or the first ``n_structures`` of ``path`` (all if
            None; more than the file has is an error).
        targets: target name -> options (spec form); None/empty: the embedded ones.
        extra_data: name -> ``{read_from: file.mts}``, or ``{key: <info/arrays key>}`` of
            the structure file (e.g. sample weights; added to the embedded ones).
        val_fraction, test_fraction: split fractions of the training structures
            (random, seeded by ``split_seed``); not used for a set given explicitly.
        indices: the training structures of ``path`` (a list or an index file, see
            :mod:`pl_mtt.data.indices`); default: all of them.
        val_set, test_set: an explicit set: ``{indices: ...}`` (structures of ``path``;
            the training structures are not changed, as in metatrain) or ``{path: ...,
            targets: ..., extra_data: ..., indices: ...}`` (another file; targets and
            extra data default to the training ones, without their ``read_from``).
        batch_size: structures per batch.
        max_atoms_per_batch: batches bounded by this many atoms instead (None: off); a
            structure with more atoms is an error.
        min_atoms_per_batch: the fewest atoms in a training batch (with
            ``max_atoms_per_batch``).
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
        max_atoms_per_batch: int | None = None,
        min_atoms_per_batch: int = 0,
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
        _check_atom_bounds(max_atoms_per_batch, min_atoms_per_batch)
        self.max_atoms_per_batch = max_atoms_per_batch
        self.min_atoms_per_batch = int(min_atoms_per_batch)
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
        self.full_dataset: AtomisticDataset | FileDataset | None = None
        self.train_dataset: AtomisticDataset | FileDataset | None = None
        self.val_dataset: AtomisticDataset | FileDataset | None = None
        self.test_dataset: AtomisticDataset | FileDataset | None = None
        self.split: dict[str, list[int]] = {}
        self.report: DataReport | None = None
        self._other_datasets: list[AtomisticDataset | FileDataset] = []
        self.neighbor_lists: list[NeighborListOptions] = []
        self.extra_data_names: list[str] = []  # of the training data, once read

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
        Trainer's LightningModule requests (on every call with a Trainer).

        Reading warns (:class:`~pl_mtt.data.report.DataWarning`) about NaN target
        entries (left out of the loss and the scales) and elements absent from the
        training split; :meth:`summary` describes what was read.
        """
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
        self.extra_data_names = list(extra)
        full = open_dataset(path, targets, extra, dtype=self.dtype)
        n_available = len(full)
        full = self._first_structures(full, path)
        full.request_neighbor_lists(self.neighbor_lists)
        self.full_dataset = full
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
        datasets = {"val": full.subset(self.split["val"]), "test": full.subset(self.split["test"])}
        other_files = {}
        for stage, (dataset, stage_indices, source) in explicit.items():
            datasets[stage] = dataset
            self.split[stage] = stage_indices
            if source != path:
                other_files[stage] = source
        in_full = {k: v for k, v in self.split.items() if k not in other_files}
        if self.max_atoms_per_batch is not None:
            _check_structure_sizes(full, self.max_atoms_per_batch, path, in_full)
            for stage, source in other_files.items():
                dataset = datasets[stage]
                every = {stage: list(range(len(dataset)))}
                _check_structure_sizes(dataset, self.max_atoms_per_batch, source, every)
        self.train_dataset = full.subset(self.split["train"])
        self.val_dataset, self.test_dataset = datasets["val"], datasets["test"]
        self._other_datasets = [dataset for dataset, *_ in explicit.values()]
        self.report = DataReport.from_dataset(
            full,
            in_full,
            files=[path, *other_files.values()],
            n_available=n_available,
            limit=None if self.n_structures is None else f"data.n_structures={len(full)}",
            split_seed=self.split_seed,
            configured_targets=targets,
        )
        for message in self.report.warnings():
            warnings.warn(message, DataWarning, stacklevel=2)

    def _explicit_dataset(
        self,
        stage: str,
        options: dict[str, Any],
        full: AtomisticDataset | FileDataset,
        path: str,
        targets: dict[str, Any],
        extra: dict[str, Any],
    ) -> tuple[AtomisticDataset | FileDataset, list[int], str]:
        """An explicit validation or test set, its indices into its file and the file."""
        what = f"data.{stage}_set"
        source, dataset = path, full
        if options.get("path") is not None:
            source = str(options["path"])
            dataset = open_dataset(
                source,
                options.get("targets") or _without_read_from(targets),
                options.get("extra_data") or _without_read_from(extra),
                dtype=self.dtype,
            )
            _check_same_gradients(what, dataset.target_options, full.target_options)
            dataset.request_neighbor_lists(self.neighbor_lists)
        if options.get("indices") is None:
            return dataset, list(range(len(dataset))), source
        chosen = read_indices(options["indices"], f"{what}.indices")
        check_indices(chosen, len(dataset), f"{what}.indices", source)
        return dataset.subset(chosen), chosen, source

    def _first_structures(
        self, full: AtomisticDataset | FileDataset, path: str
    ) -> AtomisticDataset | FileDataset:
        """The first ``n_structures`` of a user's file (embedded datasets are generated
        with that size already)."""
        if self.path is None or self.n_structures is None:
            return full
        n = int(self.n_structures)
        if not 1 <= n <= len(full):
            raise ValueError(
                f"data.n_structures={n}: '{path}' has {len(full)} structures; give a "
                f"number from 1 to {len(full)}, or null for all of them"
            )
        return full if n == len(full) else full.subset(range(n))

    def summary(self) -> str:
        """What was read and how it was split: files, structure counts, split sizes,
        targets and gradients with their keys, elements per split, NaN entries."""
        self._loaded()
        return self.report.text()

    def _loaded(self) -> AtomisticDataset | FileDataset:
        self._load()
        return self.train_dataset

    # -- what the model, loss and scaler need ---------------------------------------
    @property
    def target_options(self) -> dict[str, dict[str, Any]]:
        """Resolved target options (explicit forces/stress/virial booleans)."""
        return self._loaded().target_options

    @property
    def atomic_types(self) -> list[int]:
        """Atomic numbers present anywhere in the data (all splits, sets from other
        files too), sorted (for a zip, computed on first use by reading the types of
        every structure)."""
        self._loaded()
        types = set(self.full_dataset.atomic_types)
        for dataset in self._other_datasets:
            types.update(dataset.atomic_types)
        return sorted(types)

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

    def _atom_loader(self, dataset: AtomisticDataset | FileDataset, training: bool) -> DataLoader:
        """Batches of at most ``max_atoms_per_batch`` atoms (the sampler yields them)."""
        sampler = AtomBatchSampler(
            dataset,
            self.max_atoms_per_batch,
            self.min_atoms_per_batch if training else 0,
            shuffle=training,
            seed=self.split_seed,
            equal_steps=training,
        )
        if training and self.trainer is not None:
            # Lightning calls set_epoch after it has drawn the first batch of a fit (it
            # prefetches): a run resumed at epoch N must start from N's plan already.
            # The epoch Lightning will pass is the fit loop's count of processed epochs
            # (current_epoch catches up with it only later).
            progress = getattr(self.trainer.fit_loop, "epoch_progress", None)
            epoch = progress.current.processed if progress is not None else None
            sampler.set_epoch(self.trainer.current_epoch if epoch is None else epoch)
        return DataLoader(
            BatchedDataset(dataset),
            sampler=sampler,
            batch_size=None,
            collate_fn=collate,
            num_workers=self.num_workers,
            persistent_workers=self.num_workers > 0,
        )

    def train_dataloader(self) -> DataLoader:
        if self.max_atoms_per_batch is not None:
            return self._atom_loader(self._loaded(), training=True)
        generator = torch.Generator().manual_seed(self.split_seed)
        return self._loader(
            self._loaded(), shuffle=True, generator=generator, drop_last=self.drop_last
        )

    def _evaluation_loader(self, dataset: AtomisticDataset | FileDataset) -> DataLoader:
        if self.max_atoms_per_batch is not None:
            return self._atom_loader(dataset, training=False)
        return self._loader(dataset, sampler=StridedShardSampler(dataset))

    def val_dataloader(self) -> DataLoader:
        self._loaded()
        return self._evaluation_loader(self.val_dataset)

    def test_dataloader(self) -> DataLoader:
        self._loaded()
        return self._evaluation_loader(self.test_dataset)


def _check_atom_bounds(max_atoms: Any, min_atoms: Any) -> None:
    for name, value, least in (
        ("max_atoms_per_batch", max_atoms, 1),
        ("min_atoms_per_batch", min_atoms, 0),
    ):
        if value is None and name == "max_atoms_per_batch":
            continue
        if isinstance(value, bool) or not isinstance(value, int) or value < least:
            raise ValueError(f"data.{name}: expected an integer >= {least}, got {value!r}")
    if min_atoms and max_atoms is None:
        raise ValueError(
            f"data.min_atoms_per_batch={min_atoms} needs data.max_atoms_per_batch (batches "
            f"are counted in structures otherwise)"
        )
    if max_atoms is not None and min_atoms > max_atoms:
        raise ValueError(
            f"data.min_atoms_per_batch ({min_atoms}) is larger than data.max_atoms_per_batch "
            f"({max_atoms})"
        )


def _check_structure_sizes(
    dataset: AtomisticDataset | FileDataset,
    max_atoms: int,
    path: str,
    split: dict[str, list[int]],
) -> None:
    """Every structure (all splits) fits in a batch of ``max_atoms`` atoms."""
    counts = dataset.atom_counts()
    too_large = torch.nonzero(counts > max_atoms).reshape(-1)
    if too_large.numel():
        index = int(too_large[0])
        part = next(name for name, indices in split.items() if index in indices)
        raise ValueError(
            f"data.max_atoms_per_batch={max_atoms}: structure {index} of '{path}' "
            f"({part} split) has {int(counts[index])} atoms, more than a batch may "
            f"hold ({too_large.numel()} structure(s) are too large; the largest has "
            f"{int(counts.max())} atoms)"
        )


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
