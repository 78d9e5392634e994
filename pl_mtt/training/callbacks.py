"""ScalerCallback: fits the composition baseline and the target scales before training.

.. code-block:: python

    trainer = L.Trainer(callbacks=[ScalerCallback()], strategy="ddp", devices=4)
    trainer.fit(task, datamodule)   # task.scaler / task.composition exist and are fitted

.. code-block:: yaml

    # Hydra: trainer.callbacks
    - _target_: pl_mtt.ScalerCallback
      per_structure_targets: [mtt::band_gap]   # intensive: not divided by atoms
      fixed_scales: {energy: 1.0}              # metatrain's fixed_scaling_weights
      fixed_baseline: {energy: {1: -13.6}}     # metatrain's atomic_baseline
      save_statistics: statistics.yaml         # written after the fit
    # or, with no pass over the data at all:
    - _target_: pl_mtt.ScalerCallback
      statistics: statistics.yaml              # a file written by an earlier fit

``setup`` (before Lightning restores a checkpoint) creates the unfitted
:class:`pl_mtt.Scaler` and :class:`pl_mtt.CompositionModel` as ``pl_module.scaler`` and
``pl_module.composition``, with state of the same shape on every rank, so that
``trainer.fit(..., ckpt_path=...)`` restores them. ``on_fit_start`` fits them if they
are not fitted yet (or ``refit=True``): every rank reads only its strided share of the
training set (rank ``r`` of ``W`` gets structures ``r, r+W, ...``, never padded), one
pass accumulates all sums (:func:`pl_mtt.scaling.fit.fit_pass`), the shift of the sums is
broadcast from rank 0 and the sums are summed with ONE all_reduce; every rank then fits
from the same numbers and ends with the same state. The scaler is handed to every
:class:`pl_mtt.LossModule` found in the LightningModule. With ``statistics`` (a file of
:mod:`pl_mtt.scaling.statistics`) nothing is fitted: the file is loaded, and checked
against the targets, their units and the atomic types of the training data.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence, Sized
from pathlib import Path
from typing import Any

import lightning.pytorch as pl
import metatensor.torch as mts
import torch
from metatensor.torch import TensorMap
from torch.utils.data import DataLoader, IterableDataset, Subset

from pl_mtt.config import to_plain
from pl_mtt.loss_module import LossModule
from pl_mtt.scaling.composition import CompositionModel
from pl_mtt.scaling.fit import FitSummary, fit_pass, unfitted_models
from pl_mtt.scaling.fit import unpack_batch as default_unpack_batch
from pl_mtt.scaling.scaler import Scaler
from pl_mtt.scaling.statistics import (
    fixed_baseline_from,
    fixed_scales_from,
    load_statistics,
    read_statistics,
    write_statistics,
)
from pl_mtt.scaling.target_info import is_tensor_map
from pl_mtt.tensormaps.builders import zero_sample_layout
from pl_mtt.training.profiles import profile_targets

__all__ = ["ScalerCallback"]


class ScalerCallback(pl.Callback):
    """Fits ``pl_module.scaler`` and ``pl_module.composition`` in one sharded pass.

    With no arguments, atomic types and target layouts are discovered from the training
    data, the targets are those of the :class:`pl_mtt.LossModule` found on the module
    (all targets of the batches if there is none), and targets whose loss is
    ``masked_dos`` or ``shift_agnostic_mse`` get one pooled scale, no per-property scales
    and no baseline.

    Args:
        atomic_types: atomic types (default: discovered; state indexed by atomic number).
        layouts: target name -> TensorMap describing the target (default: from the
            first training batch).
        targets: names of the targets to scale (default: see above).
        no_per_property_scales: targets with one pooled scale (default: DOS targets).
        per_structure_targets: per-structure targets NOT divided by the number of atoms.
        composition: fit a composition baseline (``False``: ``pl_module.composition``
            is ``None``).
        no_composition: targets without baseline (DOS targets are always excluded).
        fixed_scales: target -> fixed per-target scale (a number, or per atomic type; see
            :meth:`pl_mtt.Scaler.fit`), or the path of a statistics file whose per-target
            scales are used (metatrain's ``fixed_scaling_weights``).
        fixed_baseline: target -> fixed baseline per atom of each type (a number for
            every type, or per type; types not listed are fitted), or the path of a
            statistics file whose baseline is used (metatrain's ``atomic_baseline``;
            see :meth:`pl_mtt.CompositionModel.fit`).
        statistics: a statistics file (path or its parsed content) loaded instead of
            any fit; mutually exclusive with ``fixed_scales`` and ``fixed_baseline``.
        save_statistics: where to write the statistics after a fit (rank 0).
        refit: fit again even when the module's scaler is already fitted (e.g. restored
            from ``ckpt_path``).
        unpack_batch: batch -> ``(systems, targets, extra_data)`` for other batch
            formats (default: a tuple of those three, or of the first two).
        progress_bar: show a progress bar for the pass (rank 0, when the trainer has one).
    """

    def __init__(
        self,
        *,
        atomic_types: Sequence[int] | None = None,
        layouts: Mapping[str, TensorMap] | None = None,
        targets: Sequence[str] | None = None,
        no_per_property_scales: Sequence[str] | None = None,
        per_structure_targets: Sequence[str] = (),
        composition: bool = True,
        no_composition: Sequence[str] = (),
        fixed_scales: Mapping[str, Any] | str | Path | None = None,
        fixed_baseline: Mapping[str, Any] | str | Path | None = None,
        statistics: str | Path | Mapping[str, Any] | None = None,
        save_statistics: str | Path | None = None,
        refit: bool = False,
        unpack_batch: Callable[[Any], tuple] | None = None,
        progress_bar: bool = True,
    ) -> None:
        super().__init__()
        atomic_types, layouts, targets = to_plain(atomic_types), layouts, to_plain(targets)
        no_per_property_scales = to_plain(no_per_property_scales)
        fixed_scales, fixed_baseline = to_plain(fixed_scales), to_plain(fixed_baseline)
        statistics = to_plain(statistics)
        if statistics and (fixed_scales or fixed_baseline):
            raise ValueError(
                "ScalerCallback: give either statistics (load, no fit) or fixed_scales / "
                "fixed_baseline (fix part of a fit), not both"
            )
        if fixed_baseline and not composition:
            raise ValueError("ScalerCallback: fixed_baseline needs composition=True")
        self.atomic_types = None if atomic_types is None else [int(t) for t in atomic_types]
        self.layouts = None if layouts is None else dict(layouts)
        self.targets = None if targets is None else list(targets)
        self.no_per_property_scales = (
            None if no_per_property_scales is None else list(no_per_property_scales)
        )
        self.per_structure_targets = list(to_plain(per_structure_targets))
        self.composition = composition
        self.no_composition = list(to_plain(no_composition))
        self.fixed_scales = _mapping_or_file(fixed_scales, fixed_scales_from)
        self.fixed_baseline = _mapping_or_file(fixed_baseline, fixed_baseline_from)
        self.statistics = None if not statistics else read_statistics(statistics)
        self.save_statistics = None if save_statistics is None else Path(save_statistics)
        self.refit = refit
        self.unpack_batch = unpack_batch or default_unpack_batch
        self.progress_bar = progress_bar
        self.summary: FitSummary | None = None  # what the last fit saw (None: no fit)

    # -- helpers ---------------------------------------------------------------------
    @staticmethod
    def _loss_modules(pl_module: pl.LightningModule) -> list[LossModule]:
        return [m for m in pl_module.modules() if isinstance(m, LossModule)]

    def _source_loader(self, trainer: pl.Trainer, stage: str | None) -> Any:
        loops = {
            "fit": ("fit_loop", "train"),
            "validate": ("validate_loop", "val"),
            "test": ("test_loop", "test"),
        }
        loop_name, what = loops.get(stage or "fit", loops["fit"])
        source = getattr(getattr(trainer, loop_name, None), "_data_source", None)
        if source is None or source.instance is None or not source.is_defined():
            raise ValueError(
                f"ScalerCallback: the trainer has no {what} dataloader (define "
                f"{what}_dataloader() on the LightningModule or a DataModule, or pass "
                f"{what}_dataloaders to trainer.{stage or 'fit'}); the scaler is fitted on "
                f"the training data"
            )
        loader = source.dataloader()
        if loader is None:
            raise ValueError(f"ScalerCallback: the {what} dataloader is None")
        return loader

    def _unpack(self, batch: Any) -> tuple:
        try:
            parts = self.unpack_batch(batch)
        except ValueError:
            raise
        except Exception as error:
            raise ValueError(f"ScalerCallback: unpack_batch failed on a batch: {error}") from error
        if not (isinstance(parts, (tuple, list)) and len(parts) == 3):
            raise ValueError(
                "ScalerCallback: unpack_batch must return (systems, targets, extra_data), got "
                f"{type(parts).__name__}"
            )
        systems, targets, extra_data = parts
        if not isinstance(targets, Mapping) or not all(is_tensor_map(t) for t in targets.values()):
            raise ValueError(
                "ScalerCallback: the targets of a batch must be a dict of TensorMaps, got "
                f"{type(targets).__name__}"
            )
        return list(systems), dict(targets), dict(extra_data or {})

    def _target_names(self, pl_module: pl.LightningModule, available: list[str]) -> list[str]:
        if self.targets is not None:
            names = self.targets
        else:
            names = []
            for module in self._loss_modules(pl_module):
                names.extend(n for n in module.target_options if n not in names)
            if not names:
                return available
        missing = [n for n in names if n not in available]
        if missing:
            raise ValueError(
                f"ScalerCallback: target(s) {missing} are not in the training batches "
                f"(found: {available})"
            )
        return names

    def _dos_targets(self, pl_module: pl.LightningModule) -> list[str]:
        if self.no_per_property_scales is not None:
            return self.no_per_property_scales
        # shift-aligned profile losses: one pooled scale, no per-property scales, no baseline
        names: dict[str, Any] = {}
        for module in self._loss_modules(pl_module):
            names.update(profile_targets(module.config))
        return list(names)

    def _discover_layouts(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str | None
    ) -> dict[str, TensorMap]:
        layouts: dict[str, TensorMap] | None = self.layouts
        if layouts is None:
            buffers = None
            if trainer.is_global_zero:
                loader = self._source_loader(trainer, stage)
                batch = next(iter(loader), None)
                if batch is None:
                    raise ValueError("ScalerCallback: the training dataloader is empty")
                _, targets, _ = self._unpack(batch)
                names = self._target_names(pl_module, list(targets))
                buffers = {
                    name: mts.save_buffer(zero_sample_layout(targets[name])) for name in names
                }
            if trainer.world_size > 1:
                buffers = trainer.strategy.broadcast(buffers, src=0)
            layouts = {name: mts.load_buffer(buffer) for name, buffer in buffers.items()}
        elif self.targets is not None:
            layouts = {name: layouts[name] for name in self._target_names(pl_module, list(layouts))}
        return layouts

    @staticmethod
    def restore(pl_module: torch.nn.Module, checkpoint: Mapping[str, Any]) -> bool:
        """Create ``pl_module.scaler`` / ``pl_module.composition`` as saved in
        ``checkpoint`` (a Lightning checkpoint dict) when they are missing, so that its
        ``state_dict`` loads. Call it from ``on_load_checkpoint``, which Lightning runs
        before loading the weights (``load_from_checkpoint``, ``trainer.predict(...,
        ckpt_path=...)``):

        .. code-block:: python

            def on_load_checkpoint(self, checkpoint):
                ScalerCallback.restore(self, checkpoint)

        Returns whether anything was created.
        """
        state = checkpoint.get("state_dict", checkpoint)
        created = False
        for attribute, cls in (("scaler", Scaler), ("composition", CompositionModel)):
            extra = state.get(f"{attribute}._extra_state")
            if extra is None or isinstance(getattr(pl_module, attribute, None), cls):
                continue
            setattr(pl_module, attribute, cls.from_construction(extra["construction"]))
            created = True
        if created and isinstance(getattr(pl_module, "scaler", None), Scaler):
            for module in pl_module.modules():
                if isinstance(module, LossModule):
                    module.set_scaler(pl_module.scaler)
        return created

    def _hand_over(self, pl_module: pl.LightningModule) -> None:
        for module in self._loss_modules(pl_module):
            module.set_scaler(pl_module.scaler)

    # -- hooks -----------------------------------------------------------------------
    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        """Create the unfitted scaler and composition model (same shapes on every rank)."""
        if isinstance(getattr(pl_module, "scaler", None), Scaler):
            self._hand_over(pl_module)
            return
        if stage == "predict":
            return
        layouts = self._discover_layouts(trainer, pl_module, stage)
        pl_module.scaler, pl_module.composition = unfitted_models(
            self.atomic_types,
            layouts,
            per_structure_targets=[n for n in self.per_structure_targets if n in layouts],
            no_per_property_scales=[n for n in self._dos_targets(pl_module) if n in layouts],
            composition=self.composition,
            no_composition=self.no_composition,
        )
        self._hand_over(pl_module)

    def on_fit_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        """Fit (one pass over this rank's shard, one all_reduce) unless already fitted."""
        scaler = getattr(pl_module, "scaler", None)
        if not isinstance(scaler, Scaler):
            raise ValueError(
                "ScalerCallback: pl_module.scaler is missing (setup did not run or it was "
                "replaced by something that is not a pl_mtt.Scaler)"
            )
        if bool(scaler.fitted) and not self.refit:
            self._hand_over(pl_module)
            return
        composition = getattr(pl_module, "composition", None)
        if self.statistics is not None:
            self._load_statistics(trainer, pl_module, scaler, composition)
            return
        world_size, rank = trainer.world_size, trainer.global_rank
        batches, total = self._shard(self._source_loader(trainer, "fit"), rank, world_size)
        show = (
            self.progress_bar
            and trainer.is_global_zero
            and (trainer.progress_bar_callback is not None)
        )

        def progress(iterable: Iterable[Any]) -> Iterable[Any]:
            from tqdm.auto import tqdm

            return tqdm(iterable, total=total, desc="Fitting scales", disable=not show, leave=False)

        def broadcast(tensor: torch.Tensor) -> torch.Tensor:
            return trainer.strategy.broadcast(tensor, src=0) if world_size > 1 else tensor

        def all_reduce(tensor: torch.Tensor) -> torch.Tensor:
            if world_size == 1 or not torch.distributed.is_initialized():
                return tensor
            reduced = tensor.to(trainer.strategy.root_device)
            torch.distributed.all_reduce(reduced)
            return reduced.to(tensor.device)

        self.summary = fit_pass(
            batches,
            scaler,
            composition,
            fixed_scales=self.fixed_scales,
            fixed_baseline=self.fixed_baseline,
            unpack=self._unpack,
            broadcast=broadcast,
            all_reduce=all_reduce,
            progress=progress,
        )
        if self.save_statistics is not None and trainer.is_global_zero:
            write_statistics(self.save_statistics, scaler, composition, self._units(pl_module))
        self._hand_over(pl_module)

    def _units(self, pl_module: pl.LightningModule) -> dict[str, str]:
        """Target units, from the options of the LossModules (e.g. ``eV``)."""
        units: dict[str, str] = {}
        for module in self._loss_modules(pl_module):
            for name, options in module.target_options.items():
                if isinstance(options, Mapping) and options.get("unit"):
                    units.setdefault(name, str(options["unit"]))
        return units

    def _load_statistics(
        self,
        trainer: pl.Trainer,
        pl_module: pl.LightningModule,
        scaler: Scaler,
        composition: CompositionModel | None,
    ) -> None:
        """Load ``statistics`` (identical on every rank: no collective needed)."""
        load_statistics(self.statistics, scaler, composition, self._units(pl_module))
        data_types = getattr(getattr(trainer, "datamodule", None), "atomic_types", None)
        if data_types is not None:
            missing = sorted(set(data_types) - set(self.statistics["atomic_types"]))
            if missing:
                raise ValueError(
                    f"{self.statistics['_source']}: no statistics for atomic type(s) "
                    f"{missing} of the training data (the file has "
                    f"{self.statistics['atomic_types']})"
                )
        self.summary = None
        self._hand_over(pl_module)

    # -- sharding --------------------------------------------------------------------
    @staticmethod
    def _shard(loader: Any, rank: int, world_size: int) -> tuple[Iterable[Any], int | None]:
        """This rank's strided share: structures ``rank::world_size`` of a map-style
        DataLoader's dataset (same batch size and collate function), otherwise batches
        ``rank::world_size`` of the iterable. Never padded. A loader whose sampler
        already gives this rank its share with each structure once over all ranks
        (``each_sample_once``, e.g. batches bounded by atoms) is used as it is."""
        sampler = getattr(loader, "sampler", None)
        if (
            getattr(sampler, "each_sample_once", False)
            and getattr(sampler, "num_replicas", None) == world_size
            and getattr(sampler, "rank", None) == rank
        ):
            return loader, len(loader)
        if (
            isinstance(loader, DataLoader)
            and not isinstance(loader.dataset, IterableDataset)
            and isinstance(loader.dataset, Sized)
            and loader.batch_size is not None
        ):
            indices = range(rank, len(loader.dataset), world_size)
            shard = DataLoader(
                Subset(loader.dataset, indices),
                batch_size=loader.batch_size,
                shuffle=False,
                collate_fn=loader.collate_fn,
                num_workers=loader.num_workers,
                worker_init_fn=loader.worker_init_fn,
                multiprocessing_context=loader.multiprocessing_context,
            )
            return shard, len(shard)
        if not isinstance(loader, Iterable):
            raise ValueError(
                f"ScalerCallback: the training dataloader ({type(loader).__name__}) is not iterable"
            )
        total = None
        if isinstance(loader, Sized):
            total = len(range(rank, len(loader), world_size))
        return _strided(loader, rank, world_size), total


def _strided(iterable: Iterable[Any], rank: int, world_size: int) -> Iterator[Any]:
    for index, item in enumerate(iterable):
        if index % world_size == rank:
            yield item


def _mapping_or_file(
    value: Mapping[str, Any] | str | Path | None, from_file: Callable[[Any], dict[str, Any]]
) -> dict[str, Any] | None:
    """A mapping as given, or the matching part of a statistics file (a path)."""
    if value is None or (isinstance(value, Mapping) and not value):
        return None
    if isinstance(value, (str, Path)):
        return from_file(value)
    if not isinstance(value, Mapping):
        raise ValueError(
            f"ScalerCallback: expected a mapping of target -> values or the path of a "
            f"statistics file, got {value!r}"
        )
    return dict(value)
