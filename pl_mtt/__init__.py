"""pl_mtt: metatrain's loss functions and target scaling for PyTorch Lightning.

- :func:`expand_loss_config`: every loss-config form of the spec -> the internal form;
- :class:`LossModule`: the weighted loss a ``training_step`` calls;
- :class:`Scaler`, :class:`CompositionModel`, :mod:`pl_mtt.scaling`: target scaling;
- :class:`ScalerCallback`: fits them in one sharded pass before training;
- :class:`AtomisticTask`: a ready LightningModule; ``python -m pl_mtt.train``: the app.
"""

from pl_mtt import scaling
from pl_mtt.callbacks import ScalerCallback
from pl_mtt.composition import CompositionModel
from pl_mtt.config import expand_loss_config
from pl_mtt.fit_pass import fit_pass
from pl_mtt.loss_module import LossModule
from pl_mtt.metrics import PhysicalMetrics
from pl_mtt.scaler import Scaler
from pl_mtt.task import AtomisticTask, InferenceModel

__all__ = [
    "AtomisticTask",
    "CompositionModel",
    "InferenceModel",
    "LossModule",
    "PhysicalMetrics",
    "Scaler",
    "ScalerCallback",
    "expand_loss_config",
    "fit_pass",
    "scaling",
]
__version__ = "0.1.0"
