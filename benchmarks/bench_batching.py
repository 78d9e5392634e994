"""Batches across DDP ranks: fixed-size batches against batches bounded by atom count.

.. code-block:: bash

    python benchmarks/bench_batching.py [--quick]

2,000 structures with heavy-tailed sizes (4 to 512 atoms, Pareto tail), 4 ranks, one
epoch. Fixed-size batches come from torch's ``DistributedSampler`` (what Lightning
injects) cut into ``batch_size`` structures per rank; pl_mtt's come from
``AtomBatchSampler`` (``data.max_atoms_per_batch``). Per step, the imbalance is the atoms
of the largest rank's batch over the mean of the ranks' (every rank waits for the
slowest); printed: its mean and worst over the epoch, the steps, and the atoms of the
largest batch (the memory a step must fit). Goal: imbalance <= 1.10.

The timed case is the cost of one rank's batches for a new epoch: the
``DistributedSampler`` shuffle and cut against pl_mtt's plan (which every rank computes
whole; the step count is searched once, when the sampler is made). Once per epoch, not
per step.
"""

from __future__ import annotations

import sys
from pathlib import Path

import torch
from torch.utils.data import BatchSampler, DistributedSampler

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from harness import Case, compare, device_name, markdown_table, parse_args

from pl_mtt.data import AtomBatchSampler

N_STRUCTURES, QUICK_STRUCTURES = 2000, 400
WORLD = 4
BATCH_SIZES = (16, 48)  # 48: about as many atoms per batch as pl_mtt's
MAX_ATOMS = 1024
SEED = 0


def heavy_tailed_sizes(n: int, seed: int = SEED) -> torch.Tensor:
    """Atoms per structure: 4 / U^(1/1.1) (a Pareto tail), clipped to 4..512."""
    generator = torch.Generator().manual_seed(seed)
    uniform = torch.rand(n, generator=generator, dtype=torch.float64)
    return (4 * (1 - uniform) ** (-1 / 1.1)).clamp(4, 512).long()


def fixed_size_batches(n: int, batch_size: int, rank: int, epoch: int = 0) -> list[list[int]]:
    sampler = DistributedSampler(range(n), num_replicas=WORLD, rank=rank, seed=SEED)
    sampler.set_epoch(epoch)
    return list(BatchSampler(sampler, batch_size, drop_last=False))


def atom_batches(counts: torch.Tensor, rank: int, epoch: int = 0) -> list[list[int]]:
    sampler = AtomBatchSampler(counts, MAX_ATOMS, num_replicas=WORLD, rank=rank, seed=SEED)
    sampler.set_epoch(epoch)
    return list(sampler)


def _figures(counts: torch.Tensor, ranks: list[list[list[int]]]) -> dict[str, float]:
    steps = max(len(batches) for batches in ranks)
    loads = torch.zeros(WORLD, steps, dtype=torch.float64)
    for rank, batches in enumerate(ranks):
        for step, batch in enumerate(batches):
            loads[rank, step] = float(counts[batch].sum())
    ratio = loads.max(0).values / loads.mean(0)
    return {
        "steps": steps,
        "mean": float(ratio.mean()),
        "worst": float(ratio.max()),
        "largest batch": int(loads.max()),
        "atoms per batch": float(loads[loads > 0].mean()),
    }


def imbalance(quick: bool = False) -> dict[str, dict[str, float]]:
    """One epoch of each batching on the same sizes: name -> figures."""
    counts = heavy_tailed_sizes(QUICK_STRUCTURES if quick else N_STRUCTURES)
    n = len(counts)
    rows = {
        f"fixed batch_size={size}": _figures(
            counts, [fixed_size_batches(n, size, r) for r in range(WORLD)]
        )
        for size in BATCH_SIZES
    }
    rows["fixed batch_size"] = rows[f"fixed batch_size={BATCH_SIZES[0]}"]
    rows["pl_mtt max_atoms_per_batch"] = _figures(
        counts, [atom_batches(counts, r) for r in range(WORLD)]
    )
    return rows


def imbalance_table(quick: bool = False) -> str:
    rows = imbalance(quick)
    n = QUICK_STRUCTURES if quick else N_STRUCTURES
    lines = [
        f"### Balance across {WORLD} ranks ({n} structures, 4-512 atoms, heavy tail)",
        "",
        "| batching | steps | imbalance mean | imbalance worst | largest batch (atoms) "
        "| mean atoms per batch |",
        "|---|---|---|---|---|---|",
    ]
    names = [f"fixed batch_size={size}" for size in BATCH_SIZES]
    for name in [*names, "pl_mtt max_atoms_per_batch"]:
        row = rows[name]
        label = name if name in names else f"pl_mtt max_atoms_per_batch={MAX_ATOMS}"
        lines.append(
            f"| {label} | {row['steps']} | {row['mean']:.3f} | {row['worst']:.3f} "
            f"| {row['largest batch']} | {row['atoms per batch']:.0f} |"
        )
    lines.append("")
    lines.append(
        "Imbalance: per step, the largest rank's atoms / the mean over ranks (goal <= 1.10)."
    )
    return "\n".join(lines)


def cases(device: torch.device, quick: bool) -> list[Case]:
    counts = heavy_tailed_sizes(QUICK_STRUCTURES if quick else N_STRUCTURES)
    n = len(counts)
    fixed = BatchSampler(
        DistributedSampler(range(n), num_replicas=WORLD, rank=0, seed=SEED), BATCH_SIZES[0], False
    )
    bounded = AtomBatchSampler(counts, MAX_ATOMS, num_replicas=WORLD, rank=0, seed=SEED)
    epochs = iter(range(1, 1_000_000))

    def new_epoch(sampler, batches):
        def step():
            sampler.set_epoch(next(epochs))
            return list(batches)

        return step

    return [
        Case(
            "batching",
            f"one rank's batches for a new epoch ({n} structures, {WORLD} ranks)",
            baseline=new_epoch(fixed.sampler, fixed),
            ours=new_epoch(bounded, bounded),
            target="per-epoch plan, not per step",
            repeats=3 if quick else 10,
        )
    ]


def extra_report(device: torch.device, quick: bool) -> str:
    return imbalance_table(quick)


def main() -> None:
    args = parse_args("batches across ranks: fixed size vs bounded by atom count")
    device = torch.device(args.device)
    print(f"device: {device_name(device)}\n")
    print(imbalance_table(args.quick))
    print()
    print(markdown_table([compare(case, device) for case in cases(device, args.quick)]))


if __name__ == "__main__":
    main()
