"""Target scaling: the Scaler, the composition baseline, their one-pass fit, and the
pipeline between data, model and loss (spec: "How scales are applied").

The pipeline functions stay importable as ``pl_mtt.scaling.prepare_for_loss`` etc.
"""

from pl_mtt.scaling.composition import CompositionModel
from pl_mtt.scaling.fit import FitSummary, fit_pass, unpack_batch
from pl_mtt.scaling.pipeline import (
    divide_by_atoms,
    for_metrics,
    multiply_by_atoms,
    predictions_for_loss,
    prepare_for_loss,
    targets_for_loss,
    targets_from_loss,
    to_physical,
)
from pl_mtt.scaling.scaler import Scaler, rms_scales

__all__ = [
    "CompositionModel",
    "FitSummary",
    "Scaler",
    "divide_by_atoms",
    "fit_pass",
    "for_metrics",
    "multiply_by_atoms",
    "predictions_for_loss",
    "prepare_for_loss",
    "rms_scales",
    "targets_for_loss",
    "targets_from_loss",
    "to_physical",
    "unpack_batch",
]
