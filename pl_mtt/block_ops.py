"""Building new TensorBlocks from old ones (values replaced, metadata shared).

A block that lives inside a TensorMap cannot be put into another one, so every
transformation (scaling, baseline, division by atoms) builds new blocks that share the
metadata ``Labels`` of the old ones; no ``Labels`` are built from tensors.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from metatensor.torch import TensorBlock

__all__ = ["rebuild_block"]


def rebuild_block(
    block: TensorBlock,
    values: torch.Tensor,
    gradient_values: Callable[[str, TensorBlock], torch.Tensor] | None = None,
) -> TensorBlock:
    """A new block with ``values`` and the metadata of ``block``.

    Each gradient block gets ``gradient_values(parameter, gradient)`` as values, or
    keeps its own values (shared, not copied) when ``gradient_values`` is None.
    """
    new = TensorBlock(
        values=values,
        samples=block.samples,
        components=block.components,
        properties=block.properties,
    )
    for parameter, gradient in block.gradients():
        new.add_gradient(
            parameter,
            TensorBlock(
                values=(
                    gradient.values
                    if gradient_values is None
                    else gradient_values(parameter, gradient)
                ),
                samples=gradient.samples,
                components=gradient.components,
                properties=gradient.properties,
            ),
        )
    return new
