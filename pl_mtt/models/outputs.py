"""Property labels of ensemble outputs (the output TensorMaps themselves are built with
:func:`pl_mtt.tensormaps.builders.atomistic_tensor_map`, like the data)."""

from __future__ import annotations

import torch
from metatensor.torch import Labels

__all__ = ["ensemble_properties"]


def ensemble_properties(
    name: str, n_members: int, n_properties: int, device: torch.device | None = None
) -> Labels:
    """``["member", name]`` labels, member-major (the member is the outer index; on the
    CPU without ``device``). TorchScript."""
    members = torch.arange(n_members, dtype=torch.int32, device=device)
    properties = torch.arange(n_properties, dtype=torch.int32, device=device)
    grid = torch.stack(torch.meshgrid(members, properties, indexing="ij"), dim=-1)
    return Labels(["member", name], grid.reshape(-1, 2))
