"""Batching: per-structure items -> ``(systems, targets, extra_data)`` batches.

Each item is ``(system, {name: TensorMap}, {name: TensorMap})`` with sample column
``system`` 0. A batch joins the TensorMaps of its structures block by block: values and
sample arrays are concatenated with tensor operations, the ``system`` column becomes
the position in the batch (0..B-1) and gradient ``sample`` columns are shifted by the
number of value rows before them. There is no loop over atoms, only over the structures
of the batch to gather their tensors.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from metatensor.torch import Labels, TensorBlock, TensorMap
from metatomic.torch import System

__all__ = ["batch_to", "collate", "join_structures"]

Item = tuple[System, dict[str, TensorMap], dict[str, TensorMap]]
Batch = tuple[list[System], dict[str, TensorMap], dict[str, TensorMap]]


def _join_samples(
    names: list[str], parts: Sequence[torch.Tensor], row_offsets: torch.Tensor | None
) -> Labels:
    """Concatenate sample arrays; ``system`` -> batch position, ``sample`` += offset."""
    values = torch.cat(parts)
    # position in the batch of every row (small per-structure fills: torch's
    # repeat_interleave wakes its thread pool, which costs milliseconds on a busy CPU)
    batch_index = torch.cat(
        [torch.full((len(part),), i, dtype=torch.int64) for i, part in enumerate(parts)]
    )
    if "system" in names:
        values[:, names.index("system")] = batch_index.to(values.dtype)
    if row_offsets is not None:
        values[:, 0] += row_offsets[batch_index].to(values.dtype)
    return Labels(names, values, assume_unique=True)


def _join_blocks(blocks: Sequence[TensorBlock], what: str) -> TensorBlock:
    # each metadata access on a TensorBlock costs a TorchScript call: read every
    # structure's tensors once, take names, components and properties from the first
    first = blocks[0]
    gradient_names = first.gradients_list()
    values, samples = [], []
    gradients: dict[str, tuple[list[torch.Tensor], list[torch.Tensor]]] = {
        name: ([], []) for name in gradient_names
    }
    for index, block in enumerate(blocks):
        values.append(block.values)
        samples.append(block.samples.values)
        for name in gradient_names:
            try:
                gradient = block.gradient(name)
            except (RuntimeError, ValueError):
                raise ValueError(
                    f"{what}: structure {index} of the batch has no '{name}' gradient"
                ) from None
            gradients[name][0].append(gradient.values)
            gradients[name][1].append(gradient.samples.values)
    joined = TensorBlock(
        torch.cat(values),
        _join_samples(first.samples.names, samples, None),
        first.components,
        first.properties,
    )
    rows = torch.tensor([len(part) for part in values])
    offsets = torch.cumsum(rows, 0) - rows
    for name in gradient_names:
        gradient = first.gradient(name)
        g_values, g_samples = gradients[name]
        joined.add_gradient(
            name,
            TensorBlock(
                torch.cat(g_values),
                _join_samples(gradient.samples.names, g_samples, offsets),
                gradient.components,
                gradient.properties,
            ),
        )
    return joined


def join_structures(tensor_maps: Sequence[TensorMap], what: str = "tensor") -> TensorMap:
    """Join per-structure TensorMaps into one batched TensorMap (``system`` = position).

    All TensorMaps must have the same keys (in the same order), sample names,
    components and properties; ``what`` names the entry in error messages.
    """
    if len(tensor_maps) == 0:
        raise ValueError(f"{what}: cannot join an empty list of TensorMaps")
    keys = tensor_maps[0].keys
    key_values = keys.values
    for index, tensor_map in enumerate(tensor_maps):
        other = tensor_map.keys.values
        if other.shape != key_values.shape or not torch.equal(other, key_values):
            raise ValueError(
                f"{what}: structure {index} of the batch has keys {other.tolist()}, "
                f"structure 0 has {key_values.tolist()}"
            )
    blocks = [
        _join_blocks([tensor_map.block_by_id(b) for tensor_map in tensor_maps], what)
        for b in range(len(key_values))
    ]
    return TensorMap(keys, blocks)


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
