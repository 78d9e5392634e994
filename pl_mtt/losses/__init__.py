"""Loss terms on TensorMaps and the registry of loss types.

Built-in types: ``mse mae huber masked_mse masked_mae masked_huber masked_dos
gaussian_nll_ensemble gaussian_crps_ensemble empirical_crps_ensemble``, and metatrain's
``shift_agnostic_mse``. Register your
own with :func:`register_loss_type`; it then works from YAML like a built-in.
"""

from pl_mtt.losses import dos, ensemble, pointwise, shift_agnostic  # noqa: F401  (registry)
from pl_mtt.losses.base import LossTerm, PerStructureLoss, create_loss, reduce_loss
from pl_mtt.losses.dos import MaskedDOSLoss
from pl_mtt.losses.ensemble import EnsembleLoss
from pl_mtt.losses.pointwise import PointwiseLoss
from pl_mtt.losses.shift_agnostic import ShiftAgnosticMSELoss
from pl_mtt.registry import Param, register_loss_type

__all__ = [
    "EnsembleLoss",
    "LossTerm",
    "MaskedDOSLoss",
    "Param",
    "PerStructureLoss",
    "PointwiseLoss",
    "ShiftAgnosticMSELoss",
    "create_loss",
    "reduce_loss",
    "register_loss_type",
]
