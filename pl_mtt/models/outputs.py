"""Batched output TensorMaps of the models (``system`` = position in the batch).

Same layout as the data (see :mod:`pl_mtt.data.layout`): per-structure samples
``["system"]``, per-atom ``["system", "atom"]``; gradient ``positions`` with samples
``["sample", "system", "atom"]`` and components ``[xyz]``; gradient ``strain`` with
samples ``["sample"]`` and components ``[xyz_1, xyz_2]``.
"""

from __future__ import annotations

import torch
from metatensor.torch import Labels, TensorBlock, TensorMap

__all__ = ["ensemble_properties", "output_tensor_map", "properties_labels"]


def _range(name: str, n: int, device: torch.device) -> Labels:
    return Labels([name], torch.arange(n, dtype=torch.int32, device=device).reshape(-1, 1))


def properties_labels(name: str, n: int, device: torch.device | str = "cpu") -> Labels:
    """``Labels([name], 0..n-1)``."""
    return _range(name, n, torch.device(device))


def ensemble_properties(
    name: str, n_members: int, n_properties: int, device: torch.device | str = "cpu"
) -> Labels:
    """``["member", name]`` labels, member-major (the member is the outer index)."""
    members = torch.arange(n_members, dtype=torch.int32, device=device)
    properties = torch.arange(n_properties, dtype=torch.int32, device=device)
    grid = torch.stack(torch.meshgrid(members, properties, indexing="ij"), dim=-1)
    return Labels(["member", name], grid.reshape(-1, 2))


def output_tensor_map(
    values: torch.Tensor,
    properties: Labels,
    *,
    per_atom: bool = False,
    atom_system: torch.Tensor | None = None,
    atom_index: torch.Tensor | None = None,
    positions_gradient: torch.Tensor | None = None,
    strain_gradient: torch.Tensor | None = None,
) -> TensorMap:
    """One-block TensorMap of per-structure (``(B, P)``) or per-atom (``(N, P)``,
    ``per_atom=True``) values.

    Per-atom values need ``atom_system``/``atom_index`` (``(N,)``); so does
    ``positions_gradient`` ``(N, 3, P)``. ``strain_gradient`` is ``(B, 3, 3, P)``.
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
        samples = Labels(
            ["system"],
            torch.arange(n_rows, dtype=torch.int32, device=device).reshape(-1, 1),
            assume_unique=True,
        )
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
                [_range("xyz", 3, device)],
                properties,
            ),
        )
    if strain_gradient is not None:
        block.add_gradient(
            "strain",
            TensorBlock(
                strain_gradient,
                Labels(
                    ["sample"],
                    torch.arange(n_rows, dtype=torch.int32, device=device).reshape(-1, 1),
                    assume_unique=True,
                ),
                [_range("xyz_1", 3, device), _range("xyz_2", 3, device)],
                properties,
            ),
        )
    keys = Labels(["_"], torch.zeros((1, 1), dtype=torch.int32, device=device))
    return TensorMap(keys, [block])
