"""Structured-config schema of the Hydra app, registered in Hydra's ConfigStore.

Groups with a fixed shape are dataclasses, so a misspelt override such as
``trainer.max_epoch=3`` fails at composition with the name of the bad key. The trainer
schema is generated from ``lightning.Trainer``'s own signature: every Trainer argument
is an override away (``trainer.devices=2 trainer.strategy=ddp``).

``loss`` is a string or a mapping, which OmegaConf cannot type as a union: it is
``Any`` here and validated by :func:`pl_mtt.expand_loss_config` when the app starts.
"""

from __future__ import annotations

import dataclasses
import inspect
from dataclasses import dataclass, field
from typing import Any

import lightning
from hydra.core.config_store import ConfigStore

__all__ = [
    "DataConfig",
    "ExportConfig",
    "OptimizerConfig",
    "ScalerConfig",
    "TrainConfig",
    "TrainerConfig",
    "register_configs",
]

# set by the app itself, not through the trainer group
_TRAINER_ARGS_SET_BY_APP = {"self", "logger", "callbacks", "plugins"}


def _trainer_config_class() -> type:
    fields = []
    for name, parameter in inspect.signature(lightning.Trainer.__init__).parameters.items():
        if name in _TRAINER_ARGS_SET_BY_APP or parameter.kind in (
            parameter.VAR_POSITIONAL,
            parameter.VAR_KEYWORD,
        ):
            continue
        default = parameter.default
        if default is inspect.Parameter.empty or not isinstance(
            default, (type(None), bool, int, float, str)
        ):
            default = None
        fields.append((name, Any, field(default=default)))
    return dataclasses.make_dataclass("TrainerConfig", fields)


TrainerConfig = _trainer_config_class()
TrainerConfig.__doc__ = "Keyword arguments of ``lightning.Trainer`` (generated from it)."


@dataclass
class DataConfig:
    """Where the structures and targets come from and how they are split and batched.

    .. code-block:: yaml

        data:
          dataset: emt              # an embedded dataset, or null with `path`
          path: null                # a file ase.io.read understands, a metatrain
                                    # DiskDataset .zip or MemmapDataset directory
          n_structures: null        # embedded: how many; a file: the first n
          targets:                  # the spec's training_set.targets form
            energy: {quantity: energy, key: dft_energy, forces: dft_forces}  # stress: detected
          extra_data: {}            # name -> {read_from: file.mts}
          batch_size: 8
          max_atoms_per_batch: null # or N: batches of at most N atoms, balanced across ranks
    """

    dataset: str | None = "emt"
    path: str | None = None
    n_structures: int | None = None
    targets: dict[str, Any] = field(default_factory=dict)
    extra_data: dict[str, Any] = field(default_factory=dict)
    val_fraction: float = 0.1
    test_fraction: float = 0.1
    indices: Any = None
    val_set: Any = None
    test_set: Any = None
    batch_size: int = 8
    drop_last: bool = False
    max_atoms_per_batch: int | None = None
    min_atoms_per_batch: int = 0
    num_workers: int = 0
    split_seed: int = 0
    dtype: str = "float64"


@dataclass
class ScalerConfig:
    """Target scaling (the spec's ``scale_targets``) and the composition baseline.

    .. code-block:: yaml

        scaler:
          statistics: null       # a statistics file: loaded, no fit (scaler.statistics=...)
          fixed_scales: null     # target -> scale (per type), or a statistics file
          fixed_baseline: null   # target -> baseline per type, or a statistics file
          save_statistics: true  # write <run>/statistics.yaml after a fit
    """

    scale_targets: bool = True
    composition: bool = True
    fixed_scales: Any = None
    fixed_baseline: Any = None
    statistics: str | None = None
    save_statistics: bool = True
    per_structure_targets: list[str] = field(default_factory=list)
    refit_on_resume: bool = False


@dataclass
class OptimizerConfig:
    """Adam(W) and its learning-rate schedule (see :mod:`pl_mtt.training.optim`).

    .. code-block:: yaml

        optimizer: {name: adam, lr: 1.0e-4, schedule: warmup_cosine, warmup_fraction: 0.01}
    """

    name: str = "adam"
    lr: float = 1e-3
    weight_decay: float = 0.0
    schedule: str = "exponential"
    lr_decay: float = 1.0
    warmup_fraction: float = 0.0
    grad_clip_norm: float | None = None


@dataclass
class ExportConfig:
    """The metatomic model written at the end of a run, and its metadata.

    .. code-block:: yaml

        export:
          path: model-metatomic.pt     # relative to the run directory; null: not written
          name: Cu/Au EMT potential    # default: "pl_mtt <model class> (<targets>)"
          description: null            # default: what was trained
          authors: []
          references: {}               # implementation / architecture / model: [...]
    """

    path: str | None = "model-metatomic.pt"
    name: str | None = None
    description: str | None = None
    authors: list[str] = field(default_factory=list)
    references: dict[str, Any] = field(default_factory=dict)


@dataclass
class TrainConfig:
    """The whole app config (``conf/config.yaml`` composes onto this)."""

    data: DataConfig = field(default_factory=DataConfig)
    model: Any = None
    trainer: TrainerConfig = field(default_factory=TrainerConfig)
    loss: Any = "mse"
    loss_schedule: list[Any] = field(default_factory=list)
    scaler: ScalerConfig = field(default_factory=ScalerConfig)
    optimizer: OptimizerConfig = field(default_factory=OptimizerConfig)
    export: ExportConfig = field(default_factory=ExportConfig)
    seed: int = 0
    mode: str = "train"
    dry_run: bool = False
    ckpt_path: str | None = None
    global_mean: bool = False
    options: str | None = None


def register_configs() -> None:
    """Register the schema in Hydra's ConfigStore (idempotent)."""
    ConfigStore.instance().store(name="train_schema", node=TrainConfig)
