"""One log line per epoch (as ``mtt train`` writes): its wall time and validation errors.

.. code-block:: text

    [2026-12-03 07:02:04,125][pl_mtt][INFO] - Epoch 3 | 12.41 s | val/loss 0.0123 | ...

Logged with :mod:`logging` (logger ``pl_mtt``) on rank 0: the Hydra app writes it to the
console and, with timestamps, to the run's log file.
"""

from __future__ import annotations

import logging
import time

import lightning.pytorch as pl

__all__ = ["EpochLog"]

LOGGER = logging.getLogger("pl_mtt")


class EpochLog(pl.Callback):
    """Logs ``Epoch <n> | <wall time> s | <validation metrics>`` at the end of each
    training epoch (validation included); ``metrics`` are the keys to show."""

    def __init__(
        self,
        metrics: tuple[str, ...] = ("val/loss", "val/energy_per_atom/MAE", "val/forces/MAE"),
    ) -> None:
        super().__init__()
        self.metrics = metrics
        self._start = time.perf_counter()

    def on_train_epoch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._start = time.perf_counter()

    def on_train_epoch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if not trainer.is_global_zero or trainer.sanity_checking:
            return
        parts = [f"Epoch {trainer.current_epoch}", f"{time.perf_counter() - self._start:.2f} s"]
        for key in self.metrics:
            value = trainer.callback_metrics.get(key)
            if value is not None:
                parts.append(f"{key} {float(value):.6g}")
        LOGGER.info(" | ".join(parts))
