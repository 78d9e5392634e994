"""pl_mtt: metatrain's loss functions and target scaling for PyTorch Lightning.

- :func:`expand_loss_config` (:mod:`pl_mtt.config`): every loss-config form of the spec
  -> the internal form; loss types live in :mod:`pl_mtt.registry` and :mod:`pl_mtt.losses`;
- :class:`LossModule`: the weighted loss a ``training_step`` calls;
- :mod:`pl_mtt.scaling`: :class:`Scaler`, :class:`CompositionModel`, their one-pass fit
  and the pipeline between data, model and loss;
- :mod:`pl_mtt.training`: :class:`ScalerCallback`, :class:`LossScheduleCallback`,
  :class:`AtomisticTask`, metrics and the Hydra app (``python -m pl_mtt.train``);
- :mod:`pl_mtt.data`, :mod:`pl_mtt.models`: readers and datamodule, reference models;
- :mod:`pl_mtt.tensormaps`: helpers on metatensor objects;
- :mod:`pl_mtt.interop`: metatomic export (``python -m pl_mtt.export``) and
  :func:`calculator`, an ASE calculator for an exported model or a checkpoint.
"""

from pl_mtt import _legacy_paths, scaling
from pl_mtt.config import expand_loss_config
from pl_mtt.interop.ase_calculator import calculator
from pl_mtt.loss_module import LossModule
from pl_mtt.scaling import CompositionModel, Scaler, fit_pass
from pl_mtt.training import (
    AtomisticTask,
    InferenceModel,
    LossScheduleCallback,
    PhysicalMetrics,
    ScalerCallback,
)

_legacy_paths.install()

__all__ = [
    "AtomisticTask",
    "CompositionModel",
    "InferenceModel",
    "LossModule",
    "LossScheduleCallback",
    "PhysicalMetrics",
    "Scaler",
    "ScalerCallback",
    "calculator",
    "expand_loss_config",
    "fit_pass",
    "scaling",
]
__version__ = "0.1.0"
