"""Ensemble scoring rules on LLPR ensemble outputs (TensorMap adapter).

.. code-block:: yaml

    loss:
      energy:
        type: empirical_crps_ensemble   # or gaussian_nll_ensemble, gaussian_crps_ensemble
        forces: empirical_crps_ensemble # needs gradients on energy_ensemble too

The term reads the ensemble output ``ensemble_output_name(target)`` from the predictions
(``energy`` -> ``energy_ensemble``, ``mtt::x`` -> ``mtt::aux::x_ensemble``). Its blocks
have the target's keys, sample count and components, and ``M x P`` properties: ``M``
members (outermost) times the target's ``P`` properties (DESIGN decision 6). The score
is :func:`pl_mtt.losses.functional.ensemble.ensemble_sum_and_count` over every entry of every
block (or gradient block); NaN targets are ignored. ``sample_weights`` and
``type_weights`` weight the target's entries (:mod:`pl_mtt.losses.weights`): every member
of an entry's ensemble has the entry's weight.
"""

from __future__ import annotations

from functools import partial

import torch
from metatensor.torch import TensorBlock, TensorMap

from pl_mtt.losses.base import (
    LossTerm,
    block_name,
    check_same_layout,
    flatten_weights,
    values_signature,
)
from pl_mtt.losses.functional.ensemble import ENSEMBLE_KINDS, ensemble_sum_and_count, min_members
from pl_mtt.registry import register_loss_type
from pl_mtt.tensormaps.builders import TensorMaps, ensemble_output_name

__all__ = ["EnsembleLoss"]


class EnsembleLoss(LossTerm):
    """Scoring rule ``kind`` (``gaussian_nll``, ``gaussian_crps``, ``empirical_crps``)
    of the target's ensemble output against the target."""

    def __init__(self, *, kind: str, **kwargs) -> None:
        super().__init__(**kwargs)
        self.min_members = min_members(kind)  # validates kind
        self.kind = kind

    @property
    def prediction_key(self) -> str:
        return ensemble_output_name(self.target)

    def _members(self, ensemble: list[torch.Tensor], target: list[torch.Tensor]) -> int | None:
        """Member count ``M`` if every block has ``M x`` the target's properties and the
        target's other dimensions, else ``None``."""
        if len(ensemble) != len(target) or len(target) == 0 or target[0].shape[-1] == 0:
            return None
        n_members = ensemble[0].shape[-1] // target[0].shape[-1]
        for e, t in zip(ensemble, target, strict=True):
            if e.shape[:-1] != t.shape[:-1] or e.shape[-1] != n_members * t.shape[-1]:
                return None
        return n_members

    def _full_check(
        self,
        ensemble: TensorMap,
        e_blocks: list[TensorBlock],
        target: TensorMap,
        t_blocks: list[TensorBlock],
    ) -> None:
        what = f"ensemble output '{self.prediction_key}'"
        check_same_layout(
            self, target, t_blocks, ensemble, e_blocks, ("target", what), properties=False
        )
        if len(t_blocks) == 0:
            raise self.error("the target has no blocks")
        counts = set()
        for index, (e, t) in enumerate(zip(e_blocks, t_blocks, strict=True)):
            n_target, n_ensemble = len(t.properties), len(e.properties)
            if n_target == 0 or n_ensemble % n_target != 0 or n_ensemble == 0:
                raise self.error(
                    f"{block_name(target, index)}: the {what} has {n_ensemble} properties, "
                    f"expected M x {n_target} (M members times the target's properties)"
                )
            counts.add(n_ensemble // n_target)
        if len(counts) != 1:
            raise self.error(f"the {what} has different member counts per block: {sorted(counts)}")
        n_members = counts.pop()
        if n_members < self.min_members:
            raise self.error(
                f"'{self.kind}_ensemble' needs at least {self.min_members} ensemble members "
                f"(a variance), the {what} has {n_members}"
            )
        self.check_dtype_device(e_blocks[0].values, what, t_blocks[0].values, "target")

    def sum_and_count(
        self,
        predictions: TensorMaps,
        targets: TensorMaps,
        extra_data: TensorMaps | None = None,
        systems: list | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        ensemble = self.lookup(predictions, self.prediction_key, "predictions")
        target = self.lookup(targets, self.target, "targets")
        e_blocks = self.term_blocks(ensemble, f"the ensemble output '{self.prediction_key}'")
        t_blocks = self.term_blocks(target, "the target")
        e_values = [block.values for block in e_blocks]
        t_values = [block.values for block in t_blocks]
        n_members = self._members(e_values, t_values)
        if n_members is None:
            self._full_check(ensemble, e_blocks, target, t_blocks)  # names the mismatch
            raise self.error("ensemble output and target blocks differ in shape")
        self.check_once(
            values_signature(e_values, t_values),
            lambda: self._full_check(ensemble, e_blocks, target, t_blocks),
        )
        weights = self.entry_weights(target, t_values, extra_data, systems)
        if len(t_values) == 1:
            # (samples x components, M, P) read in place, members along dim -2
            n_properties = t_values[0].shape[-1]
            members = e_values[0].reshape(-1, n_members, n_properties)
            weight = None
            if weights is not None:
                weight = weights[0].expand_as(t_values[0]).reshape(-1, n_properties)
            return ensemble_sum_and_count(
                members,
                t_values[0].reshape(-1, n_properties),
                kind=self.kind,
                member_dim=-2,
                weight=weight,
            )
        members = torch.cat(
            [
                e.reshape(-1, n_members, t.shape[-1]).transpose(1, 2).reshape(-1, n_members)
                for e, t in zip(e_values, t_values, strict=True)
            ]
        )
        flat_target = torch.cat([t.reshape(-1) for t in t_values])
        weight = None if weights is None else flatten_weights(weights, t_values)
        return ensemble_sum_and_count(
            members, flat_target, kind=self.kind, member_dim=-1, weight=weight
        )

    def extra_repr(self) -> str:
        return f"kind={self.kind!r}, {super().extra_repr()}"


for _kind in ENSEMBLE_KINDS:
    register_loss_type(f"{_kind}_ensemble", weighting=("sample_weights", "type_weights"))(
        partial(EnsembleLoss, kind=_kind)
    )
