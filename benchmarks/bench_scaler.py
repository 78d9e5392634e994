"""Fitting baseline + scales: pl_mtt's one pass vs a naive two-pass loop over atomic types.

.. code-block:: bash

    python benchmarks/bench_scaler.py            # 2,000 systems x 50 atoms
    python benchmarks/bench_scaler.py --quick    # small, for smoke tests

Data: 2,000 systems of 50 atoms in batches of 50; targets ``energy`` (per structure),
``mtt::charge`` (per-atom scalar) and ``mtt::multi`` (per atom, 3 blocks ``o3_lambda``
0, 1, 2 with 1, 3, 5 components x 8 properties), at 10 and 80 atomic types. Both
implementations compute the composition baseline (least squares on type counts for the
energy, per-type means for the invariant per-atom blocks) and all full scales.

- naive: the spec read literally. Pass 1 builds type counts and per-type sums with one
  boolean mask per atomic type, solves the baseline; pass 2 removes it and accumulates
  squares per type, again one mask per type.
- pl_mtt: :func:`pl_mtt.scaling.fit.fit_pass` (one pass, ``index_add_`` over rows, sums
  around a shift, residual moments by algebra).

Both are measured with one torch thread (see ``one_thread``). Targets: >= 5x faster at
80 types; pl_mtt at 80 types <= 1.2x its time at 10 types (the
``own time`` row: naive column = pl_mtt at 10 types, pl_mtt column = pl_mtt at 80 types,
so its "speedup" must be >= 0.83).
"""

from __future__ import annotations

import sys
from pathlib import Path

import torch
from metatensor.torch import Labels, TensorBlock, TensorMap
from metatomic.torch import System

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from harness import Case, main_for, one_thread

from pl_mtt.scaling.composition import CompositionModel
from pl_mtt.scaling.fit import fit_pass
from pl_mtt.scaling.scaler import Scaler
from pl_mtt.tensormaps import zero_sample_layout

LAMBDAS = (0, 1, 2)
N_PROPERTIES = 8


def _labels(names: list[str], values: torch.Tensor) -> Labels:
    return Labels(names, values.to(torch.int32).reshape(-1, len(names)))


def make_batches(
    n_systems: int, n_atoms: int, n_types: int, batch_size: int, seed: int = 0
) -> list[tuple[list[System], dict[str, TensorMap], dict[str, TensorMap]]]:
    g = torch.Generator().manual_seed(seed)
    atomic_types = torch.arange(1, n_types + 1)
    per_type_energy = torch.randn(n_types, generator=g, dtype=torch.float64) * 3
    type_scale = 0.1 + torch.rand(n_types, generator=g, dtype=torch.float64)
    result = []
    for start in range(0, n_systems, batch_size):
        b = min(batch_size, n_systems - start)
        index = torch.randint(0, n_types, (b * n_atoms,), generator=g)
        types = atomic_types[index].to(torch.int32)
        systems = [
            System(
                types=types[i * n_atoms : (i + 1) * n_atoms],
                positions=torch.zeros(n_atoms, 3, dtype=torch.float64),
                cell=torch.zeros(3, 3, dtype=torch.float64),
                pbc=torch.tensor([False, False, False]),
            )
            for i in range(b)
        ]
        system_of_atom = torch.arange(b).repeat_interleave(n_atoms)
        atom = torch.arange(n_atoms).repeat(b)
        atom_samples = _labels(["system", "atom"], torch.stack([system_of_atom, atom], 1))
        energy = per_type_energy[index].view(b, n_atoms).sum(1, keepdim=True)
        energy = energy + 0.5 * torch.randn(b, 1, generator=g, dtype=torch.float64)
        targets = {
            "energy": TensorMap(
                Labels.single(),
                [
                    TensorBlock(
                        energy,
                        _labels(["system"], torch.arange(b)),
                        [],
                        _labels(["energy"], torch.tensor([0])),
                    )
                ],
            ),
            "mtt::charge": TensorMap(
                Labels.single(),
                [
                    TensorBlock(
                        (type_scale[index] * torch.randn(b * n_atoms, generator=g))[:, None],
                        atom_samples,
                        [],
                        _labels(["charge"], torch.tensor([0])),
                    )
                ],
            ),
        }
        blocks = []
        for lam in LAMBDAS:
            values = torch.randn(
                b * n_atoms, 2 * lam + 1, N_PROPERTIES, generator=g, dtype=torch.float64
            )
            blocks.append(
                TensorBlock(
                    values * type_scale[index][:, None, None],
                    atom_samples,
                    [_labels(["o3_mu"], torch.arange(-lam, lam + 1))],
                    _labels(["n"], torch.arange(N_PROPERTIES)),
                )
            )
        keys = _labels(["o3_lambda", "o3_sigma"], torch.tensor([[lam, 1] for lam in LAMBDAS]))
        targets["mtt::multi"] = TensorMap(keys, blocks)
        result.append((systems, targets, {}))
    return result


# -- the naive two-pass implementation ------------------------------------------------------
def naive_fit(batches, atomic_types: list[int]) -> dict[str, list[torch.Tensor]]:
    """Spec formulas with one boolean mask per atomic type; two passes over the data."""
    n_types = len(atomic_types)
    # pass 1: the baseline
    xtx = torch.zeros(n_types, n_types, dtype=torch.float64)
    xty = torch.zeros(n_types, dtype=torch.float64)
    atom_sums = {"mtt::charge": torch.zeros(n_types, 1), "mtt::multi": torch.zeros(n_types, 8)}
    atom_counts = {k: torch.zeros_like(v) for k, v in atom_sums.items()}
    for systems, targets, _ in batches:
        types = torch.cat([s.types for s in systems])
        system_of_atom = torch.cat(
            [torch.full((len(s),), i, dtype=torch.long) for i, s in enumerate(systems)]
        )
        counts = torch.zeros(len(systems), n_types, dtype=torch.float64)
        for t, atomic_type in enumerate(atomic_types):
            is_type = types == atomic_type
            counts[:, t] = torch.bincount(system_of_atom[is_type], minlength=len(systems))
            for name in atom_sums:
                values = targets[name].block_by_id(0).values
                values = values.reshape(values.shape[0], -1)[is_type]
                ok = ~torch.isnan(values)
                atom_sums[name][t] += torch.where(ok, values, 0.0).sum(0)
                atom_counts[name][t] += ok.sum(0)
        energy = targets["energy"].block_by_id(0).values[:, 0]
        xtx += counts.T @ counts
        xty += counts.T @ energy
    seen = torch.diagonal(xtx) > 0
    weights = torch.zeros(n_types, dtype=torch.float64)
    weights[seen] = torch.linalg.solve(xtx[seen][:, seen], xty[seen])
    means = {k: atom_sums[k] / atom_counts[k].clamp(min=1) for k in atom_sums}
    # pass 2: squares of the baseline-free, atom-divided targets
    sq_energy, n_energy = torch.zeros(1, dtype=torch.float64), 0
    sq = {
        "mtt::charge": [torch.zeros(n_types, 1, dtype=torch.float64)],
        "mtt::multi": [torch.zeros(n_types, 8, dtype=torch.float64) for _ in LAMBDAS],
    }
    n = {k: [torch.zeros_like(v) for v in vs] for k, vs in sq.items()}
    for systems, targets, _ in batches:
        types = torch.cat([s.types for s in systems])
        system_of_atom = torch.cat(
            [torch.full((len(s),), i, dtype=torch.long) for i, s in enumerate(systems)]
        )
        counts = torch.zeros(len(systems), n_types, dtype=torch.float64)
        for t, atomic_type in enumerate(atomic_types):
            counts[:, t] = torch.bincount(
                system_of_atom[types == atomic_type], minlength=len(systems)
            )
        energy = targets["energy"].block_by_id(0).values[:, 0]
        residual = (energy - counts @ weights) / counts.sum(1)
        sq_energy += (residual**2).sum()
        n_energy += residual.numel()
        for name in sq:
            for b, block in enumerate(targets[name].blocks()):
                values = block.values
                values = values.reshape(values.shape[0], -1, values.shape[-1])
                for t, atomic_type in enumerate(atomic_types):
                    selected = values[types == atomic_type]
                    if b == 0:
                        selected = selected - means[name][t]
                    ok = ~torch.isnan(selected)
                    sq[name][b][t] += torch.where(ok, selected, 0.0).pow(2).sum((0, 1))
                    n[name][b][t] += ok.sum((0, 1))
    scales = {"energy": [torch.sqrt(sq_energy / n_energy)]}
    for name in sq:
        scales[name] = [
            torch.sqrt(s / c.clamp(min=1)) for s, c in zip(sq[name], n[name], strict=True)
        ]
    return scales


def ours_fit(batches, atomic_types, layouts) -> Scaler:
    scaler = Scaler(atomic_types, layouts)
    fit_pass(batches, scaler, CompositionModel(atomic_types, layouts))
    return scaler


def _check_agreement(batches, atomic_types, layouts) -> None:
    naive = naive_fit(batches, atomic_types)
    ours = ours_fit(batches, atomic_types, layouts).scales
    for name, blocks in naive.items():
        for b, expected in enumerate(blocks):
            got = ours[name].block_by_id(b).values
            expected = expected.reshape(got.shape)
            seen = expected > 0
            torch.testing.assert_close(got[seen], expected[seen], rtol=1e-9, atol=0)


def cases(device: torch.device, quick: bool) -> list[Case]:
    if device.type != "cpu":
        print("bench_scaler: the fit pass reads CPU batches; measuring on CPU")
    n_systems, n_atoms = (100, 20) if quick else (2000, 50)
    result = []
    own = {}
    for n_types in (10, 80):
        data = make_batches(n_systems, n_atoms, n_types, batch_size=50, seed=n_types)
        atomic_types = list(range(1, n_types + 1))
        layouts = {name: zero_sample_layout(t) for name, t in data[0][1].items()}
        _check_agreement(data, atomic_types, layouts)
        own[n_types] = (data, atomic_types, layouts)
        result.append(
            Case(
                "scaler",
                f"fit {n_systems}x{n_atoms} atoms, {n_types} types",
                baseline=one_thread(lambda d=data, t=atomic_types: naive_fit(d, t)),
                ours=one_thread(lambda d=data, t=atomic_types, lay=layouts: ours_fit(d, t, lay)),
                target=">= 5x at 80 types",
                repeats=5 if not quick else 2,
                warmup=1,
            )
        )
    result.append(
        Case(
            "scaler",
            "own time: 10 types (naive column) vs 80 types (pl_mtt column)",
            baseline=one_thread(lambda: ours_fit(*own[10])),
            ours=one_thread(lambda: ours_fit(*own[80])),
            target="speedup >= 0.83 (80 types <= 1.2x 10 types)",
            repeats=5 if not quick else 2,
            warmup=1,
        )
    )
    return result


if __name__ == "__main__":
    main_for(cases, "Scaler fit: one pass vs naive two-pass per-type masks")
