"""Loss schedules: weights, types and parameters of the loss terms that change with the
epoch (MACE's "stage two": energy weight up, force weight down late in training).

.. code-block:: yaml

    loss_schedule:
      - epoch: 80                  # from epoch 80 on (0-based, Lightning's current_epoch)
        loss: {energy: {weight: 1000.0, forces: {weight: 10.0}}}
      - epoch: 120
        loss: {energy: {forces: mae}}   # a new type; the weight stays
        ramp_epochs: 10            # numeric weights move linearly over 10 epochs

.. code-block:: python

    trainer = L.Trainer(callbacks=[ScalerCallback(), LossScheduleCallback(stages)])

Each stage's ``loss`` is a partial loss config in any form of the grammar, merged over
the config in effect before it (:func:`pl_mtt.config.merge_loss_config`): it changes
weights, types and parameters of existing terms, never adds or removes one. With
``ramp_epochs: K`` the weights in effect at epoch ``N + k`` are ``w0 + (w1 - w0) *
min(k + 1, K) / K``, where ``w0`` are the weights in effect at epoch ``N - 1`` (possibly
in the middle of an earlier ramp) and ``w1`` the stage's; types and parameters change
at epoch ``N``. The configuration of an epoch is a function of the epoch alone, so a run
resumed from a checkpoint continues with the stage (and ramp) of its epoch, and every
DDP rank, which has the same epoch, holds the same weights.
"""

from __future__ import annotations

import copy
import itertools
import weakref
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import lightning.pytorch as pl

from pl_mtt.config import check_known_keys, loss_terms, merge_loss_config, to_plain
from pl_mtt.loss_module import NO_PROPERTY_SCALES, LossModule

__all__ = ["LossSchedule", "LossScheduleCallback", "LossStage", "parse_stages"]

STAGE_KEYS = ("epoch", "loss", "ramp_epochs")


@dataclass(frozen=True)
class LossStage:
    """One stage: ``loss`` (partial config) in effect from ``epoch`` on, its numeric
    weights reached over ``ramp_epochs`` epochs (0 or 1: at once)."""

    epoch: int
    loss: Any
    ramp_epochs: int = 0
    path: str = "loss_schedule[0]"


def _count(value: Any, path: str) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < 0:
        raise ValueError(f"{path}: expected a non-negative integer, got {value!r}")
    return value


def parse_stages(stages: Any, path: str = "loss_schedule") -> list[LossStage]:
    """A list of ``{epoch, loss, ramp_epochs}`` mappings -> stages sorted by epoch."""
    stages = to_plain(stages)
    if stages is None:
        return []
    if isinstance(stages, Mapping) or not isinstance(stages, Sequence) or isinstance(stages, str):
        raise ValueError(
            f"{path}: expected a list of stages ({{epoch: N, loss: ...}}), got {stages!r}"
        )
    parsed = []
    for index, stage in enumerate(stages):
        stage_path = f"{path}[{index}]"
        if not isinstance(stage, Mapping):
            raise ValueError(
                f"{stage_path}: expected a mapping with 'epoch' and 'loss', got {stage!r}"
            )
        check_known_keys(stage, STAGE_KEYS, stage_path)
        for key in ("epoch", "loss"):
            if key not in stage:
                raise ValueError(f"{stage_path}: missing '{key}'")
        parsed.append(
            LossStage(
                epoch=_count(stage["epoch"], f"{stage_path}.epoch"),
                loss=stage["loss"],
                ramp_epochs=_count(stage.get("ramp_epochs", 0), f"{stage_path}.ramp_epochs"),
                path=stage_path,
            )
        )
    parsed.sort(key=lambda stage: stage.epoch)
    for first, second in itertools.pairwise(parsed):
        if first.epoch == second.epoch:
            raise ValueError(
                f"{second.path}.epoch: {first.path} starts at epoch {first.epoch} too; "
                f"give one stage per epoch"
            )
    return parsed


def _weights(config: Mapping[str, Any]) -> dict[tuple[str, str | None], float]:
    weights = {}
    for target, entry in config.items():
        weights[target, None] = entry["weight"]
        for gradient, term in entry["gradients"].items():
            weights[target, gradient] = term["weight"]
    return weights


def _with_weights(config: Mapping[str, Any], weights: Mapping) -> dict[str, dict]:
    config = copy.deepcopy(dict(config))
    for (target, gradient), weight in weights.items():
        entry = config[target] if gradient is None else config[target]["gradients"][gradient]
        entry["weight"] = weight
    return config


def _ramp(start: Mapping, end: Mapping, stage: LossStage, epoch: int) -> dict:
    """Weights at ``epoch`` of a stage ramping from ``start`` to ``end``."""
    done = epoch - stage.epoch + 1  # epochs of the ramp completed at this epoch
    if stage.ramp_epochs <= 1 or done >= stage.ramp_epochs:
        return dict(end)
    fraction = done / stage.ramp_epochs
    return {key: start[key] + (end[key] - start[key]) * fraction for key in end}


class LossSchedule:
    """The loss configuration of every epoch, from a base config and stages.

    Args:
        base: the loss config before the first stage (any form).
        stages: the stages (:func:`parse_stages` input or output).
        targets: training target options (those of the ``LossModule``).

    Raises:
        ValueError: naming the stage and key of a bad stage, a stage that adds or
            removes a term, or one that changes a term to or from ``masked_dos`` (the
            DOS scales and baseline are decided before training).
    """

    def __init__(self, base: Any, stages: Any, targets: Mapping[str, Any]) -> None:
        self.targets = to_plain(targets) or {}
        self.base = merge_loss_config(base, None, self.targets)
        stages = to_plain(stages)
        if isinstance(stages, (list, tuple)) and all(isinstance(s, LossStage) for s in stages):
            self.stages = sorted(stages, key=lambda stage: stage.epoch)
        else:
            self.stages = parse_stages(stages)
        self.configs: list[dict] = []  # the config each stage reaches
        self.starts: list[dict] = []  # the weights in effect the epoch before it
        config, weights = self.base, _weights(self.base)
        previous: LossStage | None = None
        for stage in self.stages:
            new = merge_loss_config(config, stage.loss, self.targets, f"{stage.path}.loss")
            self._check_dos(config, new, stage)
            if previous is not None:
                weights = _ramp(weights, _weights(config), previous, stage.epoch - 1)
            self.starts.append(weights)
            self.configs.append(new)
            config, previous = new, stage

    @staticmethod
    def _check_dos(old: Mapping, new: Mapping, stage: LossStage) -> None:
        for target, entry in new.items():
            before, after = old[target]["type"], entry["type"]
            if (before in NO_PROPERTY_SCALES) != (after in NO_PROPERTY_SCALES):
                raise ValueError(
                    f"{stage.path}.loss.{target}.type: a stage cannot change '{before}' to "
                    f"'{after}' (the scales and baseline of DOS targets are decided before "
                    f"training)"
                )

    def config_at(self, epoch: int) -> dict[str, dict]:
        """The expanded loss config in effect at ``epoch`` (0-based)."""
        current = None
        for index, stage in enumerate(self.stages):
            if stage.epoch <= epoch:
                current = index
        if current is None:
            return copy.deepcopy(self.base)
        stage, config = self.stages[current], self.configs[current]
        weights = _ramp(self.starts[current], _weights(config), stage, epoch)
        return _with_weights(config, weights)

    def weights_at(self, epoch: int) -> dict[str, float]:
        """Term name (``energy``, ``energy/forces``, ...) -> weight at ``epoch``."""
        return _term_weights(self.config_at(epoch), self.targets)


def _term_weights(config: Mapping[str, Any], targets: Mapping[str, Any]) -> dict[str, float]:
    return {name: term["weight"] for name, _, _, term in loss_terms(config, targets)}


class LossScheduleCallback(pl.Callback):
    """Applies a loss schedule to every :class:`pl_mtt.LossModule` of the LightningModule
    at the start of each training epoch, and logs the weights in effect as
    ``loss_weight/<term>`` (``loss_weight/<module>/<term>`` when the module's
    LossModules start from different configs).

    The schedule is merged over the config each LossModule has when the callback first
    sees it (in ``setup``, before any training; stages are validated there). Training,
    validation and test LossModules follow the same schedule.

    Args:
        stages: ``[{epoch: N, loss: <partial loss config>, ramp_epochs: K}, ...]``.
        log_weights: log the weights in effect once per epoch.

    .. code-block:: yaml

        # Hydra app: the top-level key
        loss_schedule:
          - {epoch: 80, loss: {energy: {weight: 1000.0, forces: {weight: 10.0}}}}
    """

    def __init__(self, stages: Any, *, log_weights: bool = True) -> None:
        super().__init__()
        self.stages = parse_stages(stages)
        self.log_weights = log_weights
        self._schedules: weakref.WeakKeyDictionary[LossModule, LossSchedule] = (
            weakref.WeakKeyDictionary()
        )

    def _modules(self, pl_module: pl.LightningModule) -> list[tuple[str, LossModule]]:
        return [(n, m) for n, m in pl_module.named_modules() if isinstance(m, LossModule)]

    def schedule(self, module: LossModule) -> LossSchedule:
        """The schedule of ``module`` (built from its config when first seen)."""
        schedule = self._schedules.get(module)
        if schedule is None:
            schedule = LossSchedule(module.config, self.stages, module.target_options)
            self._schedules[module] = schedule
        return schedule

    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        """Validate the stages against every LossModule (before anything runs)."""
        modules = self._modules(pl_module)
        if not modules:
            raise ValueError(
                f"LossScheduleCallback: {type(pl_module).__name__} holds no pl_mtt.LossModule"
            )
        for _, module in modules:
            self.schedule(module)

    def apply(self, pl_module: pl.LightningModule, epoch: int) -> None:
        """Give every LossModule of ``pl_module`` its configuration of ``epoch``."""
        for _, module in self._modules(pl_module):
            config = self.schedule(module).config_at(epoch)
            if config != module.config:
                module.reconfigure(config)

    def on_sanity_check_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self.apply(pl_module, trainer.current_epoch)  # a resumed run's validation too

    def on_train_epoch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self.apply(pl_module, trainer.current_epoch)
        if not self.log_weights:
            return
        modules = self._modules(pl_module)
        shared = all(self.schedule(m).base == self.schedule(modules[0][1]).base for _, m in modules)
        logged = {}
        for name, module in modules[:1] if shared else modules:
            prefix = "loss_weight/" if shared else f"loss_weight/{name}/"
            for term, value in module.terms.items():
                logged[prefix + term] = float(value.weight)
        # identical on every rank: "max" keeps them exact
        pl_module.log_dict(
            logged, on_step=False, on_epoch=True, sync_dist=True, reduce_fx="max", batch_size=1
        )
