"""What the scaler and the composition baseline need to know about a target's layout.

A layout is a zero-sample TensorMap describing a target (metatrain's convention): its
keys, and per block the sample names, components and properties. :class:`TargetInfo`
reads it once, so that later per-batch code only touches plain Python values and
tensors, never ``Labels`` values (no host-device synchronisation on CUDA); a TensorMap
is checked in full the first time its shape signature is seen, later by one cheap
TorchScript call (:func:`pl_mtt.tensormaps.block_ops.shape_signature`).
"""

from __future__ import annotations

from collections.abc import Hashable
from dataclasses import dataclass

import metatensor.torch as mts
import torch
from metatensor.torch import Labels, TensorMap

from pl_mtt.tensormaps.block_ops import shape_signature
from pl_mtt.tensormaps.builders import (
    ATOM_PAIR,
    PER_ATOM,
    PER_STRUCTURE,
    ensemble_output_name,
    sample_kind,
    zero_sample_layout,
)

__all__ = [
    "BlockInfo",
    "TargetInfo",
    "is_invariant_key",
    "is_tensor_map",
    "layout_buffers",
    "layouts_from_buffers",
]


def is_tensor_map(value: object) -> bool:
    """Whether ``value`` is a ``metatensor.torch.TensorMap`` (a TorchScript class)."""
    if not isinstance(value, torch.ScriptObject):
        return False
    return value._type().qualified_name().endswith("metatensor.TensorMap")


def layout_buffers(layouts: dict[str, TensorMap]) -> dict[str, torch.Tensor]:
    """Layouts as ``uint8`` tensors (``metatensor.torch.save_buffer``): storable in a
    ``state_dict`` and loadable with ``torch.load(weights_only=True)``."""
    return {name: mts.save_buffer(zero_sample_layout(t)) for name, t in layouts.items()}


def layouts_from_buffers(buffers: dict[str, torch.Tensor]) -> dict[str, TensorMap]:
    """The inverse of :func:`layout_buffers`."""
    return {name: mts.load_buffer(buffer.cpu()) for name, buffer in buffers.items()}


def is_invariant_key(names: list[str], values: list[int], n_components: list[int]) -> bool:
    """Whether a block is invariant (a scalar): no components, or spherical ``o3_lambda=0``.

    A spherical block is invariant when its key has ``o3_lambda == 0`` (and
    ``o3_sigma == 1`` when that dimension exists) and its components have size 1.
    """
    if not n_components:
        return True
    key = dict(zip(names, values, strict=True))
    if key.get("o3_lambda") != 0 or key.get("o3_sigma", 1) != 1:
        return False
    return all(size == 1 for size in n_components)


@dataclass(frozen=True)
class BlockInfo:
    """One block of a target: its property labels and sizes, and what it is keyed by."""

    properties: Labels
    n_properties: int
    component_sizes: tuple[int, ...]
    atom_type: int | None  # the ``atom_type`` key of a per-atom block, if any
    invariant: bool

    @property
    def n_components(self) -> int:
        size = 1
        for c in self.component_sizes:
            size *= c
        return size


class TargetInfo:
    """Kind (per-structure, per-atom, atom-pair) and blocks of one target.

    Args:
        name: the target's name.
        layout: a TensorMap with the target's keys, sample names, components and
            properties (the samples themselves are ignored).

    Raises:
        ValueError: for a sample layout other than per-structure, per-atom or atom-pair,
            or a layout whose blocks disagree on their sample names.
    """

    def __init__(self, name: str, layout: TensorMap) -> None:
        if not is_tensor_map(layout):
            raise ValueError(
                f"layout of target '{name}': expected a metatensor TensorMap, "
                f"got {type(layout).__name__}"
            )
        if len(layout) == 0:
            raise ValueError(f"layout of target '{name}' has no blocks")
        self.name = name
        self.ensemble_name = ensemble_output_name(name)
        self.keys: Labels = layout.keys
        sample_names = list(layout.block_by_id(0).samples.names)
        try:
            self.kind = sample_kind(sample_names)
        except ValueError as error:
            raise ValueError(f"target '{name}': {error}") from None
        self.sample_names = sample_names
        key_names = list(layout.keys.names)
        key_values = layout.keys.values.tolist()
        blocks = []
        for index, block in enumerate(layout.blocks()):
            if list(block.samples.names) != sample_names:
                raise ValueError(
                    f"target '{name}': block {index} has samples {list(block.samples.names)}, "
                    f"block 0 has {sample_names}; all blocks must have the same sample names"
                )
            sizes = tuple(len(c) for c in block.components)
            key = dict(zip(key_names, key_values[index], strict=True))
            atom_type = key.get("atom_type") if self.kind == PER_ATOM else None
            blocks.append(
                BlockInfo(
                    properties=block.properties,
                    n_properties=len(block.properties),
                    component_sizes=sizes,
                    atom_type=None if atom_type is None else int(atom_type),
                    invariant=is_invariant_key(key_names, key_values[index], list(sizes)),
                )
            )
        self.blocks: list[BlockInfo] = blocks
        self._checked: set[Hashable] = set()

    @property
    def multi_property(self) -> bool:
        """More than one block, or one block with more than one property (the spec)."""
        return len(self.blocks) > 1 or self.blocks[0].n_properties > 1

    @property
    def per_structure(self) -> bool:
        return self.kind == PER_STRUCTURE

    @property
    def per_atom(self) -> bool:
        return self.kind == PER_ATOM

    @property
    def atom_pair(self) -> bool:
        return self.kind == ATOM_PAIR

    def check(
        self, tensor: TensorMap, what: str, *, ensemble: bool = False, any_properties: bool = False
    ) -> int:
        """Check ``tensor`` against the layout (fully once per shape signature: keys,
        sample names, components and property counts are compared the first time).

        Returns the number of ensemble members (1 unless ``ensemble``): an ensemble output
        has ``M x n_properties`` properties in every block (members outermost). With
        ``any_properties`` (targets with one pooled scale, e.g. DOS predictions with extra
        points) property counts are not compared and 1 is returned.

        Raises:
            ValueError: naming the target, the block and what differs.
        """
        label = self.ensemble_name if ensemble else self.name
        n_blocks = len(tensor)
        if n_blocks != len(self.blocks):
            raise ValueError(
                f"{what} '{label}': expected {len(self.blocks)} block(s) as in its layout, "
                f"got {n_blocks}"
            )
        shapes, n_properties = shape_signature(tensor)
        signature = (shapes, ensemble, any_properties)
        members = 1
        if ensemble and not any_properties:
            expected = self.blocks[0].n_properties
            if n_properties % expected != 0 or n_properties == 0:
                raise ValueError(
                    f"{what} '{self.ensemble_name}' (ensemble of '{self.name}'): block 0 has "
                    f"{n_properties} properties, expected a positive multiple of {expected} "
                    f"(members x the target's properties)"
                )
            members = n_properties // expected
        if signature in self._checked:
            return members
        if tensor.keys != self.keys:
            raise ValueError(
                f"{what} '{label}': keys {tensor.keys.names} = "
                f"{tensor.keys.values.tolist()} differ from the layout's "
                f"{self.keys.names} = {self.keys.values.tolist()}"
            )
        for index, (block, info) in enumerate(zip(tensor.blocks(), self.blocks, strict=True)):
            where = f"{what} '{label}', block {index}"
            if list(block.samples.names) != self.sample_names:
                raise ValueError(
                    f"{where}: samples {list(block.samples.names)}, expected {self.sample_names}"
                )
            sizes = tuple(len(c) for c in block.components)
            if sizes != info.component_sizes:
                raise ValueError(
                    f"{where}: component sizes {list(sizes)}, expected {list(info.component_sizes)}"
                )
            expected = info.n_properties * members
            if not any_properties and len(block.properties) != expected:
                raise ValueError(
                    f"{where}: {len(block.properties)} properties, expected {expected}"
                    + (f" ({members} members x {info.n_properties})" if ensemble else "")
                )
        self._checked.add(signature)
        return members
