"""Training with Lightning: the AtomisticTask, the ScalerCallback, the LossScheduleCallback,
physical-unit metrics, evaluation and plots, and the Hydra app behind
``python -m pl_mtt.train``.
"""

from pl_mtt.training.callbacks import ScalerCallback
from pl_mtt.training.loss_schedule import LossSchedule, LossScheduleCallback
from pl_mtt.training.metrics import PhysicalMetrics, metric_specs
from pl_mtt.training.task import AtomisticTask, InferenceModel

__all__ = [
    "AtomisticTask",
    "InferenceModel",
    "LossSchedule",
    "LossScheduleCallback",
    "PhysicalMetrics",
    "ScalerCallback",
    "metric_specs",
]
