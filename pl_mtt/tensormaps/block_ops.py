"""Building new TensorBlocks and TensorMaps from old ones (values replaced, metadata shared).

A block that lives inside a TensorMap cannot be put into another one, so every
transformation (scaling, baseline, division by atoms) builds new blocks that share the
metadata ``Labels`` of the old ones; no ``Labels`` are built from tensors.

Each call of a metatensor method from Python costs microseconds (it crosses into
TorchScript), so the per-step transformations of a whole TensorMap run as ONE
TorchScript function (:func:`transform_map`, :func:`flat_values`,
:func:`shape_signature`); Python only prepares small factor tables.
"""

from __future__ import annotations

import functools
import math
import warnings
from collections.abc import Callable
from typing import Any, TypeVar

import torch
from metatensor.torch import TensorBlock, TensorMap

__all__ = [
    "flat_values",
    "grouped_sums",
    "lazy_script",
    "rebuild_block",
    "shape_signature",
    "transform_map",
]

F = TypeVar("F", bound=Callable[..., Any])


def lazy_script(function: F) -> F:
    """``torch.jit.script(function)``, compiled on the first call (not at import).

    TorchScript is how metatensor's own classes run; its deprecation warning (aimed at
    model export) is silenced here. If compiling fails (a torch without TorchScript),
    the Python function runs instead, with a warning: same results, slower. Only
    top-level entry points are wrapped: the functions they call must stay plain
    (TorchScript compiles them with the caller).
    """
    compiled: Callable[..., Any] | None = None

    @functools.wraps(function)
    def call(*args: Any, **kwargs: Any) -> Any:
        nonlocal compiled
        if compiled is None:
            try:
                with warnings.catch_warnings():
                    warnings.simplefilter("ignore", DeprecationWarning)  # torch.jit.script
                    compiled = torch.jit.script(function)
            except Exception as error:  # pragma: no cover - depends on the torch build
                warnings.warn(
                    f"pl_mtt: TorchScript could not compile {function.__name__} ({error}); "
                    f"running it in Python (slower)",
                    RuntimeWarning,
                    stacklevel=2,
                )
                compiled = function
        return compiled(*args, **kwargs)

    return call  # type: ignore[return-value]


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


# -- TorchScript kernels --------------------------------------------------------------
def _shaped(factor: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    """``[rows or 1, P or 1]`` factor shaped to broadcast over ``like`` ``[rows, ..., P]``."""
    if factor.shape[0] == 1 or like.dim() == 2:
        return factor
    shape = [factor.shape[0]]
    for _ in range(like.dim() - 2):
        shape.append(1)
    shape.append(factor.shape[-1])
    return factor.reshape(shape)


def _rows(table: torch.Tensor, entities: torch.Tensor | None, like: torch.Tensor) -> torch.Tensor:
    """The rows of ``table`` (``[1 or n_entities, P]``) for each sample row."""
    table = table.to(device=like.device, dtype=like.dtype)
    if entities is None or table.shape[0] == 1:
        return table
    return table.index_select(0, entities)


@lazy_script
def transform_map(
    tensor: TensorMap,
    divide: bool,
    shifts: list[torch.Tensor | None] | None,
    scales: list[torch.Tensor | None] | None,
    atom_counts: torch.Tensor | None,
    first_atom: torch.Tensor | None,
) -> TensorMap | None:
    """``(values - shift) / (scale x atom count)`` (``divide``) or its inverse
    ``values x scale x atom count + shift`` for every block of ``tensor``.

    Per block ``b``, each of ``shifts[b]`` and ``scales[b]`` (``None``: not applied) is a
    table with one row (broadcast) or one row per *entity*: per system for samples
    ``system``, per atom of the batch (systems concatenated, ``first_atom`` gives each
    system's offset) for samples ``system, atom``; its last dimension is the block's
    properties or 1. The shift applies to the values only; the scale to the values and
    every gradient block (through the gradient's ``sample`` column). ``atom_counts``
    (``[n_systems, 1]``) applies to the blocks whose samples contain ``system`` but
    neither ``atom`` nor ``first_atom``, and to those of their gradient blocks whose
    samples contain neither (DESIGN decision 5: energies and virials, not forces).

    Returns a new TensorMap sharing all metadata (and the values of blocks left as they
    are), or ``None`` when nothing applies (the caller keeps ``tensor``).
    """
    blocks = tensor.blocks()
    changed = False
    new_blocks: list[TensorBlock] = []
    for index in range(len(blocks)):
        block = blocks[index]
        samples = block.samples
        names = samples.names
        values = block.values
        shift: torch.Tensor | None = None
        scale: torch.Tensor | None = None
        if shifts is not None:
            shift = shifts[index]
        if scales is not None:
            scale = scales[index]
        per_structure = "system" in names and "atom" not in names and "first_atom" not in names
        counts: torch.Tensor | None = None
        if per_structure:
            counts = atom_counts
        # entity (system or atom of the batch) of each sample row, where a table needs it
        entities: torch.Tensor | None = None
        if (
            counts is not None
            or (shift is not None and shift.shape[0] != 1)
            or (scale is not None and scale.shape[0] != 1)
        ):
            if per_structure:
                entities = samples.column("system")
            elif "atom" in names:
                if first_atom is None:
                    raise ValueError("per-atom samples need the first atom of each system")
                system = samples.column("system")
                entities = first_atom.index_select(0, system) + samples.column("atom")
            else:
                entities = samples.column("system")
        # factor: applies to every gradient; full: to the values and gradients without atoms
        factor: torch.Tensor | None = None
        if scale is not None:
            factor = _rows(scale, entities, values)
        full = factor
        if counts is not None:
            n_atoms = _rows(counts, entities, values)
            full = n_atoms if factor is None else factor * n_atoms
        if shift is not None or full is not None:
            changed = True
        if divide:
            if shift is not None:
                values = values - _shaped(_rows(shift, entities, values), values)
            if full is not None:
                values = values / _shaped(full, values)
        else:
            if full is not None:
                values = values * _shaped(full, values)
            if shift is not None:
                values = values + _shaped(_rows(shift, entities, values), values)
        new = TensorBlock(values, samples, block.components, block.properties)
        for parameter, gradient in block.gradients():
            gradient_samples = gradient.samples
            gradient_names = gradient_samples.names
            rows = full
            if "atom" in gradient_names or "first_atom" in gradient_names:
                rows = factor
            gradient_values = gradient.values
            if rows is not None:
                if rows.shape[0] != 1:
                    rows = rows.index_select(0, gradient_samples.column("sample"))
                shaped = _shaped(rows, gradient_values)
                gradient_values = gradient_values / shaped if divide else gradient_values * shaped
            new.add_gradient(
                parameter,
                TensorBlock(
                    gradient_values, gradient_samples, gradient.components, gradient.properties
                ),
            )
        new_blocks.append(new)
    if not changed:
        return None
    return TensorMap(tensor.keys, new_blocks)


@lazy_script
def flat_values(tensor: TensorMap, parts: list[str]) -> list[torch.Tensor]:
    """For each entry of ``parts`` (``""``: the values, else a gradient name), the values
    of all blocks (or of their gradient blocks) flattened and concatenated in key order."""
    blocks = tensor.blocks()
    result: list[torch.Tensor] = []
    for part in parts:
        pieces: list[torch.Tensor] = []
        for block in blocks:
            if part == "":
                pieces.append(block.values.reshape(-1))
            else:
                pieces.append(block.gradient(part).values.reshape(-1))
        result.append(pieces[0] if len(pieces) == 1 else torch.cat(pieces))
    return result


@lazy_script
def shape_signature(tensor: TensorMap) -> tuple[str, int]:
    """A key describing ``tensor`` without its sample count (sample names of block 0, the
    value shape of every block without rows, and the device; no ``Labels`` values read)
    and the property count of block 0 (``-1`` without blocks)."""
    blocks = tensor.blocks()
    if len(blocks) == 0:
        return "", -1
    first = blocks[0].values
    parts = [",".join(blocks[0].samples.names), str(first.device)]
    for block in blocks:
        shape = block.values.shape
        parts.append(",".join([str(size) for size in shape[1:]]))
    return "|".join(parts), first.shape[-1]


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
