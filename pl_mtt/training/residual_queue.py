"""Metric residuals kept from the fused loss and summed many steps at a time.

When the :class:`pl_mtt.LossModule` computed a target from raw inputs
(:mod:`pl_mtt.scaling.prepared`), its loss-unit residuals are exactly what the metrics
compare: the physical residual is the loss-unit one times the per-target scale (per atom
where divided), and the stress residual that times ``n_atoms / volume`` (or ``1 /
volume``). :class:`ResidualQueue` keeps references to them (no tensor operation in the
step) and turns a whole queue into per-metric sums of absolute values, sums of squares
and counts in one pass: one concatenation per metric, one volume computation for all
queued structures. The metrics call :meth:`ResidualQueue.flush` before their state is
read and every :attr:`ResidualQueue.STEPS` steps.
"""

from __future__ import annotations

import itertools
from collections.abc import Sequence
from dataclasses import dataclass

import torch
from metatomic.torch import System

from pl_mtt.tensormaps.batch_atoms import BatchAtoms, host_to_device
from pl_mtt.tensormaps.block_ops import lazy_script

__all__ = ["QueuedResidual", "ResidualQueue"]


@lazy_script
def _cells(systems: list[System]) -> list[torch.Tensor]:
    """The cell of each system (one TorchScript call)."""
    return [system.cell for system in systems]


@lazy_script
def _volumes(cells: list[torch.Tensor]) -> torch.Tensor:
    """``|a . (b x c)|`` of each cell (0 without a cell)."""
    stacked = torch.stack(cells)
    triple = stacked[:, 0] * torch.linalg.cross(stacked[:, 1], stacked[:, 2], dim=-1)
    return triple.sum(-1).abs()


@dataclass
class QueuedResidual:
    """One metric's residuals of one step, in loss units (no autograd history).

    ``counts[position]`` is the number of entries that count; ``inverse_scale`` turns
    loss units into physical ones (``None``: 1). A stress metric also keeps the number of
    atoms and the cell of every structure of the step, and whether the strain gradient
    is per atom (``divided``)."""

    output: int
    difference: torch.Tensor
    valid: torch.Tensor
    counts: torch.Tensor
    position: int
    inverse_scale: torch.Tensor | None
    stress: tuple[list[int], list[torch.Tensor], bool] | None = None


class ResidualQueue:
    """Queued :class:`QueuedResidual` s and their reduction to metric sums."""

    STEPS = 64
    """Steps kept at most before the sums are computed."""
    ENTRIES = 1 << 22
    """Residual entries kept at most (about 32 MiB in float64) before they are."""

    def __init__(self, n_outputs: int) -> None:
        self.n_outputs = n_outputs
        self.steps: list[list[QueuedResidual]] = []
        self.entries = 0

    def __len__(self) -> int:
        return len(self.steps)

    def clear(self) -> None:
        self.steps.clear()
        self.entries = 0

    def add(self, residuals: list[QueuedResidual]) -> bool:
        """Queue one step's residuals; returns whether the queue is full."""
        self.steps.append(residuals)
        self.entries += sum(r.difference.numel() for r in residuals)
        return len(self.steps) >= self.STEPS or self.entries >= self.ENTRIES

    @staticmethod
    def stress_info(systems: Sequence[System], divided: bool) -> tuple:
        """What a stress metric keeps of a step's systems (no tensor operation)."""
        systems = list(systems)
        if not systems:
            return [], [], divided
        return list(BatchAtoms.of(systems).sizes), _cells(systems), divided

    def flush(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None:
        """Sums of ``|physical residual|``, of its squares and the counts per metric
        output (float64, ``(n_outputs,)``) of everything queued; ``None`` when empty.
        The queue is emptied."""
        if not self.steps:
            return None
        by_output: dict[int, list[QueuedResidual]] = {}
        for step in self.steps:
            for residual in step:
                by_output.setdefault(residual.output, []).append(residual)
        self.clear()
        outputs, sums_abs, sums_sq, counts = [], [], [], []
        for output, residuals in by_output.items():
            total_abs, total_sq, count = _reduce(residuals)
            outputs.append(output)
            sums_abs.append(total_abs)
            sums_sq.append(total_sq)
            counts.append(count)
        device = sums_abs[0].device
        index = host_to_device(outputs, device)
        result = torch.zeros(3, self.n_outputs, dtype=torch.float64, device=device)
        result.index_copy_(
            1,
            index,
            torch.stack([torch.stack(sums_abs), torch.stack(sums_sq), torch.stack(counts)]),
        )
        return result[0], result[1], result[2]


def _physical(residuals: list[QueuedResidual]) -> torch.Tensor:
    """The residuals of one metric over the queued steps, in physical units, float64."""
    scales = [r.inverse_scale for r in residuals]
    if all(s is scales[0] for s in scales):  # one scaler state for the whole queue
        joined = torch.cat([r.difference for r in residuals]).to(torch.float64)
        return joined if scales[0] is None else joined / scales[0].to(torch.float64)
    return torch.cat(
        [
            r.difference.to(torch.float64)
            if s is None
            else r.difference.to(torch.float64) / s.to(torch.float64)
            for r, s in zip(residuals, scales, strict=True)
        ]
    )


def _counts(residuals: list[QueuedResidual]) -> torch.Tensor:
    """Total number of entries that count over the queued steps (float64)."""
    positions = {r.position for r in residuals}
    if len(positions) == 1:
        stacked = torch.stack([r.counts for r in residuals])
        return stacked[:, positions.pop()].sum().to(torch.float64)
    return torch.stack([r.counts[r.position] for r in residuals]).sum().to(torch.float64)


def _reduce(residuals: list[QueuedResidual]) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Sum of absolute values, sum of squares and count of one metric's residuals."""
    physical = _physical(residuals)
    if residuals[0].stress is None:
        flat = physical.reshape(-1)
        return torch.linalg.vector_norm(flat, 1), torch.dot(flat, flat), _counts(residuals)
    # stress = strain gradient x (n_atoms if it is per atom) / volume, per structure;
    # structures without a cell (volume 0) do not count
    sizes = list(itertools.chain.from_iterable(r.stress[0] for r in residuals))
    cells = list(itertools.chain.from_iterable(r.stress[1] for r in residuals))
    volumes = _volumes(cells).to(torch.float64)
    factor = 1.0 / volumes
    if residuals[0].stress[2]:
        factor = factor * host_to_device(sizes, volumes.device, torch.float64)
    has_cell = volumes > 0
    valid = torch.cat([r.valid for r in residuals]).reshape(len(sizes), -1) & has_cell[:, None]
    zero = torch.zeros((), dtype=torch.float64, device=volumes.device)
    stress = torch.where(valid, physical.reshape(len(sizes), -1) * factor[:, None], zero)
    stress = stress.reshape(-1)
    return (
        torch.linalg.vector_norm(stress, 1),
        torch.dot(stress, stress),
        valid.sum().to(torch.float64),
    )
