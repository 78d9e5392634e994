"""Invariant per-atom radial descriptors with learned neighbour-type channels.

For atom ``i``:

    D_i[k, t] = (1 / norm) Σ_j  g_k(r_ij) f_c(r_ij) e_t(Z_j)

with Gaussians ``g_k`` centred on ``linspace(0, cutoff, n_radial)``, the cosine cutoff
``f_c(r) = (1 + cos(π r / r_c)) / 2`` (smooth: value and slope vanish at ``r_c``) and a
learned embedding ``e(Z)`` of the neighbour's atomic number. The descriptor is
concatenated with an embedding of the atom's own type.
"""

from __future__ import annotations

import math

import torch

__all__ = ["RadialDescriptor", "cosine_cutoff", "gaussian_basis"]

MAX_ATOMIC_NUMBER = 118


def cosine_cutoff(distances: torch.Tensor, cutoff: float) -> torch.Tensor:
    """``(1 + cos(π r / r_c)) / 2`` inside the cutoff, 0 beyond."""
    inside = (distances < cutoff).to(distances.dtype)
    return 0.5 * (torch.cos(distances * (math.pi / cutoff)) + 1.0) * inside


def gaussian_basis(distances: torch.Tensor, cutoff: float, n_radial: int) -> torch.Tensor:
    """``(P, n_radial)`` Gaussians of width = spacing, centred on ``linspace(0, r_c, n)``."""
    centers = torch.linspace(0.0, cutoff, n_radial, dtype=distances.dtype, device=distances.device)
    width = cutoff / max(n_radial - 1, 1)
    return torch.exp(-0.5 * ((distances[:, None] - centers) / width) ** 2)


class RadialDescriptor(torch.nn.Module):
    """Per-atom invariant features of size ``n_radial * type_dim + type_dim``.

    Args:
        cutoff: radial cutoff (Å).
        n_radial: number of Gaussians.
        type_dim: size of the neighbour and centre type embeddings.
        normalization: the neighbour sum is divided by it (about the number of
            neighbours inside the cutoff keeps the features of order one).
    """

    def __init__(
        self,
        cutoff: float = 5.0,
        n_radial: int = 16,
        type_dim: int = 8,
        normalization: float = 10.0,
    ) -> None:
        super().__init__()
        self.cutoff = float(cutoff)
        self.n_radial = int(n_radial)
        self.type_dim = int(type_dim)
        self.normalization = float(normalization)
        self.neighbor_embedding = torch.nn.Embedding(MAX_ATOMIC_NUMBER + 1, type_dim)
        self.center_embedding = torch.nn.Embedding(MAX_ATOMIC_NUMBER + 1, type_dim)

    @property
    def size(self) -> int:
        """Number of features per atom."""
        return self.n_radial * self.type_dim + self.type_dim

    def forward(
        self,
        types: torch.Tensor,
        centers: torch.Tensor,
        neighbors: torch.Tensor,
        vectors: torch.Tensor,
    ) -> torch.Tensor:
        """``(N, size)`` features of atoms of atomic numbers ``types`` (``(N,)``), from
        the pairs ``centers -> neighbors`` (``(P,)`` atom indices) of vectors
        ``(P, 3)``. TorchScript."""
        distances = torch.linalg.vector_norm(vectors, dim=1)
        radial = (
            gaussian_basis(distances, self.cutoff, self.n_radial)
            * cosine_cutoff(distances, self.cutoff)[:, None]
        )
        neighbor_types = self.neighbor_embedding(types[neighbors].long())
        pair_features = (radial[:, :, None] * neighbor_types[:, None, :]).reshape(
            distances.shape[0], self.n_radial * self.type_dim
        )  # explicit width: a structure may have no pair at all
        summed = torch.zeros(
            (types.shape[0], pair_features.shape[1]), dtype=radial.dtype, device=radial.device
        ).index_add(0, centers, pair_features)
        center_features = self.center_embedding(types.long())
        return torch.cat([summed / self.normalization, center_features], dim=1)
