"""A distributed sampler that shards without padding (for evaluation and scale fits).

torch's ``DistributedSampler`` pads every rank to the same length by repeating samples,
so metrics over a validation set counted some structures twice. ``StridedShardSampler``
gives rank ``r`` of ``W`` the (optionally shuffled) indices ``r, r+W, r+2W, ...`` and
nothing else: the union over ranks is the dataset, each structure once. It subclasses
``DistributedSampler`` so that Lightning keeps it instead of wrapping it in a padding one.

Ranks can get different numbers of batches: use it where no per-step collective runs
(metrics that sync at epoch end, a scale-fit pass), not for DDP training steps.
"""

from __future__ import annotations

from collections.abc import Iterator, Sized

import torch
import torch.distributed as dist

__all__ = ["StridedShardSampler"]


class StridedShardSampler(torch.utils.data.DistributedSampler):
    """This rank's strided share of ``dataset``, never padded.

    Args:
        dataset: anything with ``len``.
        num_replicas: world size (default: from ``torch.distributed``, else 1).
        rank: this rank (default: from ``torch.distributed``, else 0).
        shuffle: permute the indices (seeded by ``seed + epoch``) before striding.
        seed: the shuffle seed, identical on every rank.
    """

    def __init__(
        self,
        dataset: Sized,
        num_replicas: int | None = None,
        rank: int | None = None,
        shuffle: bool = False,
        seed: int = 0,
    ) -> None:
        initialized = dist.is_available() and dist.is_initialized()
        if num_replicas is None:
            num_replicas = dist.get_world_size() if initialized else 1
        if rank is None:
            rank = dist.get_rank() if initialized else 0
        if not 0 <= rank < num_replicas:
            raise ValueError(f"rank must be in 0..{num_replicas - 1}, got {rank}")
        super().__init__(dataset, num_replicas=num_replicas, rank=rank, shuffle=shuffle, seed=seed)
        self.num_samples = len(range(rank, len(dataset), num_replicas))
        self.total_size = len(dataset)

    def __iter__(self) -> Iterator[int]:
        n = len(self.dataset)
        if self.shuffle:
            generator = torch.Generator()
            generator.manual_seed(self.seed + self.epoch)
            order = torch.randperm(n, generator=generator)
        else:
            order = torch.arange(n)
        return iter(order[self.rank :: self.num_replicas].tolist())

    def __len__(self) -> int:
        return self.num_samples
