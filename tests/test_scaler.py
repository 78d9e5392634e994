"""Scaler: spec formulas (reference + hand-computed), forward, fixed scales, state, errors."""

from __future__ import annotations

import math
import sys
from pathlib import Path

import pytest
import torch
from metatensor.torch import Labels, TensorBlock, TensorMap
from metatomic.torch import System

sys.path.insert(0, str(Path(__file__).parent / "scripts"))

from scaler_data import (
    LAMBDAS,
    N_DOS,
    N_MULTI,
    batches,
    layouts,
    random_structures,
)
from scaler_reference import reference_scales

from pl_mtt.scaling.scaler import Scaler
from pl_mtt.tensormaps import ensemble_output_name

TYPES = [1, 6, 8, 9]  # 9 never appears in the data
DATA_TYPES = [1, 6, 8]
ALL = ("energy", "mtt::charge", "mtt::multi", "mtt::dos", "mtt::pair", "mtt::typed")


def _system(types):
    n = len(types)
    return System(
        types=torch.tensor(types, dtype=torch.int32),
        positions=torch.zeros(n, 3, dtype=torch.float64),
        cell=torch.zeros(3, 3, dtype=torch.float64),
        pbc=torch.tensor([False, False, False]),
    )


def _labels(names, values):
    return Labels(names, torch.tensor(values, dtype=torch.int32).reshape(-1, len(names)))


def _tmap(values, samples, names=("system",), components=(), properties=1, keys=None):
    """A one-block TensorMap (or several blocks when ``values`` is a list)."""
    if not isinstance(values, list):
        values = [values]
    blocks = []
    for v in values:
        comps = [_labels([f"c{i}"], [[j] for j in range(s)]) for i, s in enumerate(components)]
        blocks.append(
            TensorBlock(
                torch.as_tensor(v, dtype=torch.float64),
                _labels(list(names), samples),
                comps,
                _labels(["p"], [[j] for j in range(v.shape[-1] if hasattr(v, "shape") else 1)]),
            )
        )
    if keys is None:
        keys = (
            Labels.single()
            if len(blocks) == 1
            else _labels(["k"], [[i] for i in range(len(blocks))])
        )
    return TensorMap(keys, blocks)


def _layout(tensor):
    from pl_mtt.tensormaps import zero_sample_layout

    return zero_sample_layout(tensor)


def _by_type(tensor_map, block=0):
    """{atomic_type or None: values row} of a public scales TensorMap."""
    b = tensor_map.block_by_id(block)
    types = b.samples.column("atomic_type").tolist()
    return {None if t == -1 else t: b.values[i] for i, t in enumerate(types)}


@pytest.fixture(scope="module")
def data():
    # types absent from some batches: structures of one type each, small batches
    structures = random_structures(
        40, DATA_TYPES, seed=7, nan_fraction=0.1, mask_fraction=0.2, max_types_per_structure=1
    ) + random_structures(24, DATA_TYPES, seed=8, nan_fraction=0.1, mask_fraction=0.2)
    return batches(structures, 5, ALL, atomic_types=DATA_TYPES)


@pytest.fixture(scope="module")
def fitted(data):
    scaler = Scaler(TYPES, layouts(ALL, DATA_TYPES), no_per_property_scales=["mtt::dos"])
    for systems, targets, extra in data:
        scaler.accumulate(systems, targets, extra)
    scaler.fit()
    return scaler


def test_types_absent_from_some_batches(data):
    present = [{int(t) for s in systems for t in s.types.tolist()} for systems, _, _ in data]
    assert any(len(p) < len(DATA_TYPES) for p in present)


@pytest.mark.parametrize(
    ("name", "n_blocks", "n_properties", "pooled"),
    [
        ("energy", 1, [1], False),
        ("mtt::charge", 1, [1], False),
        ("mtt::multi", 3, [N_MULTI] * 3, False),
        ("mtt::dos", 1, [N_DOS], True),
        ("mtt::typed", 3, [1, 1, 1], False),
    ],
)
def test_matches_spec_reference(fitted, data, name, n_blocks, n_properties, pooled):
    types = [None] if name in ("energy", "mtt::dos") else TYPES
    per_target, per_property, full = reference_scales(
        data, name, n_blocks, n_properties, types, pooled_only=pooled or None
    )
    got_pt, got_pp, got_full = (
        fitted.per_target_scales[name],
        fitted.per_property_scales[name],
        fitted.scales[name],
    )
    for b in range(n_blocks):
        rows_pt, rows_pp, rows_full = (
            _by_type(got_pt, b),
            _by_type(got_pp, b),
            _by_type(got_full, b),
        )
        assert set(rows_full) == set(types)
        for t in types:
            expected_pt = torch.full((n_properties[b],), per_target[t], dtype=torch.float64)
            torch.testing.assert_close(rows_pt[t], expected_pt, rtol=1e-10, atol=0)
            expected_pp = torch.tensor(per_property[t][b], dtype=torch.float64)
            torch.testing.assert_close(rows_pp[t], expected_pp, rtol=1e-10, atol=0)
            expected_full = torch.tensor(full[t][b], dtype=torch.float64)
            torch.testing.assert_close(rows_full[t], expected_full, rtol=1e-10, atol=0)


def test_unseen_type_and_atom_pairs_get_one(fitted):
    assert torch.all(_by_type(fitted.scales["mtt::charge"])[9] == 1.0)
    assert torch.all(_by_type(fitted.scales["mtt::multi"], 2)[9] == 1.0)
    for tensor in (fitted.scales, fitted.per_target_scales, fitted.per_property_scales):
        assert torch.all(tensor["mtt::pair"].block_by_id(0).values == 1.0)


def test_full_equals_per_target_times_per_property_equals_raw_rms(data, fitted):
    # raw per-property RMS of mtt::multi, block 2, type 8, computed directly
    total, count = torch.zeros(N_MULTI, dtype=torch.float64), torch.zeros(N_MULTI)
    for systems, targets, extra in data:
        block = targets["mtt::multi"].block_by_id(2)
        mask = extra["mtt::multi_mask"].block_by_id(2).values
        types = torch.cat([s.types for s in systems])
        rows = (
            types[
                torch.tensor(
                    [sum(len(s) for s in systems[:i]) + a for i, a in block.samples.values.tolist()]
                )
            ]
            == 8
        )
        values, mask = block.values[rows], mask[rows]
        ok = ~torch.isnan(values) & (mask != 0)
        total += torch.where(ok, values, 0.0).pow(2).sum((0, 1))
        count += ok.sum((0, 1))
    raw = torch.sqrt(total / count)
    full = _by_type(fitted.scales["mtt::multi"], 2)[8]
    product = (
        _by_type(fitted.per_target_scales["mtt::multi"], 2)[8]
        * _by_type(fitted.per_property_scales["mtt::multi"], 2)[8]
    )
    torch.testing.assert_close(full, raw, rtol=1e-12, atol=0)
    torch.testing.assert_close(product, raw, rtol=1e-12, atol=0)


# -- hand-computed cases --------------------------------------------------------------------
def test_hand_per_structure_pooled_over_components():
    # two structures, one block with 2 components: sigma = sqrt((1+4+9+16)/4)
    t = _tmap(torch.tensor([[[1.0], [2.0]], [[3.0], [4.0]]]), [[0], [1]], components=(2,))
    scaler = Scaler([1], {"x": _layout(t)})
    scaler.accumulate([_system([1]), _system([1, 1])], {"x": t})
    scaler.fit()
    assert scaler.scales["x"].block_by_id(0).values.item() == pytest.approx(math.sqrt(7.5))
    assert scaler.per_property_scales["x"].block_by_id(0).values.item() == 1.0


def test_hand_per_atom_per_type():
    # atoms of types [1, 8, 1]: sigma_1 = sqrt((1 + 9)/2), sigma_8 = 2
    t = _tmap(torch.tensor([[1.0], [2.0], [3.0]]), [[0, 0], [0, 1], [0, 2]], ("system", "atom"))
    scaler = Scaler([1, 8], {"q": _layout(t)})
    scaler.accumulate([_system([1, 8, 1])], {"q": t})
    scaler.fit()
    values = scaler.scales["q"].block_by_id(0).values[:, 0].tolist()
    assert values == pytest.approx([math.sqrt(5.0), 2.0])
    assert scaler.scales["q"].block_by_id(0).samples.column("atomic_type").tolist() == [1, 8]


def test_hand_multi_property_two_stages():
    # per-structure, 2 blocks: block 0 properties [1, 3] / [1, 3]; block 1 [2] / [6]
    t = _tmap(
        [torch.tensor([[1.0, 3.0], [1.0, 3.0]]), torch.tensor([[2.0], [6.0]])],
        [[0], [1]],
    )
    scaler = Scaler([1], {"m": _layout(t)})
    scaler.accumulate([_system([1]), _system([1])], {"m": t})
    scaler.fit()
    sigma = math.sqrt((1 + 9 + 1 + 9 + 4 + 36) / 6)  # step 1: pooled over blocks/properties
    raw = [[1.0, 3.0], [math.sqrt(20.0)]]  # per-property RMS
    for b in range(2):
        pt = scaler.per_target_scales["m"].block_by_id(b).values[0].tolist()
        pp = scaler.per_property_scales["m"].block_by_id(b).values[0].tolist()
        full = scaler.scales["m"].block_by_id(b).values[0].tolist()
        assert pt == pytest.approx([sigma] * len(raw[b]), rel=1e-14)
        assert pp == pytest.approx([r / sigma for r in raw[b]], rel=1e-14)  # step 2
        assert full == pytest.approx(raw[b], rel=1e-14)


def test_hand_dos_pooled_only():
    t = _tmap(torch.tensor([[1.0, 3.0], [1.0, 3.0]]), [[0], [1]])
    scaler = Scaler([1], {"d": _layout(t)}, no_per_property_scales=["d"])
    scaler.accumulate([_system([1]), _system([1])], {"d": t})
    scaler.fit()
    assert scaler.scales["d"].block_by_id(0).values[0].tolist() == pytest.approx([math.sqrt(5)] * 2)
    assert scaler.per_property_scales["d"].block_by_id(0).values[0].tolist() == [1.0, 1.0]


def test_hand_zero_rms_no_samples_nan_and_mask():
    # property 0: all zero -> 1.0; property 1: NaN and masked entries ignored -> |4|;
    # property 2: only NaN -> no samples -> 1.0 (per-property factor 1, full = sigma)
    t = _tmap(torch.tensor([[0.0, 4.0, math.nan], [0.0, 100.0, math.nan]]), [[0], [1]])
    mask = _tmap(torch.tensor([[1.0, 1.0, 1.0], [1.0, 0.0, 1.0]]), [[0], [1]])
    scaler = Scaler([1], {"x": _layout(t)})
    scaler.accumulate([_system([1]), _system([1])], {"x": t}, {"x_mask": mask})
    scaler.fit()
    sigma = math.sqrt(16 / 3)  # pooled: entries 0, 4, 0
    assert scaler.per_target_scales["x"].block_by_id(0).values[0, 0].item() == pytest.approx(sigma)
    pp = scaler.per_property_scales["x"].block_by_id(0).values[0].tolist()
    assert pp == pytest.approx([1.0, 4.0 / sigma, 1.0])
    # a target whose entries are all zero, and one with no samples at all -> 1.0
    zero = _tmap(torch.zeros(2, 1), [[0], [1]])
    empty = _tmap(torch.zeros(0, 1), [])
    s2 = Scaler([1], {"z": _layout(zero), "e": _layout(empty)})
    s2.accumulate([_system([1]), _system([1])], {"z": zero})
    s2.fit()
    assert s2.scales["z"].block_by_id(0).values.item() == 1.0
    assert s2.scales["e"].block_by_id(0).values.item() == 1.0


def test_accumulate_does_not_modify_inputs(data):
    systems, targets, extra = data[0]
    before = {k: [b.values.clone() for b in v.blocks()] for k, v in {**targets, **extra}.items()}
    scaler = Scaler(TYPES, layouts(ALL, DATA_TYPES))
    scaler.accumulate(systems, targets, extra)
    for k, v in {**targets, **extra}.items():
        for old, block in zip(before[k], v.blocks(), strict=True):
            torch.testing.assert_close(block.values, old, equal_nan=True, rtol=0, atol=0)


def test_discovered_types():
    structures = random_structures(6, [1, 8], seed=1)
    scaler = Scaler(None, layouts(("mtt::charge",)))
    assert scaler.atomic_types == []
    for batch in batches(structures, 3, ("mtt::charge",)):
        scaler.accumulate(*batch)
    scaler.fit()
    assert scaler.atomic_types == [1, 8]
    block = scaler.scales["mtt::charge"].block_by_id(0)
    assert block.samples.column("atomic_type").tolist() == [1, 8]
    explicit = Scaler([8, 1], layouts(("mtt::charge",)))
    for batch in batches(structures, 3, ("mtt::charge",)):
        explicit.accumulate(*batch)
    explicit.fit()
    values = explicit.scales["mtt::charge"].block_by_id(0).values
    torch.testing.assert_close(block.values, values.flip(0), rtol=1e-14, atol=0)


# -- forward --------------------------------------------------------------------------------
def test_forward_per_type_gradients_ensembles_passthrough(fitted, data):
    systems, targets, _ = data[-1]
    outputs = {k: targets[k] for k in ("energy", "mtt::charge", "mtt::multi")}
    charge = targets["mtt::charge"].block_by_id(0)
    members = 3
    ens = TensorMap(
        Labels.single(),
        [
            TensorBlock(
                charge.values.repeat(1, members) * torch.tensor([1.0, 2.0, 3.0]),
                charge.samples,
                [],
                _labels(["member"], [[0], [1], [2]]),
            )
        ],
    )
    outputs[ensemble_output_name("mtt::charge")] = ens
    outputs["features"] = targets["mtt::pair"]
    outputs["mtt::pair"] = targets["mtt::pair"]
    result = fitted(systems, outputs, remove=True)
    assert result is not outputs
    assert result["features"] is outputs["features"]
    # per atom: divided by the scale of each atom's type
    types = torch.cat([s.types for s in systems])
    table = _by_type(fitted.scales["mtt::charge"])
    expected = charge.values / torch.stack([table[int(t)] for t in types])
    torch.testing.assert_close(result["mtt::charge"].block_by_id(0).values, expected)
    ens_values = result["mtt::aux::charge_ensemble"].block_by_id(0).values
    torch.testing.assert_close(ens_values, expected.repeat(1, 3) * torch.tensor([1.0, 2.0, 3.0]))
    # per structure: gradients follow the target
    sigma = fitted.scales["energy"].block_by_id(0).values.item()
    energy, new = targets["energy"].block_by_id(0), result["energy"].block_by_id(0)
    torch.testing.assert_close(new.values, energy.values / sigma)
    for name in ("positions", "strain"):
        torch.testing.assert_close(new.gradient(name).values, energy.gradient(name).values / sigma)
    # multi-block: per-type, per-property full scales, components broadcast
    for b in range(len(LAMBDAS)):
        block = targets["mtt::multi"].block_by_id(b)
        rows = _by_type(fitted.scales["mtt::multi"], b)
        atoms = [sum(len(s) for s in systems[:i]) + a for i, a in block.samples.values.tolist()]
        factors = torch.stack([rows[int(types[a])] for a in atoms])[:, None, :]
        torch.testing.assert_close(
            result["mtt::multi"].block_by_id(b).values, block.values / factors, equal_nan=True
        )
    # inputs untouched and the round trip is exact
    back = fitted(systems, result, remove=False)
    for name in ("energy", "mtt::charge", "mtt::multi"):
        for old, new_block in zip(outputs[name].blocks(), back[name].blocks(), strict=True):
            torch.testing.assert_close(new_block.values, old.values, equal_nan=True)


def test_forward_per_atom_gradients_follow_parent_row():
    t = _tmap(torch.tensor([[1.0], [2.0], [4.0]]), [[0, 0], [0, 1], [1, 0]], ("system", "atom"))
    scaler = Scaler([1, 8], {"q": _layout(t)})
    systems = [_system([1, 8]), _system([8])]
    scaler.accumulate(systems, {"q": t})
    scaler.fit()  # sigma_1 = 1, sigma_8 = sqrt(10)
    block = TensorBlock(
        torch.ones(3, 1, dtype=torch.float64),
        _labels(["system", "atom"], [[0, 0], [0, 1], [1, 0]]),
        [],
        _labels(["p"], [[0]]),
    )
    gradient = TensorBlock(
        torch.ones(4, 3, 1, dtype=torch.float64),
        _labels(["sample", "system", "atom"], [[0, 0, 0], [1, 0, 0], [1, 0, 1], [2, 1, 0]]),
        [_labels(["xyz"], [[0], [1], [2]])],
        block.properties,
    )
    block.add_gradient("positions", gradient)
    out = TensorMap(Labels.single(), [block])
    result = scaler(systems, {"q": out}, remove=False)["q"].block_by_id(0)
    s8 = math.sqrt(10.0)
    assert result.values[:, 0].tolist() == pytest.approx([1.0, s8, s8])
    g = result.gradient("positions").values[:, 0, 0].tolist()
    assert g == pytest.approx([1.0, s8, s8, s8])


def test_loss_module_call_applies_per_property_only(fitted, data):
    systems, targets, _ = data[0]
    outputs = {k: targets[k] for k in ("energy", "mtt::multi", "mtt::dos")}
    result = fitted(
        systems, outputs, remove=False, use_per_target_scales=False, use_per_property_scales=True
    )
    # single-property and DOS targets: unchanged; multi-property: x per-property factors
    assert result["energy"] is outputs["energy"]
    assert result["mtt::dos"] is outputs["mtt::dos"]
    only_pt = fitted(systems, outputs, use_per_property_scales=False)
    full = fitted(systems, outputs)
    for b in range(3):
        torch.testing.assert_close(
            full["mtt::multi"].block_by_id(b).values,
            only_pt["mtt::multi"].block_by_id(b).values
            / outputs["mtt::multi"].block_by_id(b).values
            * result["mtt::multi"].block_by_id(b).values,
            equal_nan=True,
        )


def test_forward_unknown_atom_type_gets_one(fitted):
    t = _tmap(torch.tensor([[2.0]]), [[0, 0]], ("system", "atom"))
    out = fitted([_system([53])], {"mtt::charge": t}, remove=True)
    assert out["mtt::charge"].block_by_id(0).values.item() == 2.0


# -- fixed scales ---------------------------------------------------------------------------
def test_fixed_scales(data):
    scaler = Scaler(TYPES, layouts(ALL, DATA_TYPES))
    for batch in data:
        scaler.accumulate(*batch)
    scaler.fit()
    fitted_pp = scaler.per_property_scales["mtt::multi"].block_by_id(1).values.clone()
    fitted_charge = _by_type(scaler.scales["mtt::charge"])
    scaler.fit(fixed_scales={"energy": 2.5, "mtt::charge": {6: 0.5}, "mtt::multi": "3.0"})
    assert scaler.scales["energy"].block_by_id(0).values.item() == 2.5
    charge = _by_type(scaler.scales["mtt::charge"])
    assert charge[6].item() == 0.5
    torch.testing.assert_close(charge[1], fitted_charge[1])
    torch.testing.assert_close(
        scaler.per_property_scales["mtt::multi"].block_by_id(1).values, fitted_pp
    )
    torch.testing.assert_close(scaler.scales["mtt::multi"].block_by_id(1).values, 3.0 * fitted_pp)
    scaler.fit(fixed_scales={"mtt::charge": [1.0, 2.0, 3.0, 4.0]})
    assert scaler.scales["mtt::charge"].block_by_id(0).values[:, 0].tolist() == [1, 2, 3, 4]
    with pytest.raises(ValueError, match=r"fixed_scales\.energy: per-type"):
        scaler.fit(fixed_scales={"energy": {1: 1.0}})
    with pytest.raises(ValueError, match=r"fixed_scales\.mtt::charge\.6: expected a positive"):
        scaler.fit(fixed_scales={"mtt::charge": {6: -1.0}})
    with pytest.raises(ValueError, match="not among"):
        scaler.fit(fixed_scales={"mtt::charge": {5: 1.0}})
    with pytest.raises(ValueError, match="expected 4 values"):
        scaler.fit(fixed_scales={"mtt::charge": [1.0]})
    with pytest.raises(ValueError, match=r"fixed_scales: unknown target\(s\) \['nope'\]"):
        scaler.fit(fixed_scales={"nope": 1.0})


# -- state ----------------------------------------------------------------------------------
def test_state_dict_round_trip_and_to(fitted):
    fresh = Scaler(TYPES, layouts(ALL, DATA_TYPES), no_per_property_scales=["mtt::dos"])
    assert not bool(fresh.fitted)
    missing = fresh.load_state_dict(fitted.state_dict())
    assert missing.missing_keys == []
    assert missing.unexpected_keys == []
    assert bool(fresh.fitted)
    for name in ALL:
        for a, b in zip(fresh.scales[name].blocks(), fitted.scales[name].blocks(), strict=True):
            assert torch.equal(a.values, b.values)
    rebuilt = Scaler.from_construction(fitted.construction())
    rebuilt.load_state_dict(fitted.state_dict())
    assert torch.equal(
        rebuilt.scales["mtt::multi"].block_by_id(2).values,
        fitted.scales["mtt::multi"].block_by_id(2).values,
    )
    other = Scaler(DATA_TYPES, layouts(ALL, DATA_TYPES), no_per_property_scales=["mtt::dos"])
    with pytest.raises(ValueError, match=r"has atomic_types=\[1, 6, 8, 9\], this one \[1, 6, 8\]"):
        other.load_state_dict(fitted.state_dict(), strict=False)
    fewer = Scaler(TYPES, layouts(("energy",)))
    with pytest.raises(ValueError, match="built for targets"):
        fewer.load_state_dict(fitted.state_dict(), strict=False)
    low = fresh.to(torch.float32)
    assert low.scales["energy"].block_by_id(0).values.dtype == torch.float32
    assert low.type_seen.dtype == torch.bool


# -- errors ---------------------------------------------------------------------------------
def test_errors(data):
    systems, targets, _ = data[0]
    scaler = Scaler(DATA_TYPES, layouts(("energy",)))
    with pytest.raises(ValueError, match="unknown target 'mtt::charge'"):
        scaler.accumulate(systems, {"mtt::charge": targets["mtt::charge"]})
    with pytest.raises(ValueError, match=r"atomic types \[8\] found in the data are not among"):
        Scaler([1, 6], layouts(("energy",))).accumulate(systems, {"energy": targets["energy"]})
    bad = _tmap(torch.zeros(1, 1), [[0, 0]], ("structure", "atom"))
    with pytest.raises(ValueError, match="target 'x': unsupported sample layout"):
        Scaler([1], {"x": bad})
    multi = Scaler(DATA_TYPES, layouts(("mtt::multi",)))
    with pytest.raises(ValueError, match="mask 'mtt::multi_mask': 1 block"):
        multi.accumulate(
            systems,
            {"mtt::multi": targets["mtt::multi"]},
            {"mtt::multi_mask": targets["mtt::charge"]},
        )
    with pytest.raises(ValueError, match="expected 3 block"):
        multi.accumulate(systems, {"mtt::multi": targets["mtt::charge"]})
    with pytest.raises(ValueError, match=r"no_per_property_scales: unknown target\(s\)"):
        Scaler([1], layouts(("energy",)), no_per_property_scales=["dos"])
    with pytest.raises(ValueError, match="atomic_types: duplicate"):
        Scaler([1, 1], layouts(("energy",)))
    with pytest.raises(ValueError, match=r"outside 0\.\.118"):
        Scaler(None, layouts(("energy",))).accumulate(
            [_system([200])], {"energy": _tmap(torch.ones(1, 1), [[0]])}
        )
    ensemble = _tmap(torch.ones(2, 5), [[0], [1]])
    with pytest.raises(ValueError, match="positive multiple of 6"):
        Scaler(DATA_TYPES, layouts(("mtt::dos",)))(
            [_system([1]), _system([1])], {"mtt::aux::dos_ensemble": ensemble}
        )
    with pytest.raises(ValueError, match="output 'mtt::aux::multi_ensemble': expected 3 block"):
        Scaler(DATA_TYPES, layouts(("mtt::multi",)))(
            [_system([1]), _system([1])], {"mtt::aux::multi_ensemble": ensemble}
        )
