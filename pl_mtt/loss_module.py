"""LossModule: the composite loss a ``training_step`` calls (skeleton, see issue 3)."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch

from pl_mtt.config import _to_plain, expand_loss_config

__all__ = ["LossModule"]


class LossModule(torch.nn.Module):
    """One loss term per (target, gradient), weighted and summed.

    The module does not own the scaler: it is not part of this module's
    ``state_dict`` (the LightningModule owns it, e.g. as ``pl_module.scaler``).
    """

    def __init__(
        self,
        loss: Any,
        targets: Mapping[str, Any],
        scaler: torch.nn.Module | None = None,
        *,
        global_mean: bool = False,
    ) -> None:
        super().__init__()
        self.target_options: dict[str, dict] = {
            name: dict(options or {}) for name, options in (_to_plain(targets) or {}).items()
        }
        self.config: dict[str, dict] = expand_loss_config(loss, self.target_options)
        self.global_mean = global_mean
        self._scaler: tuple[torch.nn.Module, ...] = ()
        if scaler is not None:
            self.set_scaler(scaler)

    @property
    def scaler(self) -> torch.nn.Module | None:
        """The scaler whose per-property scales are applied to predictions, or None."""
        return self._scaler[0] if self._scaler else None

    def set_scaler(self, scaler: torch.nn.Module | None) -> None:
        """Use ``scaler`` (not registered as a submodule: its owner checkpoints it)."""
        self._scaler = () if scaler is None else (scaler,)
