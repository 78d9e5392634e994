"""Small helpers on metatensor TensorMaps shared by losses, scaler and data.

Nothing here synchronises with the host on CUDA: only Python-side metadata (names,
shapes) is read, never the values of a ``Labels`` object.
"""

from __future__ import annotations

from collections.abc import Hashable

import torch
from metatensor.torch import Labels, TensorBlock, TensorMap

__all__ = [
    "TensorMaps",
    "atomistic_tensor_map",
    "ensemble_output_name",
    "layout_signature",
    "range_labels",
    "sample_kind",
    "value_blocks",
    "zero_sample_layout",
]

TensorMaps = dict[str, TensorMap]  # predictions, targets, extra_data: name -> TensorMap

PER_STRUCTURE = "per_structure"
PER_ATOM = "per_atom"
ATOM_PAIR = "atom_pair"


def ensemble_output_name(target: str) -> str:
    """Name of the LLPR ensemble output of ``target`` (DESIGN decision 6).

    >>> ensemble_output_name("energy")
    'energy_ensemble'
    >>> ensemble_output_name("mtt::dos")
    'mtt::aux::dos_ensemble'
    """
    if target == "energy":
        return "energy_ensemble"
    return "mtt::aux::" + target.removeprefix("mtt::") + "_ensemble"


def sample_kind(sample_names: list[str] | tuple[str, ...]) -> str:
    """``per_structure`` (``system``), ``per_atom`` (``system, atom``) or ``atom_pair``.

    Raises ``ValueError`` for any other sample layout.
    """
    names = list(sample_names)
    if names == ["system"]:
        return PER_STRUCTURE
    if names == ["system", "atom"]:
        return PER_ATOM
    if names[:3] == ["system", "first_atom", "second_atom"]:
        return ATOM_PAIR
    raise ValueError(
        f"unsupported sample layout {names}: expected ['system'] (per-structure), "
        f"['system', 'atom'] (per-atom) or ['system', 'first_atom', 'second_atom', ...] "
        f"(atom pairs)"
    )


def value_blocks(tensor_map: TensorMap, gradient: str | None = None) -> list[TensorBlock]:
    """The blocks of ``tensor_map``, or their ``gradient`` blocks, in key order.

    Iterates ``blocks()`` (no ``Labels`` lookups, so no host sync on CUDA).
    """
    blocks = tensor_map.blocks()
    if gradient is None:
        return blocks
    return [block.gradient(gradient) for block in blocks]


def layout_signature(tensor_map: TensorMap, gradient: str | None = None) -> Hashable:
    """A hashable description of a TensorMap's layout that ignores sample counts.

    Two TensorMaps with the same signature have the same key names and block count,
    and blocks with the same sample names, component names and sizes, property names
    and count, gradients and dtype/device. Computing it reads no ``Labels`` values,
    so it costs no host-device synchronisation; a full metadata comparison is only
    needed the first time a signature is seen.
    """
    blocks = []
    for block in value_blocks(tensor_map, gradient):
        blocks.append(
            (
                tuple(block.samples.names),
                tuple((tuple(c.names), len(c)) for c in block.components),
                tuple(block.properties.names),
                len(block.properties),
                tuple(block.gradients_list()),
            )
        )
    first = tensor_map.block_by_id(0).values if len(tensor_map) > 0 else None
    device_dtype = (str(first.device), str(first.dtype)) if first is not None else None
    return (tuple(tensor_map.keys.names), len(tensor_map), gradient, device_dtype, tuple(blocks))


def range_labels(name: str, n: int, device: torch.device | None = None) -> Labels:
    """``Labels([name], 0..n-1)`` (on the CPU without ``device``). TorchScript."""
    values = torch.arange(n, dtype=torch.int32, device=device).reshape(-1, 1)
    return Labels([name], values, assume_unique=True)


def atomistic_tensor_map(
    values: torch.Tensor,
    properties: Labels,
    *,
    per_atom: bool = False,
    atom_system: torch.Tensor | None = None,
    atom_index: torch.Tensor | None = None,
    positions_gradient: torch.Tensor | None = None,
    strain_gradient: torch.Tensor | None = None,
) -> TensorMap:
    """One-block TensorMap of per-structure (``(B, P)``, samples ``system`` = row) or
    per-atom (``(N, P)``, ``per_atom=True``) values, with the package's conventions.

    Per-atom values need ``atom_system``/``atom_index`` (``(N,)``); so does
    ``positions_gradient`` ``(N, 3, P)`` (samples ``["sample", "system", "atom"]``,
    components ``[xyz]``). ``strain_gradient`` is ``(B, 3, 3, P)`` (samples
    ``["sample"]``, components ``[xyz_1, xyz_2]``).
    """
    device = values.device
    n_rows = values.shape[0]
    if per_atom:
        samples = Labels(
            ["system", "atom"],
            torch.stack([atom_system, atom_index], dim=1).to(torch.int32),
            assume_unique=True,
        )
    else:
        samples = range_labels("system", n_rows, device)
    block = TensorBlock(values, samples, [], properties)
    if positions_gradient is not None:
        system = atom_system.to(torch.int32)
        block.add_gradient(
            "positions",
            TensorBlock(
                positions_gradient,
                Labels(
                    ["sample", "system", "atom"],
                    torch.stack([system, system, atom_index.to(torch.int32)], dim=1),
                    assume_unique=True,
                ),
                [range_labels("xyz", 3, device)],
                properties,
            ),
        )
    if strain_gradient is not None:
        block.add_gradient(
            "strain",
            TensorBlock(
                strain_gradient,
                range_labels("sample", n_rows, device),
                [range_labels("xyz_1", 3, device), range_labels("xyz_2", 3, device)],
                properties,
            ),
        )
    return TensorMap(range_labels("_", 1, device), [block])


def _empty_like_block(block: TensorBlock) -> TensorBlock:
    names = block.samples.names
    device = block.values.device
    samples = Labels(names, torch.zeros((0, len(names)), dtype=torch.int32, device=device))
    return TensorBlock(block.values[:0].detach(), samples, block.components, block.properties)


def zero_sample_layout(tensor_map: TensorMap) -> TensorMap:
    """``tensor_map``'s metadata (keys, components, properties, gradients) with no
    samples: how a target is described to the ``Scaler``."""
    blocks = []
    for block in tensor_map.blocks():
        new = _empty_like_block(block)
        for name, gradient in block.gradients():
            new.add_gradient(name, _empty_like_block(gradient))
        blocks.append(new)
    return TensorMap(tensor_map.keys, blocks)
