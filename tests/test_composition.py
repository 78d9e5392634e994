"""CompositionModel and the one-pass fit against two-pass float64 references."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch
from metatensor.torch import Labels, TensorBlock, TensorMap

sys.path.insert(0, str(Path(__file__).parent / "scripts"))

from scaler_data import N_MULTI, batches, layouts, random_structures
from scaler_reference import (
    baseline_reference,
    reference_scales,
    residual_batches,
)

from pl_mtt.scaling.composition import CompositionModel
from pl_mtt.scaling.fit import fit_pass
from pl_mtt.scaling.scaler import Scaler

TYPES = [1, 6, 8]
TARGETS = ("energy", "mtt::charge", "mtt::multi", "mtt::dos")


def _weights(model, name, block=0):
    return model.weights[name].block_by_id(block).values


def _rel(a, b):
    return ((a - b).abs().max() / b.abs().max()).item()


@pytest.fixture(scope="module")
def data():
    structures = random_structures(60, TYPES, seed=11, nan_fraction=0.1, mask_fraction=0.2)
    return batches(structures, 7, TARGETS)


@pytest.fixture(scope="module")
def one_pass(data):
    scaler = Scaler(TYPES, layouts(TARGETS), no_per_property_scales=["mtt::dos"])
    composition = CompositionModel(TYPES, layouts(TARGETS), exclude=["mtt::dos"])
    summary = fit_pass(data, scaler, composition)
    assert summary.local_structures == 60
    return scaler, composition


def test_which_blocks_get_a_baseline(one_pass):
    _, composition = one_pass
    assert composition.blocks == {
        "energy": [0],
        "mtt::charge": [0],
        "mtt::multi": [0],  # o3_lambda = 0 only
        "mtt::dos": [],  # excluded
    }
    assert set(composition.weights) == {"energy", "mtt::charge", "mtt::multi"}
    keys = composition.weights["mtt::multi"].keys
    assert keys.names == ["o3_lambda", "o3_sigma"]
    assert keys.values.tolist() == [[0, 1]]


@pytest.mark.parametrize(("name", "block"), [("energy", 0), ("mtt::charge", 0), ("mtt::multi", 0)])
def test_baseline_matches_reference(one_pass, data, name, block):
    _, composition = one_pass
    expected = baseline_reference(data, name, TYPES, block_index=block)
    torch.testing.assert_close(_weights(composition, name), expected, rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize(
    ("name", "n_blocks", "n_properties"),
    [("energy", 1, [1]), ("mtt::charge", 1, [1]), ("mtt::multi", 3, [N_MULTI] * 3)],
)
def test_one_pass_scales_match_two_pass_reference(one_pass, data, name, n_blocks, n_properties):
    scaler, _ = one_pass
    weights = baseline_reference(data, name, TYPES)
    residuals = residual_batches(data, name, weights, TYPES)
    types = [None] if name == "energy" else TYPES
    _, _, full = reference_scales(residuals, name, n_blocks, n_properties, types)
    for b in range(n_blocks):
        block = scaler.scales[name].block_by_id(b)
        rows = block.samples.column("atomic_type").tolist()
        for i, t in enumerate(rows):
            expected = torch.tensor(full[None if t == -1 else t][b], dtype=torch.float64)
            torch.testing.assert_close(block.values[i], expected, rtol=1e-10, atol=0)


def test_dos_is_scaled_but_has_no_baseline(one_pass, data):
    scaler, _ = one_pass
    divided = [
        (s, {"mtt::dos": _divide(t["mtt::dos"], s)}, e) for s, t, e in data
    ]  # no baseline: raw DOS divided by atoms
    per_target, _, _ = reference_scales(divided, "mtt::dos", 1, [6], [None], pooled_only=True)
    values = scaler.scales["mtt::dos"].block_by_id(0).values
    torch.testing.assert_close(
        values, torch.full_like(values, per_target[None]), rtol=1e-10, atol=0
    )


def _divide(tensor, systems):
    block = tensor.block_by_id(0)
    n = torch.tensor([len(s) for s in systems], dtype=torch.float64)[:, None]
    return TensorMap(
        tensor.keys, [TensorBlock(block.values / n, block.samples, [], block.properties)]
    )


def _dft_data(first_batch_types=None, n=240, batch_size=12):
    per_type = {1: -3000.0, 6: -3150.0, 8: -2890.0}
    structures = random_structures(
        n,
        TYPES,
        seed=5,
        n_atoms=(3, 9),
        energy_per_type=per_type,
        energy_noise=0.05,  # ~0.01 eV/atom residuals
    )
    if first_batch_types is not None:
        allowed = set(first_batch_types)
        first = [i for i, s in enumerate(structures) if set(s.types.tolist()) <= allowed]
        rest = [i for i in range(len(structures)) if i not in set(first)]
        order = first[:batch_size] + rest + first[batch_size:]
        structures = [structures[i] for i in order]
    return batches(structures, batch_size, ("energy",), gradients=False)


@pytest.mark.parametrize("first_batch_types", [None, [1, 6]])
def test_dft_scale_energies_one_pass_is_accurate(first_batch_types):
    data = _dft_data(first_batch_types)
    if first_batch_types is not None:
        first = {int(t) for s in data[0][0] for t in s.types.tolist()}
        assert 8 not in first
    scaler = Scaler(TYPES, layouts(("energy",)))
    composition = CompositionModel(TYPES, layouts(("energy",)))
    fit_pass(data, scaler, composition)
    weights = baseline_reference(data, "energy", TYPES)
    assert _rel(_weights(composition, "energy"), weights) < 1e-8
    residuals = residual_batches(data, "energy", weights, TYPES)
    _, _, full = reference_scales(residuals, "energy", 1, [1], [None])
    sigma = scaler.scales["energy"].block_by_id(0).values.item()
    assert 0.003 < full[None][0][0] < 0.03  # residuals of ~0.01 eV/atom
    assert abs(sigma - full[None][0][0]) / full[None][0][0] < 1e-10  # (measured ~1e-12)


def test_expanded_moments_without_shift_would_not_be_accurate():
    """Why the shift matters: the same algebra around a zero shift loses the residual scale
    (moving the sums to zero, exact algebra, stands for accumulating them there)."""
    from pl_mtt.scaling import divide_by_atoms

    data = _dft_data()
    scaler = Scaler(TYPES, layouts(("energy",)))
    composition = CompositionModel(TYPES, layouts(("energy",)))
    for systems, targets, extra in data:
        shifted = composition.accumulate_and_shift(systems, targets, extra)
        scaler.accumulate(systems, divide_by_atoms(systems, shifted), extra)
    scaler.add_to_sums(composition.recenter(torch.zeros(len(TYPES), dtype=torch.float64)))
    composition.fit()
    scaler.add_to_sums(composition.sum_corrections())
    scaler.fit()
    weights = baseline_reference(data, "energy", TYPES)
    assert _rel(_weights(composition, "energy"), weights) < 1e-12  # the solve is unaffected
    residuals = residual_batches(data, "energy", weights, TYPES)
    _, _, full = reference_scales(residuals, "energy", 1, [1], [None])
    sigma = scaler.scales["energy"].block_by_id(0).values.item()
    assert abs(sigma - full[None][0][0]) / full[None][0][0] > 1e-7


class _Collectives:
    """broadcast / all_reduce between threads (stands for the ranks of a process group)."""

    def __init__(self, world_size):
        import threading

        self.barrier = threading.Barrier(world_size)
        self.slots = [None] * world_size

    def broadcast(self, rank):
        def run(tensor):
            self.slots[rank] = tensor.clone()
            self.barrier.wait()
            result = self.slots[0].clone()
            self.barrier.wait()
            return result

        return run

    def all_reduce(self, rank):
        def run(tensor):
            self.slots[rank] = tensor.clone()
            self.barrier.wait()
            result = sum(self.slots[1:], self.slots[0].clone())
            self.barrier.wait()
            return result

        return run


@pytest.mark.parametrize(
    ("world_size", "dft", "rtol"),
    [(2, False, 1e-12), (3, False, 1e-12), (2, True, 1e-10), (3, True, 1e-10)],
)
def test_sharded_fit_equals_single_process(world_size, dft, rtol):
    """Strided shards + rank 0's shift + one all_reduce: identical on every rank, equal to
    the single-process fit; type 8 absent from rank 0's first batch.

    With DFT-scale energies (|E/N| ~ 3000 eV, residuals ~ 0.01 eV/atom) the residual scale
    moves by ~3e5 x any rounding of the baseline (float64 conditioning of the problem,
    shared by any implementation: the exact-arithmetic and float64 references differ by
    ~1e-12 too), hence 1e-10 there.
    """
    import threading

    from scaler_data import collate

    structures = random_structures(
        61,
        TYPES,
        seed=9,
        energy_per_type={1: -3000.0, 6: -3150.0, 8: -2890.0} if dft else None,
        energy_noise=0.05 if dft else 0.5,
        nan_fraction=0.1,
        mask_fraction=0.2,
    )
    structures.sort(key=lambda s: 8 in s.types.tolist())  # type 8 only late
    targets = ("energy", "mtt::charge", "mtt::multi")

    def models():
        return Scaler(TYPES, layouts(targets)), CompositionModel(TYPES, layouts(targets))

    single = models()
    fit_pass(batches(structures, 4, targets), *single)
    results = [None] * world_size
    collectives = _Collectives(world_size)

    def rank_main(rank):
        shard = structures[rank::world_size]
        data = [collate(shard[i : i + 4], targets) for i in range(0, len(shard), 4)]
        scaler, composition = models()
        summary = fit_pass(
            data,
            scaler,
            composition,
            broadcast=collectives.broadcast(rank),
            all_reduce=collectives.all_reduce(rank),
        )
        results[rank] = (scaler.state_dict(), composition.state_dict(), summary)

    threads = [threading.Thread(target=rank_main, args=(r,)) for r in range(world_size)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert sum(r[2].local_structures for r in results) == 61
    assert all(r[2].total_structures == 61 for r in results)
    for part, model in ((0, single[0]), (1, single[1])):
        expected = model.state_dict()
        for key, value in expected.items():
            if not isinstance(value, torch.Tensor):  # the construction (extra state)
                continue
            for rank in range(world_size):
                assert torch.equal(results[rank][part][key], results[0][part][key]), key
            if value.is_floating_point():
                torch.testing.assert_close(results[0][part][key], value, rtol=rtol, atol=0)
            else:
                assert torch.equal(results[0][part][key], value)


def test_not_divided_targets_use_fractions(data):
    scaler = Scaler(TYPES, layouts(("energy",)), per_structure_targets=["energy"])
    composition = CompositionModel(TYPES, layouts(("energy",)), per_structure_targets=["energy"])
    energy_only = [(s, {"energy": t["energy"]}, {}) for s, t, _ in data]
    fit_pass(energy_only, scaler, composition)
    weights = baseline_reference(energy_only, "energy", TYPES, divided=False)
    torch.testing.assert_close(_weights(composition, "energy"), weights, rtol=1e-10, atol=1e-12)
    residuals = residual_batches(energy_only, "energy", weights, TYPES, divided=False)
    _, _, full = reference_scales(residuals, "energy", 1, [1], [None])
    sigma = scaler.scales["energy"].block_by_id(0).values.item()
    assert sigma == pytest.approx(full[None][0][0], rel=1e-10)


def test_unseen_types_get_zero_and_collinear_types_fit():
    # types 1 and 6 always appear together 1:1 (collinear); 8 and 9 never appear
    structures = random_structures(20, [1], seed=2, energy_per_type={1: -5.0})
    data = []
    for systems, targets, extra in batches(structures, 5, ("energy", "mtt::charge")):
        from metatomic.torch import System

        doubled = []
        for s in systems:
            types = torch.cat([s.types, torch.full_like(s.types, 6)])
            positions = torch.cat([s.positions, s.positions + 1])
            doubled.append(System(types=types, positions=positions, cell=s.cell, pbc=s.pbc))
        data.append((doubled, {"energy": targets["energy"]}, extra))
    model = CompositionModel([1, 6, 8, 9], layouts(("energy",)))
    for batch in data:
        model.accumulate(*batch)
    model.fit()
    w = _weights(model, "energy")[:, 0]
    assert w[2].item() == 0.0
    assert w[3].item() == 0.0
    assert torch.isfinite(w).all()
    # the fitted baseline reproduces the least-squares prediction (unique even if w is not)
    x = torch.tensor([[len(s) / 2, len(s) / 2] for s in data[0][0]], dtype=torch.float64)
    y = data[0][1]["energy"].block_by_id(0).values[:, 0]
    all_x = torch.cat([torch.tensor([[len(s) / 2] * 2 for s in b[0]]) for b in data]).double()
    all_y = torch.cat([b[1]["energy"].block_by_id(0).values[:, 0] for b in data])
    best = torch.linalg.lstsq(all_x, all_y[:, None]).solution[:, 0]
    torch.testing.assert_close(x @ w[:2], x @ best, rtol=1e-8, atol=1e-8)
    assert y.shape == (5,)


def test_forward_round_trip_ensembles_gradients(one_pass, data):
    _, composition = one_pass
    systems, targets, _ = data[0]
    energy = targets["energy"].block_by_id(0)
    ensemble = TensorMap(
        Labels.single(),
        [
            TensorBlock(
                energy.values.repeat(1, 4),
                energy.samples,
                [],
                Labels(["member"], torch.arange(4, dtype=torch.int32)[:, None]),
            )
        ],
    )
    outputs = {**targets, "energy_ensemble": ensemble, "other": targets["mtt::dos"]}
    removed = composition(systems, outputs, remove=True)
    assert removed["other"] is outputs["other"]
    w = _weights(composition, "energy")[:, 0]
    counts = torch.tensor(
        [[sum(1 for t in s.types.tolist() if t == z) for z in TYPES] for s in systems],
        dtype=torch.float64,
    )
    expected = energy.values[:, 0] - counts @ w
    torch.testing.assert_close(removed["energy"].block_by_id(0).values[:, 0], expected)
    torch.testing.assert_close(
        removed["energy_ensemble"].block_by_id(0).values, expected[:, None].repeat(1, 4)
    )
    new = removed["energy"].block_by_id(0)
    for name in ("positions", "strain"):
        assert torch.equal(new.gradient(name).values, energy.gradient(name).values)
    # per-atom: each atom's type mean; lambda = 1, 2 blocks untouched
    charge = targets["mtt::charge"].block_by_id(0).values[:, 0]
    types = torch.cat([s.types for s in systems]).tolist()
    wc = _weights(composition, "mtt::charge")[:, 0]
    expected_charge = charge - torch.stack([wc[TYPES.index(t)] for t in types])
    torch.testing.assert_close(removed["mtt::charge"].block_by_id(0).values[:, 0], expected_charge)
    for b in (1, 2):
        torch.testing.assert_close(
            removed["mtt::multi"].block_by_id(b).values,
            targets["mtt::multi"].block_by_id(b).values,
            equal_nan=True,
        )
    back = composition(systems, removed, remove=False)
    for name in targets:
        for old, block in zip(targets[name].blocks(), back[name].blocks(), strict=True):
            torch.testing.assert_close(
                block.values, old.values, equal_nan=True, rtol=1e-14, atol=1e-12
            )


def test_state_dict_round_trip(one_pass):
    _, composition = one_pass
    fresh = CompositionModel(TYPES, layouts(TARGETS), exclude=["mtt::dos"])
    result = fresh.load_state_dict(composition.state_dict())
    assert result.missing_keys == []
    assert result.unexpected_keys == []
    for name in composition.weights:
        assert torch.equal(_weights(fresh, name), _weights(composition, name))


def test_errors(data):
    model = CompositionModel(TYPES, layouts(("energy",)))
    systems, targets, _ = data[0]
    with pytest.raises(ValueError, match="unknown target 'mtt::charge'"):
        model.accumulate(systems, {"mtt::charge": targets["mtt::charge"]})
    with pytest.raises(ValueError, match=r"exclude: unknown target\(s\) \['dos'\]"):
        CompositionModel(TYPES, layouts(("energy",)), exclude=["dos"])
    scaler = Scaler(TYPES, layouts(("energy", "mtt::charge")))
    with pytest.raises(ValueError, match="targets"):
        fit_pass(data, scaler, model)
    with pytest.raises(ValueError, match="per_structure_targets differ"):
        fit_pass(
            data,
            Scaler(TYPES, layouts(("energy",)), per_structure_targets=["energy"]),
            model,
        )
