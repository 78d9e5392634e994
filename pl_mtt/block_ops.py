"""Building new TensorBlocks from old ones (values replaced, metadata shared).

A block that lives inside a TensorMap cannot be put into another one, so every
transformation (scaling, baseline, division by atoms) builds new blocks that share the
metadata ``Labels`` of the old ones; no ``Labels`` are built from tensors.
"""

from __future__ import annotations

import math
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


def grouped_sums(
    values: torch.Tensor,
    groups: torch.Tensor | None,
    n_groups: int,
    mask: torch.Tensor | None = None,
    *,
    square: bool = False,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Per group and property: the sum of the entries (or of their squares) that count,
    and how many entries count (float64, ``[n_groups, P]``).

    ``values`` is ``[rows, ..., P]`` (components in the middle are summed over);
    ``groups`` gives each row's group (``None``: all rows in group 0). NaN entries and
    entries where ``mask`` is zero do not count. One ``index_add_`` over the rows: the
    cost does not depend on ``n_groups``. Without NaN or mask (checked on the small
    result) counts come from the number of rows per group.
    """
    rows, n_properties = values.shape[0], values.shape[-1]
    n_components = math.prod(values.shape[1:-1])
    values = values.reshape(rows, n_components, n_properties).to(torch.float64)
    terms = values * values if square else values

    def group(tensor: torch.Tensor) -> torch.Tensor:
        if groups is None:
            return tensor.sum(0, keepdim=True).sum(1)
        out = torch.zeros((n_groups, *tensor.shape[1:]), dtype=tensor.dtype, device=tensor.device)
        return out.index_add_(0, groups, tensor).sum(1)

    if mask is None:
        total = group(terms)
        if not bool(torch.isnan(total).any()):
            if groups is None:
                per_group = torch.full((1,), float(rows), dtype=torch.float64, device=total.device)
            else:
                per_group = torch.bincount(groups, minlength=n_groups)[:n_groups].to(total.dtype)
            return total, (per_group * n_components)[:, None].expand_as(total).clone()
    valid = ~torch.isnan(values)
    if mask is not None:
        valid &= mask.reshape(values.shape) != 0
    terms = torch.where(valid, terms, torch.zeros_like(terms))
    return group(terms), group(valid.to(torch.float64))
