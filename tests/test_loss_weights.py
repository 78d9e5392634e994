"""Sample and per-type weights of loss terms (``sample_weights``, ``type_weights``).

Every weighted value is compared with a float64 reference written from the formulas with
loops over entries (``mean``: sum_i w_i l_i / sum_i w_i over the entries that count;
``sum``: sum_i w_i l_i), gradients with autograd through the same gathered entries.
"""

from __future__ import annotations

import copy
import math

import pytest
import torch
import yaml
from metatensor.torch import Labels, TensorBlock, TensorMap

from pl_mtt import LossModule, expand_loss_config, scaling
from pl_mtt.losses import create_loss
from pl_mtt.losses.weights import EntryWeights
from pl_mtt.registry import Param, register_loss_type, unregister_loss_type
from tests.scripts.losses_data import (
    atom_weights,
    map_like,
    multi_block_map,
    random_energy,
    random_mask,
    random_weights,
    structure_weights,
    systems_for,
    with_nans,
)
from tests.test_ensemble_losses import REFERENCES as ENSEMBLE_SCORES
from tests.test_ensemble_losses import ensemble_of
from tests.test_pointwise_losses import elementwise_reference

N_ATOMS = [3, 5, 2, 4]
TARGETS = {
    "energy": {"quantity": "energy", "forces": True, "stress": True},
    "mtt::multi": {"per_atom": True, "gradients": ["positions"]},
}
TYPE_WEIGHTS = {1: 0.5, 8: 3.0}  # type 6 unlisted: 1.0


# -- the loop reference ------------------------------------------------------------------
def term_entries(tensor_map: TensorMap, gradient: str | None):
    """Every entry of the term's blocks: (index in the concatenated flattened values,
    value, system, atom or None)."""
    offset = 0
    for k in range(len(tensor_map)):
        block = tensor_map.block_by_id(k)
        value_names, value_rows = block.samples.names, block.samples.values.tolist()
        term_block = block if gradient is None else block.gradient(gradient)
        names, rows = term_block.samples.names, term_block.samples.values.tolist()
        values = term_block.values.detach()
        per_row = values[0].numel() if len(values) else 0
        flat = values.reshape(len(rows), -1).tolist()
        for r, sample in enumerate(rows):
            columns = dict(zip(names, sample, strict=True))
            if "system" in columns:
                system = columns["system"]
            else:
                value_row = value_rows[columns["sample"]]
                system = dict(zip(value_names, value_row, strict=True))["system"]
            for e, value in enumerate(flat[r]):
                yield offset + r * per_row + e, value, system, columns.get("atom")
        offset += values.numel()


def flat_values(tensor_map: TensorMap, gradient: str | None) -> torch.Tensor:
    """The term's values, blocks flattened and concatenated (keeps autograd)."""
    blocks = tensor_map.blocks()
    if gradient is not None:
        blocks = [block.gradient(gradient) for block in blocks]
    return torch.cat([block.values.reshape(-1) for block in blocks])


def entry_weight(weights, index, system, atom, types, type_weights) -> float:
    """The weight of one entry from plain Python data: ``weights`` is None,
    ``("structure", {system: w})``, ``("atom", {(system, atom): w})`` or ``("entry",
    [w per flat index])``."""
    w = 1.0
    if weights is not None:
        form, data = weights
        if form == "structure":
            w *= data[system]
        elif form == "atom":
            w *= data[(system, atom)]
        else:
            w *= data[index]
    if type_weights:
        w *= type_weights.get(types[system][atom], 1.0)
    return w


def reference(
    kind,
    prediction,
    target,
    gradient=None,
    *,
    delta=1.0,
    reduction="mean",
    mask=None,
    weights=None,
    types=None,
    type_weights=None,
):
    """(value as a Python float from loops, the same as a differentiable torch scalar)."""
    mask_flat = None if mask is None else flat_values(mask, gradient).tolist()
    kept, targets, entry_weights = [], [], []
    numerator, denominator = 0.0, 0.0
    p_flat = flat_values(prediction, gradient)
    p_list = p_flat.detach().tolist()
    for index, value, system, atom in term_entries(target, gradient):
        if math.isnan(value) or (mask_flat is not None and mask_flat[index] == 0):
            continue
        w = entry_weight(weights, index, system, atom, types, type_weights)
        numerator += w * elementwise_reference(kind, p_list[index] - value, delta)
        denominator += w
        kept.append(index)
        targets.append(value)
        entry_weights.append(w)
    d = p_flat[kept] - torch.tensor(targets, dtype=p_flat.dtype)
    if kind == "mse":
        losses = d * d
    elif kind == "mae":
        losses = d.abs()
    else:
        losses = torch.where(d.abs() < delta, 0.5 * d * d, delta * (d.abs() - 0.5 * delta))
    total = (torch.tensor(entry_weights, dtype=p_flat.dtype) * losses).sum()
    if reduction == "sum":
        return numerator, total
    if denominator == 0:
        return 0.0, total * 0
    return numerator / denominator, total / denominator


def structure_data(values: torch.Tensor) -> tuple[str, dict]:
    return "structure", dict(enumerate(values.tolist()))


def atom_data(values: torch.Tensor, n_atoms: list[int]) -> tuple[str, dict]:
    pairs = [(s, a) for s, n in enumerate(n_atoms) for a in range(n)]
    return "atom", dict(zip(pairs, values.tolist(), strict=True))


def entry_data(weight_map: TensorMap, gradient: str | None) -> tuple[str, list]:
    return "entry", flat_values(weight_map, gradient).tolist()


# -- batches ------------------------------------------------------------------------------
def leaves_of(tensor_map):
    tensors = []
    for block in tensor_map.blocks():
        tensors.append(block.values)
        tensors.extend(g.values for _, g in block.gradients())
    return tensors


def batch(seed: int, *, masked: bool = False, nan_fraction: float = 0.2):
    """Predictions (leaves), targets with NaNs, masks, systems and every kind of weight
    map for the energy (forces, stress) and the per-atom two-block ``mtt::multi``."""
    generator = torch.Generator().manual_seed(seed)
    systems = systems_for(N_ATOMS, generator)
    types = [s.types.tolist() for s in systems]
    predictions = {
        "energy": random_energy(N_ATOMS, generator, requires_grad=True),
        "mtt::multi": multi_block_map(N_ATOMS, generator, requires_grad=True),
    }
    targets = {
        name: with_nans(
            random_energy(N_ATOMS, generator)
            if name == "energy"
            else multi_block_map(N_ATOMS, generator),
            generator,
            nan_fraction,
        )
        for name in predictions
    }
    per_structure = random_weights([len(N_ATOMS)], generator)
    per_atom = random_weights([sum(N_ATOMS)], generator)
    extra = {
        # rows not in system order: the weights are placed by their system column
        "w_structure": structure_weights(per_structure, order=[2, 0, 3, 1]),
        "w_atom": atom_weights(per_atom, N_ATOMS),
        "w_entry_energy": map_like(targets["energy"], lambda v: random_weights(v.shape, generator)),
        "w_entry_multi": map_like(
            targets["mtt::multi"], lambda v: random_weights(v.shape, generator)
        ),
    }
    if masked:
        for name in predictions:
            extra[f"{name}_mask"] = random_mask(targets[name], generator)
    data = {
        "w_structure": structure_data(per_structure),
        "w_atom": atom_data(per_atom, N_ATOMS),
    }
    return predictions, targets, extra, systems, types, data


# (kind, reductions of energy/forces/stress/multi, masked, weights per term)
CASES = {
    "per structure, mse, type weights on forces and per-atom rows": (
        "mse",
        ("mean", "mean", "sum", "mean"),
        False,
        {
            "energy": ("w_structure", None),
            "positions": ("w_structure", TYPE_WEIGHTS),
            "strain": ("w_structure", None),
            "multi": ("w_structure", TYPE_WEIGHTS),
            "multi/positions": (None, TYPE_WEIGHTS),
        },
    ),
    "per atom, masked mae": (
        "mae",
        ("sum", "mean", "mean", "sum"),
        True,
        {
            "energy": ("w_structure", None),
            "positions": ("w_atom", TYPE_WEIGHTS),
            "strain": (None, None),
            "multi": ("w_atom", None),
            "multi/positions": ("w_atom", TYPE_WEIGHTS),
        },
    ),
    "per entry, huber": (
        "huber",
        ("mean", "sum", "mean", "mean"),
        False,
        {
            "energy": ("w_entry_energy", None),
            "positions": ("w_entry_energy", TYPE_WEIGHTS),
            "strain": ("w_entry_energy", None),
            "multi": ("w_entry_multi", TYPE_WEIGHTS),
            "multi/positions": ("w_entry_multi", None),
        },
    ),
    "per entry, masked mse": (
        "mse",
        ("mean", "mean", "sum", "mean"),
        True,
        {
            "energy": ("w_entry_energy", None),
            "positions": ("w_entry_energy", None),
            "strain": ("w_structure", None),
            "multi": ("w_entry_multi", None),
            "multi/positions": ("w_structure", TYPE_WEIGHTS),
        },
    ),
}


def _term(kind, masked, reduction, weighting, delta=0.7):
    key, type_weights = weighting
    term = {"type": f"masked_{kind}" if masked else kind, "reduction": reduction}
    if kind == "huber":
        term["delta"] = delta
    if key is not None:
        term["sample_weights"] = key
    if type_weights is not None:
        term["type_weights"] = type_weights
    return term


def case_config(case: str) -> dict:
    kind, reductions, masked, weighting = CASES[case]
    energy = _term(kind, masked, reductions[0], weighting["energy"])
    energy["forces"] = _term(kind, masked, reductions[1], weighting["positions"])
    energy["stress"] = _term(kind, masked, reductions[2], weighting["strain"])
    multi = _term(kind, masked, reductions[3], weighting["multi"])
    multi["gradients"] = {"positions": _term(kind, masked, "mean", weighting["multi/positions"])}
    return {"energy": energy, "mtt::multi": multi}


def case_references(case, predictions, targets, extra, types, data):
    """Term name -> (reference value, differentiable reference) of a case."""
    kind, _, masked, _ = CASES[case]
    config = expand_loss_config(case_config(case), TARGETS)
    terms = {
        "energy": ("energy", None, config["energy"]),
        "energy/forces": ("energy", "positions", config["energy"]["gradients"]["positions"]),
        "energy/stress": ("energy", "strain", config["energy"]["gradients"]["strain"]),
        "mtt::multi": ("mtt::multi", None, config["mtt::multi"]),
        "mtt::multi/positions": (
            "mtt::multi",
            "positions",
            config["mtt::multi"]["gradients"]["positions"],
        ),
    }
    result = {}
    for name, (target, gradient, term) in terms.items():
        key = term.get("sample_weights")
        weights = None
        if key is not None:
            weights = data[key] if key in data else entry_data(extra[key], gradient)
        result[name] = reference(
            kind,
            predictions[target],
            targets[target],
            gradient,
            delta=term.get("delta", 1.0),
            reduction=term["reduction"],
            mask=extra[f"{target}_mask"] if masked else None,
            weights=weights,
            types=types,
            type_weights=term.get("type_weights"),
        )
    return result, config


@pytest.mark.parametrize("case", list(CASES))
def test_weighted_pointwise_terms_match_the_loop_reference(case):
    predictions, targets, extra, systems, types, data = batch(11, masked=CASES[case][2])
    module = LossModule(case_config(case), TARGETS)
    references, config = case_references(case, predictions, targets, extra, types, data)
    total = module(predictions, targets, extra, systems)
    values = module.last_values
    assert set(values) == set(references)
    for name, (expected, _) in references.items():
        assert values[name].item() == pytest.approx(expected, rel=1e-10, abs=1e-12), name
    weights = {name: term.weight for name, term in module.terms.items()}
    expected_total = sum(weights[name] * ref for name, (_, ref) in references.items())
    assert total.item() == pytest.approx(expected_total.item(), rel=1e-10)
    # gradients: the custom backward against autograd through the gathered entries
    leaves = [t for name in predictions for t in leaves_of(predictions[name])]
    got = torch.autograd.grad(total, leaves)
    expected = torch.autograd.grad(expected_total, leaves)
    for a, b in zip(got, expected, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-12)
    # each term alone (create_loss, not fused) gives the same value
    for name, term in module.terms.items():
        alone = create_loss(
            config[term.target]["type"] if term.gradient is None else _type_of(config, term),
            name=term.target,
            gradient=term.gradient,
            **_params(config, term),
        )
        value = alone(predictions, targets, extra, systems)
        assert value.item() == pytest.approx(references[name][0], rel=1e-10, abs=1e-12), name


def _spec(config, term):
    entry = config[term.target]
    return entry if term.gradient is None else entry["gradients"][term.gradient]


def _type_of(config, term):
    return _spec(config, term)["type"]


def _params(config, term):
    return {k: v for k, v in _spec(config, term).items() if k not in ("type", "gradients")}


def test_hand_computed_weighted_mean_and_sum():
    """Two structures with energies off by 1 and 2 (mse 1 and 4), weights 3 and 1:
    mean (3 * 1 + 1 * 4) / 4 = 1.75, sum 7; a NaN target counts for neither."""
    target = {"energy": random_energy([1, 1], torch.Generator(), gradients=False)}
    block = target["energy"].block_by_id(0)
    prediction = {"energy": map_like(target["energy"], lambda v: v + torch.tensor([[1.0], [2.0]]))}
    extra = {"w": structure_weights(torch.tensor([3.0, 1.0]))}
    targets = {"energy": {"quantity": "energy"}}
    mean = LossModule({"energy": {"sample_weights": "w"}}, targets)
    summed = LossModule({"energy": {"sample_weights": "w", "reduction": "sum"}}, targets)
    assert mean(prediction, target, extra).item() == pytest.approx(1.75, rel=1e-15)
    assert summed(prediction, target, extra).item() == pytest.approx(7.0, rel=1e-15)
    with_nan = TensorMap(
        target["energy"].keys,
        [
            TensorBlock(
                torch.tensor([[block.values[0, 0].item()], [math.nan]], dtype=torch.float64),
                block.samples,
                block.components,
                block.properties,
            )
        ],
    )
    assert mean(prediction, {"energy": with_nan}, extra).item() == pytest.approx(1.0, rel=1e-15)
    zero = {"w": structure_weights(torch.tensor([0.0, 0.0]))}  # nothing counts: an exact 0
    assert mean(prediction, target, zero).item() == 0.0


def test_weights_below_one_are_not_clamped():
    """The denominator is the sum of the weights even when it is below 1."""
    target = {"energy": random_energy([1, 1], torch.Generator().manual_seed(3), gradients=False)}
    prediction = {"energy": map_like(target["energy"], lambda v: v + 2.0)}
    extra = {"w": structure_weights(torch.tensor([0.1, 0.2]))}
    module = LossModule({"energy": {"sample_weights": "w"}}, {"energy": {}})
    assert module(prediction, target, extra).item() == pytest.approx(4.0, rel=1e-14)
    assert module.compute()["energy"].item() == pytest.approx(4.0, rel=1e-14)


# -- uniform weights change nothing -------------------------------------------------------
UNIFORM_LOSS = {
    "energy": {"type": "mse", "forces": "mae", "stress": {"type": "huber", "delta": 0.4}},
    "mtt::multi": {"type": "mse", "gradients": {"positions": "huber"}},
}


def _weighted(loss, key, type_weights=None):
    """``loss`` with ``sample_weights: key`` (and ``type_weights`` on per-atom rows) on
    every term."""
    loss = copy.deepcopy(loss)
    for name, entry in loss.items():
        terms = [entry]
        for gradient_key in ("forces", "stress"):
            if gradient_key in entry:
                entry[gradient_key] = (
                    {"type": entry[gradient_key]}
                    if isinstance(entry[gradient_key], str)
                    else entry[gradient_key]
                )
                terms.append(entry[gradient_key])
        for gradient, term in entry.get("gradients", {}).items():
            entry["gradients"][gradient] = {"type": term} if isinstance(term, str) else term
            terms.append(entry["gradients"][gradient])
        for index, term in enumerate(terms):
            term["sample_weights"] = key
            per_atom_rows = name == "mtt::multi" or (name == "energy" and index == 1)
            if type_weights is not None and per_atom_rows:
                term["type_weights"] = type_weights
    return loss


@pytest.mark.parametrize("value", [1.0, 0.25, 4.0])
def test_uniform_weights_equal_the_unweighted_loss_exactly(value):
    """Weights of 1 (sample and type weights), and of 0.25 or 4 (exact scalings), give
    bitwise the unweighted total, values, epoch aggregates and gradients."""
    predictions, targets, extra, systems, _, _ = batch(5)
    extra["uniform"] = structure_weights(torch.full((len(N_ATOMS),), value, dtype=torch.float64))
    type_weights = {1: 1.0, 6: 1.0, 8: 1.0} if value == 1.0 else None
    plain = LossModule(UNIFORM_LOSS, TARGETS)
    weighted = LossModule(_weighted(UNIFORM_LOSS, "uniform", type_weights), TARGETS)
    leaves = [t for name in predictions for t in leaves_of(predictions[name])]
    expected = plain(predictions, targets, extra, systems)
    got = weighted(predictions, targets, extra, systems)
    assert torch.equal(got, expected)
    for name, value_ in plain.last_values.items():
        assert torch.equal(weighted.last_values[name], value_), name
    for name, value_ in plain.compute().items():
        assert torch.equal(weighted.compute()[name], value_), name
    for a, b in zip(
        torch.autograd.grad(got, leaves), torch.autograd.grad(expected, leaves), strict=True
    ):
        assert torch.equal(a, b)


@pytest.mark.parametrize("value", [1.0, 0.25])
def test_uniform_weights_on_the_fused_path_equal_the_unweighted_loss_exactly(value):
    """The same on prepare_for_loss's mappings (the fused path after the first batch)."""
    from tests.test_lean_step import OPTIONS, _data, _fitted, _Holder, _raw

    data = _data()
    scaler, composition = _fitted(data)
    holder = _Holder(scaler, composition)
    plain_config = {"energy": {"type": "mse", "forces": "mae", "stress": "huber"}}
    plain = LossModule(plain_config, OPTIONS, scaler)
    types = {1: 1.0, 6: 1.0, 8: 1.0} if value == 1.0 else None
    weighted = LossModule(_weighted(plain_config, "uniform", types), OPTIONS, scaler)
    for index, (systems, targets, extra) in enumerate(data):
        extra = {**extra, "uniform": structure_weights(torch.full((len(systems),), value))}
        raw = _raw(targets, index)
        leaves = [t for m in raw.values() for t in leaves_of(m)]
        results = []
        for module in (plain, weighted):
            predictions, loss_targets = scaling.prepare_for_loss(holder, systems, raw, targets)
            results.append(module(predictions, loss_targets, extra, systems))
            assert ("energy" in loss_targets.batch.residuals) == (index > 0)
        assert torch.equal(results[1], results[0])
        for a, b in zip(
            torch.autograd.grad(results[1], leaves, allow_unused=True),
            torch.autograd.grad(results[0], leaves, allow_unused=True),
            strict=True,
        ):
            assert (a is None and b is None) or torch.equal(a, b)
    for name, value_ in plain.compute().items():
        assert torch.equal(weighted.compute()[name], value_), name


def test_a_constant_weight_changes_the_mean_only_by_rounding():
    predictions, targets, extra, systems, _, _ = batch(6)
    extra["uniform"] = structure_weights(torch.full((len(N_ATOMS),), 0.3, dtype=torch.float64))
    plain = LossModule(UNIFORM_LOSS, TARGETS)(predictions, targets, extra, systems)
    weighted = LossModule(_weighted(UNIFORM_LOSS, "uniform"), TARGETS)
    torch.testing.assert_close(
        weighted(predictions, targets, extra, systems), plain, rtol=1e-14, atol=0
    )


# -- ensembles and per-structure losses ------------------------------------------------------
@pytest.mark.parametrize("type_", ["empirical_crps_ensemble", "gaussian_nll_ensemble"])
def test_weighted_ensemble_terms_match_the_loop_reference(type_):
    predictions, targets, extra, systems, types, data = batch(21)
    generator = torch.Generator().manual_seed(4)
    ensembles = {
        "energy_ensemble": ensemble_of(predictions["energy"], 3, generator),
        "mtt::aux::multi_ensemble": ensemble_of(predictions["mtt::multi"], 3, generator),
    }
    loss = {
        "energy": {
            "type": type_,
            "sample_weights": "w_structure",
            "forces": {"type": type_, "sample_weights": "w_atom", "type_weights": TYPE_WEIGHTS},
            "stress": {"type": type_, "reduction": "sum", "sample_weights": "w_entry_energy"},
        },
        "mtt::multi": {
            "type": type_,
            "sample_weights": "w_entry_multi",
            "type_weights": TYPE_WEIGHTS,
            "gradients": {"positions": {"type": type_, "sample_weights": "w_structure"}},
        },
    }
    module = LossModule(loss, TARGETS)
    module(ensembles, targets, extra, systems)
    score = ENSEMBLE_SCORES[type_]
    expected = {
        "energy": ("energy", None, "w_structure", None, "mean"),
        "energy/forces": ("energy", "positions", "w_atom", TYPE_WEIGHTS, "mean"),
        "energy/stress": ("energy", "strain", "w_entry_energy", None, "sum"),
        "mtt::multi": ("mtt::multi", None, "w_entry_multi", TYPE_WEIGHTS, "mean"),
        "mtt::multi/positions": ("mtt::multi", "positions", "w_structure", None, "mean"),
    }
    for name, (target, gradient, key, type_weights, reduction) in expected.items():
        output = "energy_ensemble" if target == "energy" else "mtt::aux::multi_ensemble"
        weights = data[key] if key in data else entry_data(extra[key], gradient)
        members = _members_by_entry(ensembles[output], targets[target], gradient)
        numerator = denominator = 0.0
        for index, value, system, atom in term_entries(targets[target], gradient):
            if math.isnan(value):
                continue
            w = entry_weight(weights, index, system, atom, types, type_weights)
            numerator += w * score(members[index], value)
            denominator += w
        want = numerator if reduction == "sum" else numerator / denominator
        assert module.last_values[name].item() == pytest.approx(want, rel=1e-10), name


def _members_by_entry(ensemble, target, gradient):
    """Per flat entry of the target's term blocks, the list of its members."""
    members = []
    for k in range(len(target)):
        e_block, t_block = ensemble.block_by_id(k), target.block_by_id(k)
        if gradient is not None:
            e_block, t_block = e_block.gradient(gradient), t_block.gradient(gradient)
        n_properties = t_block.values.shape[-1]
        rows = e_block.values.detach().reshape(-1, e_block.values.shape[-1]).tolist()
        n_members = len(rows[0]) // n_properties
        for row in rows:
            for p in range(n_properties):
                members.append([row[m * n_properties + p] for m in range(n_members)])
    return members


@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
def test_weighted_dos_loss_weights_structures(reduction):
    """A loss of one value per structure: sum_s w_s L_s / sum_s w_s (``none``: w_s L_s),
    with the unweighted per-structure losses L_s of the same term."""
    generator = torch.Generator().manual_seed(2)
    n, extra_targets = 12, 3

    def profile(points):
        return TensorMap(
            Labels.single(),
            [
                TensorBlock(
                    torch.rand(4, points, generator=generator, dtype=torch.float64),
                    Labels(["system"], torch.arange(4, dtype=torch.int32).reshape(-1, 1)),
                    [],
                    Labels(["point"], torch.arange(points, dtype=torch.int32).reshape(-1, 1)),
                )
            ],
        )

    prediction, target = profile(n + extra_targets), profile(n)
    mask = map_like(target, lambda v: (v > 0.2).to(v.dtype))
    w = torch.tensor([2.0, 0.0, 0.5, 1.0], dtype=torch.float64)
    extra = {"mtt::dos_mask": mask, "w": structure_weights(w, order=[3, 1, 0, 2])}
    params = {"extra_targets": extra_targets}
    plain = create_loss("masked_dos", name="mtt::dos", reduction="none", **params)
    weighted = create_loss(
        "masked_dos", name="mtt::dos", reduction=reduction, sample_weights="w", **params
    )
    per_structure = plain({"mtt::dos": prediction}, {"mtt::dos": target}, extra).tolist()
    got = weighted({"mtt::dos": prediction}, {"mtt::dos": target}, extra)
    weighted_losses = [ws * loss for ws, loss in zip(w.tolist(), per_structure, strict=True)]
    if reduction == "none":
        assert got.tolist() == pytest.approx(weighted_losses, rel=1e-12)
    elif reduction == "sum":
        assert got.item() == pytest.approx(sum(weighted_losses), rel=1e-12)
    else:
        assert got.item() == pytest.approx(sum(weighted_losses) / w.sum().item(), rel=1e-12)
    per_entry = {"mtt::dos_mask": mask, "w": map_like(target, torch.ones_like)}
    with pytest.raises(ValueError, match=r"must have one value per structure.*per-entry"):
        weighted({"mtt::dos": prediction}, {"mtt::dos": target}, per_entry)


# -- the fused path of the lean step ----------------------------------------------------------
def test_fused_and_general_paths_give_the_same_weighted_loss():
    """With prepare_for_loss's mappings (scaler and baseline), weighted energy, force and
    stress terms run fused after the first batch and equal the general path on the
    eager dicts, values and gradients; the metrics stay unweighted."""
    from tests.test_lean_step import (
        OPTIONS,
        _data,
        _fitted,
        _Holder,
        _metrics,
        _raw,
        assert_same_gradients,
    )

    data = _data()
    scaler, composition = _fitted(data)
    holder = _Holder(scaler, composition)
    loss = {
        "energy": {
            "type": "huber",
            "delta": 0.3,
            "sample_weights": "w",
            "forces": {"type": "mse", "sample_weights": "w", "type_weights": {1: 0.3, 8: 2.0}},
            "stress": {"type": "mae", "reduction": "sum", "sample_weights": "w"},
        },
        "mtt::charge": {"type": "mse", "type_weights": {6: 4.0}},
    }
    fused_loss = LossModule(loss, OPTIONS, scaler)
    eager_loss = copy.deepcopy(fused_loss)
    plain_loss = LossModule(
        {"energy": {"type": "huber", "delta": 0.3, "forces": "mse", "stress": "mae"}},
        OPTIONS,
        scaler,
    )
    fused_metrics, plain_metrics = _metrics(), _metrics()
    generator = torch.Generator().manual_seed(8)
    for index, (systems, targets, extra) in enumerate(data):
        extra = {**extra, "w": structure_weights(random_weights([len(systems)], generator))}
        raw = _raw(targets, index)
        leaves = [t for m in raw.values() for t in leaves_of(m)]
        predictions, loss_targets = scaling.prepare_for_loss(holder, systems, raw, targets)
        fused = fused_loss(predictions, loss_targets, extra, systems)
        assert ("energy" in loss_targets.batch.residuals) == (index > 0)  # fused after one
        fused_metrics.update(
            *scaling.for_metrics(systems, predictions, loss_targets, scaler), systems
        )
        eager_p = scaling.predictions_for_loss(systems, raw, scaler)
        eager_t = scaling.targets_for_loss(systems, targets, scaler, composition)
        eager = eager_loss(eager_p, eager_t, extra, systems)
        torch.testing.assert_close(fused, eager, rtol=1e-12, atol=0)
        assert_same_gradients(fused, eager, leaves, rtol=1e-12)
        for name, value in eager_loss.last_values.items():
            torch.testing.assert_close(fused_loss.last_values[name], value, rtol=1e-12, atol=0)
        predictions, loss_targets = scaling.prepare_for_loss(holder, systems, raw, targets)
        plain_loss(predictions, loss_targets, extra, systems)
        plain_metrics.update(
            *scaling.for_metrics(systems, predictions, loss_targets, scaler), systems
        )
    for name, value in eager_loss.compute().items():
        torch.testing.assert_close(fused_loss.compute()[name], value, rtol=1e-12, atol=0)
    # the metrics read the same residuals, whatever the loss's weights
    plain_values = plain_metrics.compute()
    for key, value in fused_metrics.compute().items():
        torch.testing.assert_close(value, plain_values[key], rtol=1e-12, atol=0, msg=key)


# -- epoch aggregates -----------------------------------------------------------------------
def test_epoch_aggregates_are_weighted_sums_over_the_epoch():
    """compute(): mean terms sum_batches sum w l / sum_batches sum w; sum terms the sum over
    the batches / number of batches; global_mean in one process changes nothing."""
    case = "per structure, mse, type weights on forces and per-atom rows"
    module = LossModule(case_config(case), TARGETS)
    global_module = LossModule(case_config(case), TARGETS, global_mean=True)
    numerators, denominators, sums = {}, {}, {}
    config = expand_loss_config(case_config(case), TARGETS)
    for seed in (1, 2, 3):
        predictions, targets, extra, systems, types, data = batch(seed)
        total = module(predictions, targets, extra, systems)
        assert torch.equal(global_module(predictions, targets, extra, systems), total)
        for name, term in module.terms.items():
            spec = _spec(config, term)
            key = spec.get("sample_weights")
            weights = None
            if key is not None:
                weights = data[key] if key in data else entry_data(extra[key], term.gradient)
            numerator, denominator = _numerator_denominator(
                predictions[term.target],
                targets[term.target],
                term.gradient,
                weights,
                types,
                spec.get("type_weights"),
            )
            numerators[name] = numerators.get(name, 0.0) + numerator
            denominators[name] = denominators.get(name, 0.0) + denominator
            sums[name] = sums.get(name, 0.0) + numerator
    epoch = module.compute()
    for name, term in module.terms.items():
        if term.reduction == "sum":
            expected = sums[name] / 3
        else:
            expected = numerators[name] / denominators[name]
        assert epoch[name].item() == pytest.approx(expected, rel=1e-10), name
        assert module.aggregate.counts[module.term_names.index(name)].item() == pytest.approx(
            denominators[name], rel=1e-12
        )


def _numerator_denominator(prediction, target, gradient, weights, types, type_weights):
    p = flat_values(prediction, gradient).detach().tolist()
    numerator = denominator = 0.0
    for index, value, system, atom in term_entries(target, gradient):
        if math.isnan(value):
            continue
        w = entry_weight(weights, index, system, atom, types, type_weights)
        numerator += w * (p[index] - value) ** 2
        denominator += w
    return numerator, denominator


# -- configuration ------------------------------------------------------------------------
def test_yaml_config_with_integer_keys_and_symbols():
    config = yaml.safe_load(
        """
        energy:
          type: mse
          sample_weights: config_weight
          forces:
            type: mae
            sample_weights: config_weight
            type_weights: {29: 1.0, 79: 2.0}
          stress: {type: mse, weight: 0.1}
        """
    )
    targets = {"energy": {"quantity": "energy", "forces": True, "stress": True}}
    expanded = expand_loss_config(config, targets)
    assert expanded["energy"]["sample_weights"] == "config_weight"
    forces = expanded["energy"]["gradients"]["positions"]
    assert forces == {
        "type": "mae",
        "weight": 1.0,
        "reduction": "mean",
        "sample_weights": "config_weight",
        "type_weights": {29: 1.0, 79: 2.0},
    }
    stress = expanded["energy"]["gradients"]["strain"]
    assert "sample_weights" not in stress  # only when given
    assert "type_weights" not in stress
    symbols = {"energy": {"forces": {"type_weights": {"Cu": 1, "Au": "2.0", "8": 3}}}}
    got = expand_loss_config(symbols, targets)["energy"]["gradients"]["positions"]
    assert got["type_weights"] == {8: 3.0, 29: 1.0, 79: 2.0}
    nulls = {"energy": {"sample_weights": None, "forces": {"type_weights": None}}}
    assert expand_loss_config(nulls, targets) == expand_loss_config("mse", targets)


def test_hydra_override_of_type_weights_composes():
    from hydra import compose, initialize_config_dir

    from pl_mtt.training.app import config_dir
    from pl_mtt.training.schema import register_configs

    register_configs()
    with initialize_config_dir(config_dir=config_dir(), version_base="1.3"):
        cfg = compose(
            config_name="config",
            overrides=[
                "loss.energy.forces.type_weights={29: 1.0, 79: 2.0}",
                "loss.energy.sample_weights=config_weight",
            ],
        )
    targets = {"energy": {"quantity": "energy", "forces": True, "stress": True}}
    expanded = expand_loss_config(cfg.loss, targets)
    assert expanded["energy"]["gradients"]["positions"]["type_weights"] == {29: 1.0, 79: 2.0}
    assert expanded["energy"]["sample_weights"] == "config_weight"


@pytest.mark.parametrize(
    ("loss", "targets", "message"),
    [
        (
            {"energy": {"type_weights": {29: 2.0}}},
            {"energy": {"quantity": "energy", "forces": True, "per_atom": False}},
            r"^loss\.energy\.type_weights: target 'energy' has one entry per structure "
            r"\(per_atom: false\); type weights apply to per-atom entries \(forces, per-atom "
            r"targets\) \(e\.g\. loss\.energy\.forces\.type_weights\)$",
        ),
        (
            {"energy": {"stress": {"type_weights": {29: 2.0}}}},
            {"energy": {"quantity": "energy", "stress": True}},
            r"^loss\.energy\.stress\.type_weights: the strain gradient",
        ),
        (
            {"mtt::dos": {"type": "masked_dos", "extra_targets": 2, "type_weights": {1: 2}}},
            {"mtt::dos": {}},
            r"^loss\.mtt::dos\.type_weights: loss type 'masked_dos' does not take "
            r"'type_weights' \(it has one loss per structure",
        ),
        (
            {"energy": {"forces": {"type_weights": {29: -1.0}}}},
            {"energy": {"quantity": "energy", "forces": True}},
            r"^loss\.energy\.forces\.type_weights: expected .*bad weight -1\.0 of type 29",
        ),
        (
            {"energy": {"forces": {"type_weights": {"Xy": 1.0}}}},
            {"energy": {"quantity": "energy", "forces": True}},
            r"bad atomic type 'Xy'",
        ),
        (
            {"energy": {"sample_weights": ""}},
            {"energy": {}},
            r"^loss\.energy\.sample_weights: expected the name of an extra_data entry",
        ),
    ],
)
def test_config_errors_name_the_key(loss, targets, message):
    with pytest.raises(ValueError, match=message):
        expand_loss_config(loss, targets)


def test_user_loss_types_take_weights_only_when_they_declare_them():
    @register_loss_type("weightless", params={"scale": Param(1.0, "positive_float")})
    def weightless(**kwargs):
        return create_loss("mse", **{k: v for k, v in kwargs.items() if k != "scale"})

    try:
        with pytest.raises(ValueError, match=r"loss type 'weightless' does not take"):
            expand_loss_config(
                {"energy": {"type": "weightless", "sample_weights": "w"}}, {"energy": {}}
            )
        with pytest.raises(ValueError, match=r"does not take 'sample_weights'"):
            create_loss("weightless", name="energy", sample_weights="w")
    finally:
        unregister_loss_type("weightless")


def test_schedule_keeps_weights_when_the_type_changes():
    from pl_mtt.config import merge_loss_config

    base = {"energy": {"forces": {"type": "mse", "sample_weights": "w", "type_weights": {1: 2}}}}
    targets = {"energy": {"quantity": "energy", "forces": True}}
    merged = merge_loss_config(base, {"energy": {"forces": "mae"}}, targets)
    forces = merged["energy"]["gradients"]["positions"]
    assert forces["type"] == "mae"
    assert forces["sample_weights"] == "w"
    assert forces["type_weights"] == {1: 2.0}
    cleared = merge_loss_config(base, {"energy": {"forces": {"sample_weights": None}}}, targets)
    assert "sample_weights" not in cleared["energy"]["gradients"]["positions"]


# -- errors at run time -----------------------------------------------------------------------
def _energy_batch(weights: torch.Tensor):
    generator = torch.Generator().manual_seed(0)
    n_atoms = [2, 3]
    systems = systems_for(n_atoms, generator)
    predictions = {"energy": random_energy(n_atoms, generator)}
    targets = {"energy": random_energy(n_atoms, generator)}
    return predictions, targets, {"w": structure_weights(weights)}, systems


@pytest.mark.parametrize("bad", [-1.0, math.nan, math.inf])
def test_negative_nan_or_infinite_weights_are_errors(bad):
    predictions, targets, extra, systems = _energy_batch(torch.tensor([1.0, bad]))
    module = LossModule({"energy": {"forces": {"sample_weights": "w"}}}, TARGETS)
    with pytest.raises(
        ValueError,
        match=r"^loss on gradient 'positions' of target 'energy': sample_weights "
        r"extra_data\['w'\] has negative, NaN or infinite values",
    ):
        module(predictions, targets, extra, systems)


def test_a_missing_extra_data_key_is_an_error_naming_it():
    predictions, targets, extra, systems = _energy_batch(torch.tensor([1.0, 2.0]))
    module = LossModule({"energy": {"sample_weights": "config_weight"}}, TARGETS)
    with pytest.raises(
        ValueError,
        match=r"^loss on target 'energy': sample_weights extra_data\['config_weight'\] is "
        r"missing: the batch's extra_data has no 'config_weight' \(available: \['w'\]\)",
    ):
        module(predictions, targets, extra, systems)
    with pytest.raises(ValueError, match=r"extra_data has no 'config_weight' \(available: \[\]\)"):
        module(predictions, targets, None, systems)


def test_weights_that_fit_no_form_and_rows_without_atoms_are_errors():
    predictions, targets, extra, systems = _energy_batch(torch.tensor([1.0, 2.0]))
    extra["w_atom"] = atom_weights(torch.ones(5, dtype=torch.float64), [2, 3])
    extra["two"] = random_energy([2, 3], torch.Generator(), n_properties=2, gradients=False)
    per_atom_on_energy = LossModule({"energy": {"sample_weights": "w_atom"}}, TARGETS)
    with pytest.raises(
        ValueError, match=r"rows of this term \(samples \['system'\]\) name no atom"
    ):
        per_atom_on_energy(predictions, targets, extra, systems)
    wrong = LossModule({"energy": {"sample_weights": "two"}}, TARGETS)
    with pytest.raises(ValueError, match=r"must have one value per structure .* got 1 block"):
        wrong(predictions, targets, extra, systems)
    # type weights on a target whose per_atom was not known when configured
    unknown = LossModule({"mtt::x": {"type_weights": {1: 2.0}}}, {"mtt::x": {}})
    with pytest.raises(ValueError, match=r"^loss on target 'mtt::x': type_weights weight the rows"):
        unknown({"mtt::x": predictions["energy"]}, {"mtt::x": targets["energy"]}, extra, systems)
    needs_systems = LossModule({"energy": {"forces": {"type_weights": {1: 2.0}}}}, TARGETS)
    with pytest.raises(ValueError, match=r"type_weights need the atomic types .* systems"):
        needs_systems(predictions, targets, extra)


def test_weights_on_an_accelerator_are_checked_without_a_host_read_per_call(monkeypatch):
    """Away from the CPU the flags of invalid weights stay on the device and are read
    every CHECK_EVERY calls and by compute(); the CPU path is forced through it here."""
    monkeypatch.setattr(EntryWeights, "HOST_DEVICES", ())
    monkeypatch.setattr(EntryWeights, "CHECK_EVERY", 3)
    good = _energy_batch(torch.tensor([1.0, 2.0]))
    bad = _energy_batch(torch.tensor([1.0, -2.0]))
    module = LossModule({"energy": {"sample_weights": "w"}}, TARGETS)
    module(*good)  # the first call reads the values on the host
    module(*bad)  # deferred
    module(*good)
    with pytest.raises(
        ValueError,
        match=r"^loss on target 'energy': sample_weights extra_data\['w'\] had negative, NaN "
        r"or infinite values in one of the last 2 calls",
    ):
        module.compute()
    module(*bad)
    module(*good)
    with pytest.raises(ValueError, match=r"in one of the last 3 calls"):
        module(*good)  # the third pending flag: read now
    module(*good)
    module.compute()  # nothing bad pending


# -- weights from the data: extxyz info/arrays keys, metatrain's disk formats, a real run ----
def cu_au_frames(n: int = 8) -> list:
    """4-atom Cu cells with some Au, labelled by EMT, with ``info["config_weight"]``
    (0 for every fourth structure) and ``arrays["atom_weight"]``."""
    import ase.build
    import numpy as np
    from ase.calculators.emt import EMT

    rng = np.random.default_rng(3)
    frames = []
    for index in range(n):
        atoms = ase.build.bulk("Cu", "fcc", a=3.6, cubic=True)
        atoms.numbers[rng.random(len(atoms)) < 0.4] = 79
        atoms.rattle(0.05, seed=index)
        atoms.calc = EMT()
        labelled = ase.Atoms(atoms.numbers, atoms.positions, cell=atoms.cell, pbc=True)
        labelled.info["energy"] = atoms.get_potential_energy()
        labelled.arrays["forces"] = atoms.get_forces()
        labelled.info["stress"] = atoms.get_stress()
        labelled.info["config_weight"] = 0.0 if index % 4 == 3 else float(rng.uniform(0.5, 3.0))
        labelled.arrays["atom_weight"] = rng.uniform(0.0, 2.0, size=len(atoms))
        frames.append(labelled)
    return frames


ENERGY = {"energy": {"quantity": "energy"}}
FILE_WEIGHTS = {"config_weight": {}, "atom_weight": {"key": "atom_weight"}}
FILE_LOSS = {
    "energy": {
        "sample_weights": "config_weight",
        "forces": {"type": "mae", "sample_weights": "atom_weight", "type_weights": {"Au": 2.5}},
        "stress": {"sample_weights": "config_weight"},
    }
}


def test_extxyz_info_and_arrays_keys_are_read_as_extra_data(tmp_path):
    import ase.io

    from pl_mtt.data import AtomisticDataset

    path = tmp_path / "train.xyz"
    ase.io.write(path, cu_au_frames())
    frames = ase.io.read(path, ":")  # the values as the file holds them
    dataset = AtomisticDataset.from_file(path, ENERGY, FILE_WEIGHTS)
    for index, atoms in enumerate(frames):
        _, _, extra = dataset[index]
        per_structure = extra["config_weight"].block_by_id(0)
        assert per_structure.samples.names == ["system"]
        assert per_structure.values.tolist() == [[atoms.info["config_weight"]]]
        per_atom = extra["atom_weight"].block_by_id(0)
        assert per_atom.samples.names == ["system", "atom"]
        assert per_atom.values[:, 0].tolist() == atoms.arrays["atom_weight"].tolist()
    del frames[5].info["config_weight"]
    ase.io.write(path, frames)
    with pytest.raises(
        ValueError,
        match=rf"^extra_data\.config_weight: key 'config_weight' not found in structure 5 of "
        rf"'{re_escape(path)}' \(available: info keys",
    ):
        AtomisticDataset.from_file(path, ENERGY, FILE_WEIGHTS)
    with pytest.raises(ValueError, match=r"^extra_data\.w\.reader: read from"):
        AtomisticDataset.from_file(path, ENERGY, {"w": {"key": "energy", "reader": "metatensor"}})


def re_escape(path) -> str:
    import re

    return re.escape(str(path))


def _batch_loss(dataset, loss=FILE_LOSS):
    from pl_mtt.data import collate

    systems, targets, extra = collate([dataset[i] for i in range(len(dataset))])
    predictions = {"energy": map_like(targets["energy"], lambda v: v * 0.9 + 0.05)}
    module = LossModule(loss, dataset.target_options)
    module(predictions, targets, extra, systems)
    return module.last_values


@pytest.mark.parametrize("suffix", [".zip", "_memmap"])
def test_disk_formats_carry_the_weights_of_the_extxyz(tmp_path, suffix):
    """The weights written into a zip or a directory with the structures are read back
    by key and give the same weighted losses as the extxyz they came from."""
    import ase.io

    from pl_mtt.data import AtomisticDataset, open_dataset, write_dataset

    path = tmp_path / "train.xyz"
    ase.io.write(path, cu_au_frames())
    dataset = AtomisticDataset.from_file(path, ENERGY, FILE_WEIGHTS)
    disk = tmp_path / f"train{suffix}"
    if suffix != ".zip":
        disk.mkdir()
    extra_options = {"config_weight": {}, "atom_weight": {"per_atom": True}}
    write_dataset(disk, dataset, extra_data_options=extra_options)
    targets = {"energy": {"quantity": "energy", "forces": True, "stress": True}}
    read = {"config_weight": {"key": "config_weight"}, "atom_weight": {"per_atom": True}}
    reopened = open_dataset(disk, targets, read)
    expected = _batch_loss(dataset)
    for name, value in _batch_loss(reopened).items():
        # a directory stores float32 (exact for the weights of this file only to 1e-7)
        tolerance = 0 if suffix == ".zip" else 1e-6
        torch.testing.assert_close(value, expected[name], rtol=tolerance, atol=0, msg=name)


def test_real_training_run_applies_the_weights_of_the_extxyz(tmp_path):
    """A real Trainer run (weights from extxyz info and arrays keys, lr 0 so that the
    model is the same throughout): the logged epoch losses of training and validation
    equal the loop reference over the prepared batches (sum w l / sum w)."""
    import ase.io
    import lightning.pytorch as pl  # noqa: F401

    from pl_mtt import AtomisticTask, ScalerCallback
    from pl_mtt.data import AtomisticDataModule, collate
    from pl_mtt.models import RadialMLP
    from tests.conftest import quiet_trainer

    path = tmp_path / "train.xyz"
    ase.io.write(path, cu_au_frames(12))
    data = AtomisticDataModule(
        path=str(path),
        targets=ENERGY,
        extra_data=FILE_WEIGHTS,
        batch_size=4,
        val_fraction=0.25,
        test_fraction=0.0,
    )
    data.setup()
    torch.manual_seed(0)
    task = AtomisticTask(RadialMLP(n_radial=4, hidden=[8]), FILE_LOSS, data.target_options, lr=0.0)
    trainer = quiet_trainer(max_epochs=1, callbacks=[ScalerCallback()], default_root_dir=tmp_path)
    trainer.fit(task, data)
    logged = trainer.callback_metrics
    config = expand_loss_config(FILE_LOSS, data.target_options)
    terms = {
        "energy": (None, config["energy"]),
        "energy/forces": ("positions", config["energy"]["gradients"]["positions"]),
        "energy/stress": ("strain", config["energy"]["gradients"]["strain"]),
    }
    for stage, dataset in (("train", data.train_dataset), ("val", data.val_dataset)):
        sums = {name: [0.0, 0.0] for name in terms}
        for start in range(0, len(dataset), 4):
            systems, targets, extra = collate(
                [dataset[i] for i in range(start, min(start + 4, len(dataset)))]
            )
            with torch.enable_grad():
                raw = task.model(systems)
            predictions, loss_targets = scaling.prepare_for_loss(task, systems, raw, targets)
            predictions, loss_targets = dict(predictions), dict(loss_targets)
            types = [s.types.tolist() for s in systems]
            for name, (gradient, spec) in terms.items():
                key = spec["sample_weights"]
                weights = (
                    structure_data(extra[key].block_by_id(0).values.reshape(-1))
                    if key == "config_weight"
                    else atom_data(
                        extra[key].block_by_id(0).values.reshape(-1),
                        [len(s) for s in systems],
                    )
                )
                p = flat_values(predictions["energy"], gradient).detach().tolist()
                for index, value, system, atom in term_entries(loss_targets["energy"], gradient):
                    if math.isnan(value):
                        continue
                    w = entry_weight(weights, index, system, atom, types, spec.get("type_weights"))
                    sums[name][0] += w * elementwise_reference(spec["type"], p[index] - value, 1.0)
                    sums[name][1] += w
        for name, (numerator, denominator) in sums.items():
            got = logged[f"{stage}/loss/{name}"].item()
            assert got == pytest.approx(numerator / denominator, rel=1e-9), (stage, name)


def test_the_app_reads_weights_from_the_file_and_checks_their_names(tmp_path, monkeypatch):
    """Hydra composition of both parameters with data.extra_data, through the app's own
    data reading (dry run); a sample_weights name that the data lacks is an error naming
    the loss key, before training."""
    import ase.io
    from hydra import compose, initialize_config_dir

    from pl_mtt.training.app import UserInputError, config_dir, run
    from pl_mtt.training.schema import register_configs

    path = tmp_path / "train.xyz"
    ase.io.write(path, cu_au_frames())
    register_configs()
    overrides = [
        f"data.path={path}",
        "+data.extra_data.config_weight={key: config_weight}",
        "loss.energy.sample_weights=config_weight",
        "loss.energy.forces.sample_weights=config_weight",
        "loss.energy.forces.type_weights={29: 1.0, 79: 2.0}",
        "dry_run=true",
    ]
    with initialize_config_dir(config_dir=config_dir(), version_base="1.3"):
        cfg = compose(config_name="config", overrides=overrides)
        wrong = compose(
            config_name="config",
            overrides=[*overrides[:-2], "loss.energy.stress.sample_weights=cw", "dry_run=true"],
        )
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr("pl_mtt.training.app.output_dir", lambda: tmp_path)
    monkeypatch.setattr("pl_mtt.training.app.command_line_overrides", lambda: overrides)
    expanded = run(cfg)["loss"]
    assert expanded["energy"]["sample_weights"] == "config_weight"
    forces = expanded["energy"]["gradients"]["positions"]
    assert forces["type_weights"] == {29: 1.0, 79: 2.0}
    with pytest.raises(
        UserInputError,
        match=r"^loss\.energy\.stress\.sample_weights: 'cw' is not an entry of "
        r"data\.extra_data \(entries: \['config_weight'\]\)",
    ):
        run(wrong)
