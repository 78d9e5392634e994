"""Pointwise losses: mse, mae, huber and their masked variants (TensorMap adapter).

.. code-block:: yaml

    loss:
      energy:
        type: masked_huber        # reads extra_data["energy_mask"]
        delta: 0.5
        forces: mae               # all entries of the positions gradient blocks

The per-entry computation is :func:`pl_mtt.functional.pointwise.pointwise_sum_and_count`
on every entry of every block of the target (or of its gradient blocks).
"""

from __future__ import annotations

from functools import partial

import torch
from metatensor.torch import TensorMap

from pl_mtt.functional.pointwise import POINTWISE_KINDS, pointwise_sum_and_count
from pl_mtt.losses.base import LossTerm, check_same_layout, flatten_values, values_signature
from pl_mtt.registry import Param, register_loss_type

__all__ = ["PointwiseLoss"]


def _same_shapes(first: list[torch.Tensor], second: list[torch.Tensor]) -> bool:
    return len(first) == len(second) and all(
        a.shape == b.shape for a, b in zip(first, second, strict=True)
    )


class PointwiseLoss(LossTerm):
    """Elementwise ``kind`` loss (``mse``, ``mae``, ``huber``) over all entries of all
    blocks of the target, or of its :attr:`gradient` blocks.

    NaN target entries are ignored; with ``masked=True`` only entries whose mask in
    ``extra_data["<target>_mask"]`` is nonzero count.
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

    def sum_and_count(
        self,
        predictions: dict[str, TensorMap],
        targets: dict[str, TensorMap],
        extra_data: dict[str, TensorMap] | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        prediction = self.lookup(predictions, self.prediction_key, "predictions")
        target = self.lookup(targets, self.target, "targets")
        mask = self.lookup(extra_data, self.mask_key, "extra_data") if self.masked else None
        p_blocks = self.term_blocks(prediction, "the prediction")
        t_blocks = self.term_blocks(target, "the target")
        m_blocks = None if mask is None else self.term_blocks(mask, "the mask")
        p_values = [block.values for block in p_blocks]
        t_values = [block.values for block in t_blocks]
        m_values = None if m_blocks is None else [block.values for block in m_blocks]

        def full_check() -> None:
            check_same_layout(
                self, target, t_blocks, prediction, p_blocks, ("target", "prediction")
            )
            if mask is not None:
                check_same_layout(self, target, t_blocks, mask, m_blocks, ("target", "mask"))
            if len(t_values) == 0:
                raise self.error("the target has no blocks")
            if p_values[0].dtype != t_values[0].dtype or p_values[0].device != t_values[0].device:
                raise self.error(
                    f"prediction ({p_values[0].dtype}, {p_values[0].device}) and target "
                    f"({t_values[0].dtype}, {t_values[0].device}) differ in dtype or device"
                )

        if not _same_shapes(p_values, t_values) or (
            m_values is not None and not _same_shapes(m_values, t_values)
        ):
            full_check()  # names the mismatch
            raise self.error("prediction, target and mask blocks differ in shape")
        self.check_once(values_signature(p_values, t_values, m_values), full_check)
        return pointwise_sum_and_count(
            flatten_values(p_values),
            flatten_values(t_values),
            None if m_values is None else flatten_values(m_values),
            kind=self.kind,
            delta=self.delta,
        )

    def extra_repr(self) -> str:
        delta = f", delta={self.delta}" if self.kind == "huber" else ""
        masked = ", masked=True" if self.masked else ""
        return f"kind={self.kind!r}{masked}{delta}, {super().extra_repr()}"


_DELTA = {"delta": Param(1.0, "positive_float")}
for _kind, _params in (("mse", {}), ("mae", {}), ("huber", _DELTA)):
    register_loss_type(_kind, params=_params)(partial(PointwiseLoss, kind=_kind))
    register_loss_type(f"masked_{_kind}", params=_params)(
        partial(PointwiseLoss, kind=_kind, masked=True)
    )
