"""Optimizers and learning-rate schedules of the training task.

.. code-block:: yaml

    optimizer:                  # conf/optimizer/adam.yaml: pl_mtt's default
      name: adam                # adam | adamw
      lr: 3.0e-3
      weight_decay: 0.0
      schedule: exponential     # exponential (lr_decay per epoch) | warmup_cosine | constant
      lr_decay: 0.97
      warmup_fraction: 0.0
      grad_clip_norm: null      # clip the gradient norm before each step

    optimizer:                  # conf/optimizer/pet.yaml: metatrain's PET trainer
      name: adam                # adamw when its weight_decay is set
      lr: 1.0e-4
      schedule: warmup_cosine   # linear warmup, then cosine decay to 0, stepped per batch
      warmup_fraction: 0.01
      grad_clip_norm: 1.0

``warmup_cosine`` is the schedule of metatrain's trainers (PET, SOAP-BPNN): the factor
is ``step / warmup`` for the first ``warmup = int(warmup_fraction * total)`` steps, then
``(1 + cos(pi * (step - warmup) / (total - warmup))) / 2``, with ``total`` the number of
optimizer steps of the run (Lightning's ``estimated_stepping_batches``).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable

import torch

__all__ = ["OPTIMIZERS", "SCHEDULES", "make_optimizer", "warmup_cosine_factor"]

OPTIMIZERS = {"adam": torch.optim.Adam, "adamw": torch.optim.AdamW}
SCHEDULES = ("exponential", "warmup_cosine", "constant")


def make_optimizer(
    parameters: Iterable[torch.nn.Parameter], name: str, lr: float, weight_decay: float
) -> torch.optim.Optimizer:
    """``torch.optim.Adam`` or ``AdamW`` (``name``) with ``lr`` and ``weight_decay``."""
    if name not in OPTIMIZERS:
        raise ValueError(f"optimizer.name: expected one of {sorted(OPTIMIZERS)}, got {name!r}")
    return OPTIMIZERS[name](parameters, lr=lr, weight_decay=weight_decay)


def warmup_cosine_factor(total_steps: int, warmup_fraction: float) -> Callable[[int], float]:
    """The learning-rate factor of step ``i`` (a ``LambdaLR`` function): linear warmup
    over ``int(warmup_fraction * total_steps)`` steps, then cosine decay to 0."""
    if not 0.0 <= warmup_fraction < 1.0:
        raise ValueError(f"optimizer.warmup_fraction must be in [0, 1), got {warmup_fraction}")
    total = int(total_steps)
    warmup = int(warmup_fraction * total)

    def factor(step: int) -> float:
        if step < warmup:
            return step / max(1, warmup)
        progress = (step - warmup) / max(1, total - warmup)
        return 0.5 * (1.0 + math.cos(math.pi * progress))

    return factor
