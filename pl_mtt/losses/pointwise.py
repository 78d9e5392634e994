"""Pointwise losses: mse, mae, huber and their masked variants (TensorMap adapter).

.. code-block:: yaml

    loss:
      energy:
        type: masked_huber        # reads extra_data["energy_mask"]
        delta: 0.5
        sample_weights: config_weight   # optional: extra_data["config_weight"] weights entries
        forces:                   # all entries of the positions gradient blocks
          type: mae
          type_weights: {29: 1.0, 79: 2.0}   # optional: weights by the atom's type

The per-entry computation is :func:`pl_mtt.losses.functional.pointwise.pointwise_sum_and_count`
on every entry of every block of the target (or of its gradient blocks). Inside a
``LossModule``, the pointwise terms of one kind (same ``delta`` and masking, e.g. the
energy, force and stress ``mse`` terms) are computed together by
:func:`~pl_mtt.losses.functional.pointwise.pointwise_segment_sums`: one read of each TensorMap,
one autograd node, the same per-term sums. Weighted terms (``sample_weights``,
``type_weights``: :mod:`pl_mtt.losses.weights`) are fused with the others.
"""

from __future__ import annotations

from collections.abc import Sequence
from functools import partial

import torch
from metatensor.torch import TensorMap

from pl_mtt.losses.base import (
    LossTerm,
    ValueCache,
    check_same_layout,
    flatten_values,
    flatten_weights,
)
from pl_mtt.losses.functional.pointwise import (
    POINTWISE_KINDS,
    pointwise_segment_sums,
    pointwise_sum_and_count,
    scaled_segment_sums,
)
from pl_mtt.registry import Param, register_loss_type
from pl_mtt.tensormaps.builders import TensorMaps

__all__ = ["PointwiseLoss"]


def _signature(
    p_values: list[torch.Tensor], t_values: list[torch.Tensor], m_values: list[torch.Tensor] | None
) -> tuple | None:
    """Layout key for :meth:`LossTerm.check_once` (block shapes without the sample
    count, dtypes, devices), or ``None`` when the blocks differ in shape or there are
    none. Cheap: read from the tensors in hand, no ``Labels``."""
    shapes = [v.shape for v in t_values]
    if not shapes or [v.shape for v in p_values] != shapes:
        return None
    p, t = p_values[0], t_values[0]
    if m_values is None:
        return (*[shape[1:] for shape in shapes], p.dtype, t.dtype, p.device, t.device)
    if [v.shape for v in m_values] != shapes:
        return None
    m = m_values[0]
    return (
        *[shape[1:] for shape in shapes],
        p.dtype,
        t.dtype,
        m.dtype,
        p.device,
        t.device,
        m.device,
    )


class PointwiseLoss(LossTerm):
    """Elementwise ``kind`` loss (``mse``, ``mae``, ``huber``) over all entries of all
    blocks of the target, or of its :attr:`gradient` blocks.

    NaN target entries are ignored; with ``masked=True`` only entries whose mask in
    ``extra_data["<target>_mask"]`` is nonzero count. With ``sample_weights`` or
    ``type_weights`` the sum and the count are weighted (:mod:`pl_mtt.losses.weights`).
    """

    def __init__(self, *, kind: str, masked: bool = False, delta: float = 1.0, **kwargs) -> None:
        super().__init__(**kwargs)
        if kind not in POINTWISE_KINDS:
            raise ValueError(
                f"unknown pointwise loss kind {kind!r}; expected one of {POINTWISE_KINDS}"
            )
        self.kind = kind
        self.masked = masked
        self.delta = float(delta)

    @property
    def mask_key(self) -> str:
        """Key of the mask in ``extra_data`` (``<target>_mask``)."""
        return f"{self.target}_mask"

    @property
    def fusion_key(self) -> tuple:
        """Pointwise terms of the same kind, ``delta`` and masking are fused."""
        return ("pointwise", self.kind, self.delta, self.masked)

    def maps(
        self, predictions: TensorMaps, targets: TensorMaps, extra_data: TensorMaps | None = None
    ) -> tuple[TensorMap, TensorMap, TensorMap | None]:
        """The prediction, target and (masked types) mask TensorMaps this term reads;
        a missing one is a ``ValueError`` naming it."""
        return (
            self.lookup(predictions, self.prediction_key, "predictions"),
            self.lookup(targets, self.target, "targets"),
            self.lookup(extra_data, self.mask_key, "extra_data") if self.masked else None,
        )

    def inputs(
        self,
        predictions: TensorMaps,
        targets: TensorMaps,
        extra_data: TensorMaps | None = None,
        cache: ValueCache | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
        """Prediction, target and mask entries of this term after the layout checks:
        one block's values as they are, several blocks flattened and concatenated."""
        return self._checked_inputs(*self.maps(predictions, targets, extra_data), cache)[:3]

    def _checked_inputs(
        self,
        prediction: TensorMap,
        target: TensorMap,
        mask: TensorMap | None,
        cache: ValueCache | None,
        extra_data: TensorMaps | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None, torch.Tensor | None]:
        """:meth:`inputs`, and the weights of the entries (flattened the same way), or
        None when the term is not weighted."""
        p_values = self.term_values(prediction, "the prediction", cache)
        t_values = self.term_values(target, "the target", cache)
        m_values = None if mask is None else self.term_values(mask, "the mask", cache)
        signature = _signature(p_values, t_values, m_values)
        if signature is None:
            self._full_check(prediction, target, mask, p_values, t_values)  # names it
            raise self.error("prediction, target and mask blocks differ in shape")
        self.check_once(
            signature, lambda: self._full_check(prediction, target, mask, p_values, t_values)
        )
        weights = None
        if self.weighting is not None:
            systems = None if cache is None else cache.systems
            block_weights = self.entry_weights(target, t_values, extra_data, systems)
            weights = flatten_weights(block_weights, t_values)
        return (
            flatten_values(p_values),
            flatten_values(t_values),
            None if m_values is None else flatten_values(m_values),
            weights,
        )

    def _full_check(
        self,
        prediction: TensorMap,
        target: TensorMap,
        mask: TensorMap | None,
        p_values: list[torch.Tensor],
        t_values: list[torch.Tensor],
    ) -> None:
        """Metadata checks (``Labels`` comparisons), run once per layout."""
        t_blocks = self.term_blocks(target, "the target")
        p_blocks = self.term_blocks(prediction, "the prediction")
        check_same_layout(self, target, t_blocks, prediction, p_blocks, ("target", "prediction"))
        if mask is not None:
            m_blocks = self.term_blocks(mask, "the mask")
            check_same_layout(self, target, t_blocks, mask, m_blocks, ("target", "mask"))
        if len(t_values) == 0:
            raise self.error("the target has no blocks")
        self.check_dtype_device(p_values[0], "prediction", t_values[0], "target")

    def sum_and_count(
        self,
        predictions: TensorMaps,
        targets: TensorMaps,
        extra_data: TensorMaps | None = None,
        systems: list | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        maps = self.maps(predictions, targets, extra_data)
        cache = ValueCache(systems) if self.weighting is not None else None
        prediction, target, mask, weights = self._checked_inputs(*maps, cache, extra_data)
        return pointwise_sum_and_count(
            prediction, target, mask, kind=self.kind, delta=self.delta, weight=weights
        )

    @classmethod
    def fused_sum_and_count(
        cls,
        terms: Sequence[PointwiseLoss],
        predictions: TensorMaps,
        targets: TensorMaps,
        extra_data: TensorMaps | None,
        cache: ValueCache,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """All ``terms`` (one :attr:`fusion_key`) in one
        :func:`~pl_mtt.losses.functional.pointwise.pointwise_segment_sums` call."""
        maps = [term.maps(predictions, targets, extra_data) for term in terms]
        cache.prefetch([m for triple in maps for m in triple if m is not None])  # one call
        p_list, t_list, m_list, w_list = zip(
            *[
                term._checked_inputs(*triple, cache, extra_data)
                for term, triple in zip(terms, maps, strict=True)
            ],
            strict=True,
        )
        first = terms[0]
        return pointwise_segment_sums(
            p_list,
            t_list,
            m_list if first.masked else None,
            kind=first.kind,
            delta=first.delta,
            weights=w_list,
        )

    @property
    def reads_scaled_inputs(self) -> bool:
        """Unmasked pointwise terms run on raw inputs (the baseline, scale and division
        by atoms folded into :func:`scaled_segment_sums`)."""
        return not self.masked

    @classmethod
    def scaled_sum_and_count(
        cls, terms: Sequence[PointwiseLoss], inputs
    ) -> tuple[torch.Tensor, torch.Tensor, list[torch.Tensor], list[torch.Tensor]]:
        """All ``terms`` (one target's value and gradients) in one
        :func:`~pl_mtt.losses.functional.pointwise.scaled_segment_sums` call."""
        return scaled_segment_sums(
            inputs.predictions,
            inputs.targets,
            inputs.row_factors,
            inputs.shifts,
            inputs.inverse_scale,
            kinds=[term.kind for term in terms],
            deltas=[term.delta for term in terms],
            weights=inputs.weights,
        )

    def extra_repr(self) -> str:
        delta = f", delta={self.delta}" if self.kind == "huber" else ""
        masked = ", masked=True" if self.masked else ""
        return f"kind={self.kind!r}{masked}{delta}, {super().extra_repr()}"


_DELTA = {"delta": Param(1.0, "positive_float")}
_WEIGHTING = ("sample_weights", "type_weights")
for _kind, _params in (("mse", {}), ("mae", {}), ("huber", _DELTA)):
    register_loss_type(_kind, params=_params, weighting=_WEIGHTING)(
        partial(PointwiseLoss, kind=_kind)
    )
    register_loss_type(f"masked_{_kind}", params=_params, weighting=_WEIGHTING)(
        partial(PointwiseLoss, kind=_kind, masked=True)
    )
