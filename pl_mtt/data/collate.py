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


def _join_samples(samples: Sequence[Labels], row_offsets: torch.Tensor | None) -> Labels:
    """Concatenate sample labels; ``system`` -> batch position, ``sample`` += offset."""
    names = samples[0].names
    values = torch.cat([labels.values for labels in samples])
    # position in the batch of every row (small per-structure fills: torch's
    # repeat_interleave wakes its thread pool, which costs milliseconds on a busy CPU)
    batch_index = torch.cat(
        [torch.full((len(labels),), i, dtype=torch.int64) for i, labels in enumerate(samples)]
    )
    if "system" in names:
        values[:, names.index("system")] = batch_index.to(values.dtype)
    if row_offsets is not None:
        values[:, 0] += row_offsets[batch_index].to(values.dtype)
    return Labels(names, values, assume_unique=True)


def _join_blocks(blocks: Sequence[TensorBlock], what: str) -> TensorBlock:
    first = blocks[0]
    rows = torch.tensor([len(block.samples) for block in blocks])
    values = torch.cat([block.values for block in blocks])
    joined = TensorBlock(
        values,
        _join_samples([block.samples for block in blocks], None),
        first.components,
        first.properties,
    )
    offsets = torch.cumsum(rows, 0) - rows
    for name in first.gradients_list():
        gradients = []
        for index, block in enumerate(blocks):
            if name not in block.gradients_list():
                raise ValueError(f"{what}: structure {index} of the batch has no '{name}' gradient")
            gradients.append(block.gradient(name))
        joined.add_gradient(
            name,
            TensorBlock(
                torch.cat([g.values for g in gradients]),
                _join_samples([g.samples for g in gradients], offsets),
                gradients[0].components,
                gradients[0].properties,
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
    first = tensor_maps[0]
    keys = first.keys
    n_blocks = len(keys)
    for index, tensor_map in enumerate(tensor_maps):
        if len(tensor_map.keys) != n_blocks or not torch.equal(tensor_map.keys.values, keys.values):
            raise ValueError(
                f"{what}: structure {index} of the batch has keys {tensor_map.keys.values.tolist()}"
                f", structure 0 has {keys.values.tolist()}"
            )
    blocks = [
        _join_blocks([tensor_map.block_by_id(b) for tensor_map in tensor_maps], what)
        for b in range(n_blocks)
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
    ``transfer_batch_to_device`` (Lightning does not know ``System``/``TensorMap``)."""
    systems, targets, extra_data = batch
    systems = [system.to(dtype=dtype, device=device) for system in systems]
    targets = {name: t.to(dtype=dtype, device=device) for name, t in targets.items()}
    extra_data = {name: t.to(dtype=dtype, device=device) for name, t in extra_data.items()}
    return systems, targets, extra_data
