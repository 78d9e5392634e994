"""Helpers on metatensor objects shared by the whole package: TensorMap builders and
layout facts, TorchScript block operations, per-batch atom bookkeeping, and the
neighbour lists models request from their systems.
"""

from pl_mtt.tensormaps.batch_atoms import MAX_ATOMIC_NUMBER, BatchAtoms, TypeTable
from pl_mtt.tensormaps.block_ops import (
    flat_values,
    grouped_sums,
    lazy_script,
    rebuild_block,
    shape_signature,
    transform_map,
)
from pl_mtt.tensormaps.builders import (
    ATOM_PAIR,
    PER_ATOM,
    PER_STRUCTURE,
    atomistic_tensor_map,
    ensemble_output_name,
    layout_signature,
    range_labels,
    sample_kind,
    value_blocks,
    zero_sample_layout,
)
from pl_mtt.tensormaps.neighbors import attach_neighbor_lists, requested_neighbor_lists

__all__ = [
    "ATOM_PAIR",
    "MAX_ATOMIC_NUMBER",
    "PER_ATOM",
    "PER_STRUCTURE",
    "BatchAtoms",
    "TypeTable",
    "atomistic_tensor_map",
    "attach_neighbor_lists",
    "ensemble_output_name",
    "flat_values",
    "grouped_sums",
    "layout_signature",
    "lazy_script",
    "range_labels",
    "rebuild_block",
    "requested_neighbor_lists",
    "sample_kind",
    "shape_signature",
    "transform_map",
    "value_blocks",
    "zero_sample_layout",
]
