"""Functional cores of the losses: plain tensors in, tensor out.

One module per loss family; the TensorMap adapters in :mod:`pl_mtt.losses` are thin
wrappers over these. They make no host-device synchronisation and compile with
``torch.compile(fullgraph=True)``.
"""

from pl_mtt.losses.functional.dos import dos_alignment_shifts, masked_dos_loss
from pl_mtt.losses.functional.ensemble import (
    empirical_crps,
    ensemble_loss,
    ensemble_mean_and_variance,
    ensemble_sum_and_count,
    gaussian_crps,
    gaussian_nll,
)
from pl_mtt.losses.functional.pointwise import pointwise_loss, pointwise_sum_and_count
from pl_mtt.losses.functional.shift_agnostic import (
    shift_agnostic_alignment,
    shift_agnostic_mse_loss,
)

__all__ = [
    "dos_alignment_shifts",
    "empirical_crps",
    "ensemble_loss",
    "ensemble_mean_and_variance",
    "ensemble_sum_and_count",
    "gaussian_crps",
    "gaussian_nll",
    "masked_dos_loss",
    "pointwise_loss",
    "pointwise_sum_and_count",
    "shift_agnostic_alignment",
    "shift_agnostic_mse_loss",
]
