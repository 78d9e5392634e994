"""Batching: per-structure items -> ``(systems, targets, extra_data)`` batches.

Each item is ``(system, {name: TensorMap}, {name: TensorMap})`` with sample column
``system`` 0. A batch joins the TensorMaps of its structures block by block: values and
sample arrays are concatenated with tensor operations, the ``system`` column becomes
the position in the batch (0..B-1) and gradient ``sample`` columns are shifted by the
number of value rows before them. There is no loop over atoms, only over the structures
of the batch to gather their tensors, all in one TorchScript call per TensorMap.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Optional

import torch
from metatensor.torch import Labels, TensorBlock, TensorMap
from metatomic.torch import System

from pl_mtt.tensormaps.block_ops import lazy_script

__all__ = ["batch_to", "collate", "join_structures"]

Item = tuple[System, dict[str, TensorMap], dict[str, TensorMap]]
Batch = tuple[list[System], dict[str, TensorMap], dict[str, TensorMap]]


def _join_samples(
    names: list[str],
    parts: list[torch.Tensor],
    row_offsets: Optional[torch.Tensor],  # noqa: UP045
) -> Labels:
    """Concatenate sample arrays; ``system`` -> batch position, ``sample`` += offset."""
    values = torch.cat(parts)
    # position in the batch of every row (small per-structure fills: torch's
    # repeat_interleave wakes its thread pool, which costs milliseconds on a busy CPU)
    fills: list[torch.Tensor] = []
    for i, part in enumerate(parts):
        fills.append(torch.full([part.shape[0]], i, dtype=torch.int64))
    batch_index = torch.cat(fills)
    if "system" in names:
        values[:, names.index("system")] = batch_index.to(values.dtype)
    if row_offsets is not None:
        values[:, 0] += row_offsets[batch_index].to(values.dtype)
    return Labels(names, values, assume_unique=True)


def _join_blocks(blocks: list[TensorBlock]) -> tuple[Optional[TensorBlock], str]:  # noqa: UP045
    """The blocks of one key joined, or ``(None, what is wrong)``."""
    first = blocks[0]
    gradient_names = first.gradients_list()
    values: list[torch.Tensor] = []
    samples: list[torch.Tensor] = []
    gradient_values: dict[str, list[torch.Tensor]] = {}
    gradient_samples: dict[str, list[torch.Tensor]] = {}
    for name in gradient_names:
        gradient_values[name] = []
        gradient_samples[name] = []
    for index, block in enumerate(blocks):
        values.append(block.values)
        samples.append(block.samples.values)
        present = block.gradients_list()
        for name in gradient_names:
            if name not in present:
                return None, f"structure {index} of the batch has no '{name}' gradient"
            gradient = block.gradient(name)
            gradient_values[name].append(gradient.values)
            gradient_samples[name].append(gradient.samples.values)
    joined = TensorBlock(
        torch.cat(values),
        _join_samples(first.samples.names, samples, None),
        first.components,
        first.properties,
    )
    rows = torch.tensor([part.shape[0] for part in values])
    offsets = torch.cumsum(rows, 0) - rows
    for name in gradient_names:
        gradient = first.gradient(name)
        joined.add_gradient(
            name,
            TensorBlock(
                torch.cat(gradient_values[name]),
                _join_samples(gradient.samples.names, gradient_samples[name], offsets),
                gradient.components,
                gradient.properties,
            ),
        )
    return joined, ""


@lazy_script
def _join_maps(tensor_maps: list[TensorMap]) -> tuple[Optional[TensorMap], str]:  # noqa: UP045
    """One TorchScript call joins a batch (each metadata access from Python is a call)."""
    keys = tensor_maps[0].keys
    key_values = keys.values
    for index, tensor_map in enumerate(tensor_maps):
        other = tensor_map.keys.values
        if other.shape != key_values.shape or not torch.equal(other, key_values):
            return None, f"keys {index}"
    blocks: list[TensorBlock] = []
    for b in range(key_values.shape[0]):
        parts: list[TensorBlock] = []
        for tensor_map in tensor_maps:
            parts.append(tensor_map.block_by_id(b))
        joined, error = _join_blocks(parts)
        if joined is None:
            return None, error
        blocks.append(joined)
    return TensorMap(keys, blocks), ""


def join_structures(tensor_maps: Sequence[TensorMap], what: str = "tensor") -> TensorMap:
    """Join per-structure TensorMaps into one batched TensorMap (``system`` = position).

    All TensorMaps must have the same keys (in the same order), sample names,
    components and properties; ``what`` names the entry in error messages.
    """
    if len(tensor_maps) == 0:
        raise ValueError(f"{what}: cannot join an empty list of TensorMaps")
    joined, error = _join_maps(list(tensor_maps))
    if joined is None:
        if error.startswith("keys "):
            index = int(error.split()[1])
            error = (
                f"structure {index} of the batch has keys "
                f"{tensor_maps[index].keys.values.tolist()}, structure 0 has "
                f"{tensor_maps[0].keys.values.tolist()}"
            )
        raise ValueError(f"{what}: {error}")
    return joined


def collate(items: Sequence[Item]) -> Batch:
    """``DataLoader`` collate function: a list of items -> ``(systems, targets, extra)``."""
    systems = [item[0] for item in items]
    targets = {
        name: join_structures([item[1][name] for item in items], f"target '{name}'")
        for name in items[0][1]
    }
    extra_data = {
        name: join_structures([item[2][name] for item in items], f"extra_data '{name}'")
        for name in items[0][2]
    }
    return systems, targets, extra_data


def batch_to(
    batch: Batch, device: torch.device | str | None = None, dtype: torch.dtype | None = None
) -> Batch:
    """Move a batch to ``device`` (and floating ``dtype``): use it in a LightningModule's
    ``transfer_batch_to_device`` (Lightning does not know ``System``/``TensorMap``).
    Without ``dtype``, systems and TensorMaps already on that device are kept as they are
    (not copied)."""
    systems, targets, extra_data = batch
    target_device = None if device is None else torch.device(device)

    def moved(item):  # a System or TensorMap already where it belongs is not copied
        if dtype is None and (target_device is None or item.device == target_device):
            return item
        return item.to(dtype=dtype, device=device)

    systems = [moved(system) for system in systems]
    targets = {name: moved(t) for name, t in targets.items()}
    extra_data = {name: moved(t) for name, t in extra_data.items()}
    return systems, targets, extra_data
