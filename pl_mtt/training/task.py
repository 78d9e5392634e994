"""AtomisticTask: the LightningModule that trains any ``systems -> Dict[str, TensorMap]``
model with pl_mtt's losses, scaling pipeline and physical-unit metrics.

.. code-block:: python

    datamodule = AtomisticDataModule("emt")
    datamodule.setup()
    task = AtomisticTask(RadialMLP(), loss="mse", targets=datamodule.target_options)
    trainer = L.Trainer(callbacks=[ScalerCallback()], inference_mode=False, max_epochs=5)
    trainer.fit(task, datamodule)

.. code-block:: yaml

    optimizer: {lr: 1.0e-3, weight_decay: 0.0, lr_decay: 0.99}   # Adam, decay per epoch
    optimizer: {lr: 1.0e-4, schedule: warmup_cosine, warmup_fraction: 0.01, grad_clip_norm: 1.0}

Each step runs :mod:`pl_mtt.scaling`: the targets lose their composition baseline and
are divided by atoms (metatrain's rule) and by the per-target scales, the model's raw
outputs are divided by atoms, and the :class:`LossModule` computes the loss. Metrics are
MAE and RMSE per target and gradient in physical units (per atom where divided),
accumulated over the epoch and reduced across DDP ranks; the loss terms are logged as
exact epoch aggregates. ``predict_step`` returns physical predictions (full scales,
baseline added). Forces are computed by autograd, so the Trainer needs
``inference_mode=False`` (validation runs under ``torch.enable_grad``).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import hydra
import lightning.pytorch as pl
import torch
from metatensor.torch import Labels, TensorBlock, TensorMap

from pl_mtt import scaling
from pl_mtt.config import to_plain
from pl_mtt.loss_module import LossModule
from pl_mtt.training.callbacks import ScalerCallback
from pl_mtt.training.metrics import PhysicalMetrics, metric_specs
from pl_mtt.training.optim import OPTIMIZERS, SCHEDULES, make_optimizer, warmup_cosine_factor
from pl_mtt.training.profiles import align_profile, profile_targets

__all__ = ["AtomisticTask", "InferenceModel"]


class InferenceModel(torch.nn.Module):
    """A trained model with its scales and baseline: ``systems -> physical outputs``.

    Outputs are in the units of the data (total, not per atom): raw model output x full
    scales + composition baseline.
    """

    def __init__(
        self,
        model: torch.nn.Module,
        scaler: torch.nn.Module | None,
        composition: torch.nn.Module | None,
    ) -> None:
        super().__init__()
        self.model = model
        self.scaler = scaler
        self.composition = composition

    def forward(self, systems: list) -> dict[str, TensorMap]:
        return scaling.to_physical(systems, self.model(systems), self.scaler, self.composition)


class AtomisticTask(pl.LightningModule):
    """Trains ``model`` on ``targets`` with the loss ``loss`` (any loss-config form).

    Args:
        model: ``model(systems) -> Dict[str, TensorMap]`` in scaled, baseline-free units
            (or None with ``model_config``).
        loss: loss config (see :func:`pl_mtt.expand_loss_config`).
        targets: resolved training target options (``AtomisticDataModule.target_options``).
        lr, weight_decay: the optimizer's parameters; ``optimizer``: ``adam`` or ``adamw``.
        schedule: ``exponential`` (``lr_decay`` per epoch), ``warmup_cosine`` (metatrain's
            trainers: linear warmup over ``warmup_fraction`` of the steps, then cosine
            decay to 0, per step) or ``constant`` (see :mod:`pl_mtt.training.optim`).
        grad_clip_norm: clip the gradient norm to this before each step (None: no
            clipping; a Trainer's ``gradient_clip_val`` takes precedence).
        per_structure_targets: per-structure targets not divided by atoms (the same list
            as the :class:`ScalerCallback`'s).
        global_mean: exact global means of the training loss under DDP.
        model_config: a Hydra config (``_target_`` + arguments) that builds ``model``;
            saved with the hyperparameters, so ``load_from_checkpoint(path)`` needs
            nothing else.
    """

    def __init__(
        self,
        model: torch.nn.Module | None = None,
        loss: Any = "mse",
        targets: Mapping[str, Any] | None = None,
        *,
        lr: float = 1e-3,
        weight_decay: float = 0.0,
        lr_decay: float = 1.0,
        optimizer: str = "adam",
        schedule: str = "exponential",
        warmup_fraction: float = 0.0,
        grad_clip_norm: float | None = None,
        per_structure_targets: Sequence[str] = (),
        global_mean: bool = False,
        model_config: Mapping[str, Any] | None = None,
    ) -> None:
        super().__init__()
        targets = {n: dict(o or {}) for n, o in (to_plain(targets) or {}).items()}
        loss, model_config = to_plain(loss), to_plain(model_config)  # plain, picklable
        if schedule not in SCHEDULES:
            raise ValueError(f"optimizer.schedule: expected one of {SCHEDULES}, got {schedule!r}")
        if optimizer not in OPTIMIZERS:
            raise ValueError(
                f"optimizer.name: expected one of {sorted(OPTIMIZERS)}, got {optimizer!r}"
            )
        self.save_hyperparameters(ignore=["model"])
        if model is None:
            if model_config is None:
                raise ValueError("AtomisticTask needs a model or a model_config to build one")
            model = hydra.utils.instantiate(model_config)
        self.model = model
        self.target_options = targets
        # one LossModule per stage: separate epoch aggregates; no per-step collective in
        # validation, whose unpadded shards differ in length across ranks
        self.loss = LossModule(loss, targets, global_mean=global_mean)
        self.val_loss = LossModule(loss, targets)
        self.test_loss = LossModule(loss, targets)
        # profiles with a shift-aligned loss (masked_dos, shift_agnostic_mse)
        self.dos_targets = profile_targets(self.loss.config)
        divided = [
            name
            for name, options in targets.items()
            if not options.get("per_atom") and name not in per_structure_targets
        ]
        gradients = {name: list(entry["gradients"]) for name, entry in self.loss.config.items()}
        specs = metric_specs(targets, per_atom_normalized=divided, gradients=gradients)
        self.train_metrics = PhysicalMetrics(specs, "train")
        self.val_metrics = PhysicalMetrics(specs, "val")
        self.test_metrics = PhysicalMetrics(specs, "test")
        self.scaler: torch.nn.Module | None = None
        self.composition: torch.nn.Module | None = None
        # the last training epoch (0-based): the epoch of the test row in the logs
        self.last_train_epoch: int | None = None

    # -- the pipeline ----------------------------------------------------------------
    def forward(self, systems: list) -> dict[str, TensorMap]:
        """Physical predictions (inference units: total, baseline added)."""
        return scaling.to_physical(systems, self.model(systems), self.scaler, self.composition)

    def inference_model(self) -> InferenceModel:
        """The model with its scales and baseline, for saving and inference."""
        return InferenceModel(self.model, self.scaler, self.composition)

    def _stage_modules(self, stage: str) -> tuple[LossModule, PhysicalMetrics]:
        """The LossModule and metrics of ``stage`` (each stage has its own state)."""
        if stage == "train":
            return self.loss, self.train_metrics
        if stage == "val":
            return self.val_loss, self.val_metrics
        return self.test_loss, self.test_metrics

    def _step(self, batch: tuple, stage: str) -> torch.Tensor:
        systems, targets, extra_data = batch
        predictions = self.model(systems)
        predictions, targets = scaling.prepare_for_loss(self, systems, predictions, targets)
        loss_module, metrics = self._stage_modules(stage)
        loss = loss_module(predictions, targets, extra_data, systems)
        with torch.no_grad():
            physical_predictions, physical_targets = scaling.for_metrics(
                systems, predictions, targets, self.scaler
            )
            physical_predictions, physical_targets = self._align_dos(
                physical_predictions, physical_targets, extra_data
            )
            metrics.update(physical_predictions, physical_targets, systems)
        if stage == "train":
            self.log("train/loss_step", loss.detach(), batch_size=len(systems), prog_bar=True)
        return loss

    def _align_dos(
        self,
        predictions: dict[str, TensorMap],
        targets: dict[str, TensorMap],
        extra_data: Mapping[str, TensorMap] | None,
    ) -> tuple[dict[str, TensorMap], dict[str, TensorMap]]:
        """Profile (DOS) metrics compare the aligned window with the target (masked-out
        points become NaN and are left out)."""
        if not self.dos_targets:
            return predictions, targets
        # copies that compute nothing yet (the mappings of pl_mtt.scaling stay lazy)
        predictions, targets = predictions.copy(), targets.copy()
        for name, entry in self.dos_targets.items():
            if name not in predictions or name not in targets:
                continue
            prediction = predictions[name].block_by_id(0)
            target = targets[name].block_by_id(0)
            aligned, values, mask, _ = align_profile(
                entry, prediction.values, target.values, extra_data, name
            )
            masked = torch.where(mask != 0, values, torch.nan)
            n = aligned.shape[1]
            properties = Labels(["point"], torch.arange(n, device=aligned.device).reshape(-1, 1))
            predictions[name] = _single_block(predictions[name], aligned, properties)
            targets[name] = _single_block(targets[name], masked, properties)
        return predictions, targets

    # -- Lightning hooks -------------------------------------------------------------
    def training_step(self, batch: tuple, batch_idx: int) -> torch.Tensor:
        return self._step(batch, "train")

    def validation_step(self, batch: tuple, batch_idx: int) -> None:
        with torch.enable_grad():  # forces and stress are gradients
            self._step(batch, "val")

    def test_step(self, batch: tuple, batch_idx: int) -> None:
        with torch.enable_grad():
            self._step(batch, "test")

    def predict_step(self, batch: tuple, batch_idx: int) -> dict[str, TensorMap]:
        systems = batch[0]
        with torch.enable_grad():
            predictions = self(systems)
        return {name: tensor_map.to("cpu") for name, tensor_map in predictions.items()}

    def _log_epoch(self, stage: str) -> None:
        loss_module, metrics = self._stage_modules(stage)
        terms = loss_module.compute()  # exact epoch aggregates, reduced across ranks
        weights = {name: term.weight for name, term in loss_module.terms.items()}
        total = sum(weights[name] * value for name, value in terms.items())
        logged = {f"{stage}/loss/{name}": value for name, value in terms.items()}
        logged[f"{stage}/loss"] = total
        if stage == "test" and self.last_train_epoch is not None:
            # Lightning would log the epoch counter, one past the last trained epoch
            logged["epoch"] = float(self.last_train_epoch)
        # the aggregates are already global and identical on every rank: "max" returns
        # them exactly (and keeps Lightning's epoch-level bookkeeping consistent)
        self.log_dict(logged, on_step=False, on_epoch=True, sync_dist=True, reduce_fx="max")
        loss_module.reset()
        # torchmetrics reduces the metric states across ranks in compute()
        self.log_dict(
            metrics.compute(), on_step=False, on_epoch=True, sync_dist=True, reduce_fx="max"
        )
        metrics.reset()

    def on_train_epoch_end(self) -> None:
        self.last_train_epoch = self.current_epoch
        self._log_epoch("train")

    def on_validation_epoch_end(self) -> None:
        self._log_epoch("val")

    def on_test_epoch_end(self) -> None:
        self._log_epoch("test")

    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        ScalerCallback.restore(self, checkpoint)  # scaler/composition before the weights
        if "epoch" in checkpoint:
            self.last_train_epoch = int(checkpoint["epoch"])

    def configure_optimizers(self) -> Any:
        hparams = self.hparams
        optimizer = make_optimizer(
            self.model.parameters(),
            hparams.get("optimizer", "adam"),
            hparams.lr,
            hparams.weight_decay,
        )
        schedule = hparams.get("schedule", "exponential")
        if schedule == "warmup_cosine":
            factor = warmup_cosine_factor(
                self.trainer.estimated_stepping_batches, hparams.get("warmup_fraction", 0.0)
            )
            scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, factor)
            return {
                "optimizer": optimizer,
                "lr_scheduler": {"scheduler": scheduler, "interval": "step"},
            }
        if schedule == "constant" or hparams.lr_decay == 1.0:
            return optimizer
        scheduler = torch.optim.lr_scheduler.ExponentialLR(optimizer, gamma=hparams.lr_decay)
        return {"optimizer": optimizer, "lr_scheduler": scheduler}

    def configure_gradient_clipping(
        self,
        optimizer: torch.optim.Optimizer,
        gradient_clip_val: float | None = None,
        gradient_clip_algorithm: str | None = None,
    ) -> None:
        """The Trainer's ``gradient_clip_val`` if set, else ``grad_clip_norm`` (norm)."""
        clip_norm = self.hparams.get("grad_clip_norm")
        if gradient_clip_val is None and clip_norm is not None:
            gradient_clip_val, gradient_clip_algorithm = clip_norm, "norm"
        self.clip_gradients(optimizer, gradient_clip_val, gradient_clip_algorithm)


def _single_block(like: TensorMap, values: torch.Tensor, properties: Labels) -> TensorMap:
    block = like.block_by_id(0)
    return TensorMap(like.keys, [TensorBlock(values, block.samples, [], properties)])
