"""Pointwise losses (mse, mae, huber and masked variants) against a loop reference."""

from __future__ import annotations

import math

import pytest
import torch
from metatensor.torch import Labels, TensorBlock, TensorMap

from pl_mtt.losses import create_loss
from pl_mtt.losses.functional.pointwise import (
    pointwise_loss,
    pointwise_segment_sums,
    pointwise_sum_and_count,
    scaled_segment_sums,
)
from tests.scripts.losses_data import (
    energy_map,
    labels,
    map_like,
    multi_block_map,
    random_energy,
    random_mask,
    with_nans,
)

N_ATOMS = [3, 5, 2, 4]
KINDS = ["mse", "mae", "huber"]


# --- reference, written from the spec formulas with loops -------------------------------
def elementwise_reference(kind: str, d: float, delta: float) -> float:
    if kind == "mse":
        return d * d
    if kind == "mae":
        return abs(d)
    return 0.5 * d * d if abs(d) < delta else delta * (abs(d) - 0.5 * delta)


def reference(kind, prediction, target, mask=None, gradient=None, delta=1.0, reduction="mean"):
    """Loop over every entry of every block: skip NaN targets and zero mask entries."""
    total, count = 0.0, 0
    for i in range(len(target)):
        blocks = [prediction.block_by_id(i), target.block_by_id(i)]
        if mask is not None:
            blocks.append(mask.block_by_id(i))
        if gradient is not None:
            blocks = [block.gradient(gradient) for block in blocks]
        flat = [block.values.detach().reshape(-1).tolist() for block in blocks]
        for j in range(len(flat[1])):
            p, t = flat[0][j], flat[1][j]
            if math.isnan(t) or (mask is not None and flat[2][j] == 0):
                continue
            total += elementwise_reference(kind, p - t, delta)
            count += 1
    if reduction == "sum":
        return total
    return total / count if count else 0.0


def rebuild(tensor_map: TensorMap, tensors: list[torch.Tensor]) -> TensorMap:
    """``tensor_map``'s metadata with its values and gradient values taken from
    ``tensors`` in order (values then gradients, block by block)."""
    remaining = iter(tensors)
    return map_like(tensor_map, lambda _: next(remaining))


def leaves(tensor_map: TensorMap) -> list[torch.Tensor]:
    tensors = []
    for block in tensor_map.blocks():
        tensors.append(block.values.detach().clone().requires_grad_(True))
        for _, gradient in block.gradients():
            tensors.append(gradient.values.detach().clone().requires_grad_(True))
    return tensors


@pytest.fixture
def generator():
    return torch.Generator().manual_seed(1234)


def _batch(generator, target_kind):
    if target_kind == "multi_block":
        prediction = multi_block_map(N_ATOMS, generator)
        target = with_nans(multi_block_map(N_ATOMS, generator), generator)
    else:
        prediction = random_energy(N_ATOMS, generator)
        target = with_nans(random_energy(N_ATOMS, generator), generator, fraction=0.3)
    return prediction, target, random_mask(target, generator)


# --- against the reference ---------------------------------------------------------------
@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("masked", [False, True])
@pytest.mark.parametrize("reduction", ["mean", "sum"])
@pytest.mark.parametrize(
    ("target_kind", "gradient"),
    [
        ("multi_block", None),
        ("multi_block", "positions"),
        ("energy", None),
        ("energy", "positions"),
        ("energy", "strain"),
    ],
)
def test_matches_loop_reference(generator, kind, masked, reduction, target_kind, gradient):
    prediction, target, mask = _batch(generator, target_kind)
    delta = 0.7
    params = {"delta": delta} if kind == "huber" else {}
    term = create_loss(
        f"masked_{kind}" if masked else kind,
        name="t",
        gradient=gradient,
        reduction=reduction,
        **params,
    )
    extra = {"t_mask": mask} if masked else None
    value = term({"t": prediction}, {"t": target}, extra)
    expected = reference(
        kind, prediction, target, mask if masked else None, gradient, delta, reduction
    )
    assert value.dtype == torch.float64
    assert value.item() == pytest.approx(expected, rel=1e-10, abs=1e-12)


@pytest.mark.parametrize(
    ("kind", "torch_loss"),
    [
        ("mse", torch.nn.MSELoss()),
        ("mae", torch.nn.L1Loss()),
        ("huber", torch.nn.HuberLoss(delta=0.4)),
    ],
)
def test_matches_torch_losses_without_nans(generator, kind, torch_loss):
    prediction = multi_block_map(N_ATOMS, generator)
    target = multi_block_map(N_ATOMS, generator)
    params = {"delta": 0.4} if kind == "huber" else {}
    value = create_loss(kind, name="t", **params)({"t": prediction}, {"t": target})
    flat_p = torch.cat([b.values.reshape(-1) for b in prediction.blocks()])
    flat_t = torch.cat([b.values.reshape(-1) for b in target.blocks()])
    torch.testing.assert_close(value, torch_loss(flat_p, flat_t), rtol=1e-12, atol=0)


# --- small hand-computed cases ---------------------------------------------------------------
def _vector_map(values, name="e"):
    values = torch.tensor(values, dtype=torch.float64).reshape(-1, 1)
    return TensorMap(
        Labels.single(),
        [
            TensorBlock(
                values,
                labels(["system"], torch.arange(len(values))),
                [],
                Labels([name], torch.tensor([[0]])),
            )
        ],
    )


@pytest.mark.parametrize(
    ("kind", "reduction", "mask", "expected"),
    [
        # d = (-0.5, NaN target, 2)
        ("mse", "mean", None, (0.25 + 4.0) / 2),
        ("mse", "sum", None, 4.25),
        ("mae", "mean", None, (0.5 + 2.0) / 2),
        ("huber", "mean", None, (0.125 + 1.5) / 2),  # 0.5*0.5^2 ; 1*(2 - 0.5)
        ("mse", "mean", [1.0, 1.0, 0.0], 0.25),  # masked out the 2
        ("mae", "sum", [0.0, 3.0, -1.0], 2.0),  # nonzero counts, not a weight
    ],
)
def test_hand_computed(kind, reduction, mask, expected):
    prediction = _vector_map([1.0, 2.0, 3.0])
    target = _vector_map([1.5, float("nan"), 1.0])
    type_ = kind if mask is None else f"masked_{kind}"
    extra = None if mask is None else {"energy_mask": _vector_map(mask)}
    term = create_loss(type_, name="energy", reduction=reduction)
    value = term({"energy": prediction}, {"energy": target}, extra)
    assert value.item() == pytest.approx(expected, abs=1e-15)


def test_functional_hand_computed():
    prediction = torch.tensor([1.0, 2.0, 3.0], dtype=torch.float64)
    target = torch.tensor([1.5, float("nan"), 1.0], dtype=torch.float64)
    total, count = pointwise_sum_and_count(prediction, target, kind="mse")
    assert total.item() == 4.25
    assert count.item() == 2
    assert count.dtype == torch.int64
    huber = pointwise_loss(prediction, target, kind="huber", delta=2.5, reduction="sum")
    assert huber.item() == pytest.approx(0.125 + 2.0)


# --- gradients ------------------------------------------------------------------------------
@pytest.mark.parametrize(
    "type_", ["mse", "mae", "huber", "masked_mse", "masked_mae", "masked_huber"]
)
@pytest.mark.parametrize("gradient", [None, "positions"])
def test_gradcheck(generator, type_, gradient):
    prediction = multi_block_map([2, 1], generator)
    target = with_nans(multi_block_map([2, 1], generator), generator, fraction=0.2)
    extra = {"t_mask": random_mask(target, generator)}
    params = {"delta": 0.5} if "huber" in type_ else {}
    term = create_loss(type_, name="t", gradient=gradient, **params)

    def loss(*tensors):
        return term({"t": rebuild(prediction, list(tensors))}, {"t": target}, extra)

    assert torch.autograd.gradcheck(loss, leaves(prediction), fast_mode=True)


def test_no_entries_left_is_exact_zero_with_gradient(generator):
    prediction = multi_block_map(N_ATOMS, generator, requires_grad=True)
    target = map_like(prediction, lambda v: torch.full_like(v, float("nan")).detach())
    for reduction in ("mean", "sum"):
        term = create_loss("mse", name="t", reduction=reduction)
        value = term({"t": prediction}, {"t": target})
        assert value.item() == 0.0
        assert value.requires_grad
        (grad,) = torch.autograd.grad(value, prediction.block_by_id(0).values)
        assert torch.equal(grad, torch.zeros_like(grad))
    mask = map_like(prediction, lambda v: torch.zeros_like(v).detach())
    target = multi_block_map(N_ATOMS, generator)
    masked = create_loss("masked_mae", name="t")({"t": prediction}, {"t": target}, {"t_mask": mask})
    assert masked.item() == 0.0
    masked.backward()
    assert torch.equal(
        prediction.block_by_id(1).values.grad, torch.zeros_like(prediction.block_by_id(1).values)
    )


def test_nan_targets_give_finite_gradients(generator):
    prediction = random_energy(N_ATOMS, generator, requires_grad=True)
    target = with_nans(random_energy(N_ATOMS, generator), generator, fraction=0.5)
    for gradient in (None, "positions", "strain"):
        create_loss("huber", name="energy", gradient=gradient)(
            {"energy": prediction}, {"energy": target}
        ).backward()
    block = prediction.block_by_id(0)
    for values in (
        block.values,
        block.gradient("positions").values,
        block.gradient("strain").values,
    ):
        assert torch.isfinite(values.grad).all()


def test_float32(generator):
    prediction = multi_block_map(N_ATOMS, generator, dtype=torch.float32)
    target = with_nans(multi_block_map(N_ATOMS, generator, dtype=torch.float32), generator)
    value = create_loss("mae", name="t")({"t": prediction}, {"t": target})
    assert value.dtype == torch.float32
    assert value.item() == pytest.approx(reference("mae", prediction, target), rel=1e-5)


def test_functional_compiles_fullgraph():
    def all_kinds(prediction, target, mask):
        results = []
        for kind in ("mse", "mae", "huber"):
            results.extend(pointwise_sum_and_count(prediction, target, mask, kind=kind, delta=0.3))
        return results

    generator = torch.Generator().manual_seed(0)
    prediction = torch.randn(40, 3, generator=generator, dtype=torch.float64)
    target = torch.randn(40, 3, generator=generator, dtype=torch.float64)
    target[::5, 1] = float("nan")
    mask = (torch.rand(40, 3, generator=generator) > 0.3).double()
    compiled = torch.compile(all_kinds, fullgraph=True, backend="aot_eager")
    for got, expected in zip(
        compiled(prediction, target, mask), all_kinds(prediction, target, mask), strict=True
    ):
        torch.testing.assert_close(got, expected, rtol=1e-12, atol=0)


def test_segment_sums_compile_fullgraph_with_backward():
    def all_kinds(predictions, targets, masks):
        results = []
        for kind in KINDS:
            results.extend(
                pointwise_segment_sums(predictions, targets, masks, kind=kind, delta=0.3)
            )
        return results

    predictions, targets, masks = _segments(torch.Generator().manual_seed(5))
    compiled = torch.compile(all_kinds, fullgraph=True, backend="aot_eager")
    got, expected = compiled(predictions, targets, masks), all_kinds(predictions, targets, masks)
    for a, b in zip(got, expected, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-12, atol=0)
    grads = [
        torch.autograd.grad(sum(r.sum() for r in out[::2]), predictions) for out in (got, expected)
    ]
    for a, b in zip(*grads, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-12, atol=0)


# --- several segments in one call (the LossModule's fused terms) ---------------------------
def _segments(generator, requires_grad=True):
    """Segments of different shapes (energy-, force- and stress-like) with NaN targets,
    random masks, and one segment where nothing counts."""
    shapes = [(6, 1), (17, 3, 1), (6, 3, 3, 1), (4, 2)]
    predictions = [
        torch.randn(shape, generator=generator, dtype=torch.float64).requires_grad_(requires_grad)
        for shape in shapes
    ]
    targets = []
    for shape in shapes:
        target = torch.randn(shape, generator=generator, dtype=torch.float64)
        targets.append(target.masked_fill(torch.rand(shape, generator=generator) < 0.3, math.nan))
    targets[-1] = torch.full(shapes[-1], math.nan, dtype=torch.float64)  # nothing counts
    choices = torch.tensor([0.0, 1.0, 0.5, -2.0], dtype=torch.float64)
    masks = [choices[torch.randint(0, 4, shape, generator=generator)] for shape in shapes]
    return predictions, targets, masks


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("masked", [False, True])
def test_segment_sums_equal_per_segment_sum_and_count(generator, kind, masked):
    """Each segment's sum and count are those of pointwise_sum_and_count (bit for bit),
    and so are the gradients with respect to predictions and targets."""
    predictions, targets, masks = _segments(generator)
    targets = [t.requires_grad_(True) for t in targets]
    masks = masks if masked else None
    sums, counts = pointwise_segment_sums(predictions, targets, masks, kind=kind, delta=0.4)
    assert sums.shape == counts.shape == (len(predictions),)
    assert counts.dtype == torch.int64
    assert not counts.requires_grad
    expected = [
        pointwise_sum_and_count(p, t, None if m is None else m, kind=kind, delta=0.4)
        for p, t, m in zip(predictions, targets, masks or [None] * len(targets), strict=True)
    ]
    assert torch.equal(sums.detach(), torch.stack([total.detach() for total, _ in expected]))
    assert torch.equal(counts, torch.stack([count for _, count in expected]))
    assert counts[-1].item() == 0
    assert sums[-1].item() == 0.0
    weights = torch.randn(len(predictions), generator=generator, dtype=torch.float64)
    got = torch.autograd.grad((sums * weights).sum(), [*predictions, *targets])
    reference_total = sum(w * total for w, (total, _) in zip(weights, expected, strict=True))
    wanted = torch.autograd.grad(reference_total, [*predictions, *targets])
    for a, b in zip(got, wanted, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-14, atol=1e-15)


@pytest.mark.parametrize("kind", KINDS)
def test_segment_sums_gradcheck_and_gradgradcheck(generator, kind):
    predictions, targets, masks = _segments(generator)
    targets = [t.requires_grad_(True) for t in targets]
    n = len(predictions)

    def sums(*tensors):
        return pointwise_segment_sums(tensors[:n], tensors[n:], masks, kind=kind, delta=0.4)[0]

    inputs = (*predictions, *targets)
    assert torch.autograd.gradcheck(sums, inputs)
    assert torch.autograd.gradgradcheck(sums, inputs)


def test_segment_sums_ignore_predictions_at_ignored_entries():
    prediction = torch.tensor([1.0, math.nan, math.inf, 4.0], dtype=torch.float64)
    prediction.requires_grad_(True)
    target = torch.tensor([0.0, math.nan, 1.0, 2.0], dtype=torch.float64)
    mask = torch.tensor([1.0, 1.0, 0.0, 1.0], dtype=torch.float64)
    for kind in KINDS:
        sums, counts = pointwise_segment_sums(
            [prediction, prediction], [target, target], [mask, mask], kind=kind
        )
        expected = elementwise_reference(kind, 1.0, 1.0) + elementwise_reference(kind, 2.0, 1.0)
        assert sums.tolist() == pytest.approx([expected, expected], abs=1e-15)
        assert counts.tolist() == [2, 2]
        (grad,) = torch.autograd.grad(sums.sum(), prediction)
        assert grad[1].item() == 0.0
        assert grad[2].item() == 0.0
        assert torch.isfinite(grad).all()


def test_segment_sums_bad_arguments():
    x = torch.zeros(3)
    with pytest.raises(ValueError, match="unknown pointwise loss kind 'mape'"):
        pointwise_segment_sums([x], [x], kind="mape")
    with pytest.raises(ValueError, match="2 predictions, 1 targets and no masks"):
        pointwise_segment_sums([x, x], [x])
    with pytest.raises(ValueError, match="2 predictions, 2 targets and 1 masks"):
        pointwise_segment_sums([x, x], [x, x], [x])
    with pytest.raises(ValueError, match="at least one segment"):
        pointwise_segment_sums([], [])


# --- raw inputs brought to loss units on the way (the lean step's fused loss) -------------
def _scaled_inputs(generator):
    """Energy-, force- and stress-like segments: raw predictions, targets with NaNs, a
    per-row factor (1 / n_atoms) broadcast over the stress components, a shift on the
    values, an inverse scale."""
    predictions, targets, _ = _segments(generator)
    predictions, targets = predictions[:3], targets[:3]
    rows = torch.rand(6, 1, generator=generator, dtype=torch.float64) + 0.2
    row_factors = [rows, None, rows.view(6, 1, 1, 1)]
    shifts = [torch.randn(6, 1, generator=generator, dtype=torch.float64) * 10, None, None]
    inverse_scale = torch.tensor(0.37, dtype=torch.float64)
    return predictions, targets, row_factors, shifts, inverse_scale


def _scaled_reference(kinds, delta, predictions, targets, row_factors, shifts, inverse_scale):
    """Loops: d = (p - (t - shift) * inverse_scale) * row_factor per entry, NaN targets
    skipped; per segment (sum of the loss, count)."""
    result = []
    for k, (p, t, f, c) in enumerate(zip(predictions, targets, row_factors, shifts, strict=True)):
        shape = t.shape
        f = torch.ones(shape, dtype=torch.float64) if f is None else f.expand(shape)
        c = torch.zeros(shape, dtype=torch.float64) if c is None else c.expand(shape)
        total, count = 0.0, 0
        for pj, tj, fj, cj in zip(
            p.detach().reshape(-1).tolist(),
            t.detach().reshape(-1).tolist(),
            f.reshape(-1).tolist(),
            c.reshape(-1).tolist(),
            strict=True,
        ):
            if math.isnan(tj):
                continue
            d = (pj - (tj - cj) * float(inverse_scale)) * fj
            total += elementwise_reference(kinds[k], d, delta)
            count += 1
        result.append((total, count))
    return result


@pytest.mark.parametrize("kinds", [["mse"] * 3, ["mae"] * 3, ["huber", "mae", "mse"]])
def test_scaled_segment_sums_match_loop_reference(generator, kinds):
    inputs = _scaled_inputs(generator)
    sums, counts, differences, valid = scaled_segment_sums(*inputs, kinds=kinds, deltas=[0.4] * 3)
    expected = _scaled_reference(kinds, 0.4, *inputs)
    torch.testing.assert_close(
        sums.detach(),
        torch.tensor([e[0] for e in expected], dtype=torch.float64),
        rtol=1e-12,
        atol=1e-12,
    )
    assert counts.tolist() == [e[1] for e in expected]
    # the residuals in loss units, 0 where the target is NaN, and the masks that count
    for d, v, t in zip(differences, valid, inputs[1], strict=True):
        assert not d.requires_grad
        assert torch.equal(v, ~torch.isnan(t))
        assert torch.all(d[~v] == 0)
    # the same as pointwise_segment_sums on inputs already in loss units
    p, t, f, c, s = inputs
    in_loss_units = [
        (
            x if fx is None else x * fx,
            ((y if cx is None else y - cx) * s) * (1 if fx is None else fx),
        )
        for x, y, fx, cx in zip(p, t, f, c, strict=True)
    ]
    for k, (px, tx) in enumerate(in_loss_units):
        total, count = pointwise_sum_and_count(px, tx, kind=kinds[k], delta=0.4)
        torch.testing.assert_close(sums[k], total, rtol=1e-12, atol=1e-12)
        assert counts[k] == count


def test_scaled_segment_sums_hand_computed():
    """d = (p - (t - c) s) f: p = 3, t = 5, c = 1, s = 0.5, f = 0.25 -> d = 0.25;
    the NaN target is skipped whatever the prediction (inf)."""
    prediction = torch.tensor([[3.0], [math.inf]], dtype=torch.float64, requires_grad=True)
    target = torch.tensor([[5.0], [math.nan]], dtype=torch.float64)
    sums, counts, _, _ = scaled_segment_sums(
        [prediction],
        [target],
        [torch.tensor([[0.25], [0.5]], dtype=torch.float64)],
        [torch.tensor([[1.0], [2.0]], dtype=torch.float64)],
        torch.tensor(0.5, dtype=torch.float64),
        kinds=["mse"],
    )
    assert sums.tolist() == [0.0625]
    assert counts.tolist() == [1]
    (grad,) = torch.autograd.grad(sums.sum(), prediction)
    assert grad.tolist() == [[2 * 0.25 * 0.25], [0.0]]  # 2 d f, 0 where ignored


@pytest.mark.parametrize("kinds", [["mse"] * 3, ["huber", "mae", "mse"]])
def test_scaled_segment_sums_gradcheck_and_gradgradcheck(generator, kinds):
    predictions, targets, row_factors, shifts, inverse_scale = _scaled_inputs(generator)
    targets = [t.requires_grad_(True) for t in targets]
    shift = shifts[0].requires_grad_(True)
    n = len(predictions)

    def sums(*tensors):
        return scaled_segment_sums(
            tensors[:n],
            tensors[n : 2 * n],
            row_factors,
            [tensors[-1], None, None],
            inverse_scale,
            kinds=kinds,
            deltas=[0.4] * n,
        )[0]

    inputs = (*predictions, *targets, shift)
    assert torch.autograd.gradcheck(sums, inputs)
    assert torch.autograd.gradgradcheck(sums, inputs)


def test_scaled_segment_sums_without_gradients_and_bad_arguments():
    x = torch.ones(3, 1, dtype=torch.float64)
    sums, counts, _differences, _ = scaled_segment_sums([x], [x], kinds=["mse"])
    assert sums.tolist() == [0.0]
    assert counts.tolist() == [3]
    assert not sums.requires_grad
    with pytest.raises(ValueError, match="unknown pointwise loss kind 'mape'"):
        scaled_segment_sums([x], [x], kinds=["mape"])
    with pytest.raises(ValueError, match="2 predictions, 1 targets"):
        scaled_segment_sums([x, x], [x], kinds=["mse", "mse"])
    with pytest.raises(ValueError, match="at least one segment"):
        scaled_segment_sums([], [], kinds=[])


# --- layout checks ------------------------------------------------------------------------
def test_full_check_runs_once_per_layout(generator, monkeypatch):
    import pl_mtt.losses.pointwise as module

    calls = []
    original = module.check_same_layout
    monkeypatch.setattr(
        module, "check_same_layout", lambda *a, **k: (calls.append(1), original(*a, **k))
    )
    term = create_loss("mse", name="energy", gradient="positions")
    for n_atoms in ([3, 4], [5, 1, 2], [2]):
        prediction = random_energy(n_atoms, generator)
        term({"energy": prediction}, {"energy": random_energy(n_atoms, generator)})
    assert len(calls) == 1  # only the sample count changed
    prediction = random_energy([2], generator, n_properties=2)
    term({"energy": prediction}, {"energy": random_energy([2], generator, n_properties=2)})
    assert len(calls) == 2  # a new layout (two properties) is checked again


def _renamed_properties(tensor_map: TensorMap) -> TensorMap:
    block = tensor_map.block_by_id(0)
    properties = Labels(["other"], torch.tensor([[0]]))
    new = TensorBlock(block.values, block.samples, block.components, properties)
    return TensorMap(tensor_map.keys, [new])


def test_mismatched_properties(generator):
    prediction = random_energy(N_ATOMS, generator, gradients=False)
    target = random_energy(N_ATOMS, generator, gradients=False)
    term = create_loss("mse", name="energy")
    with pytest.raises(ValueError, match=r"target 'energy'.*block 0 \(key _=0\).*properties"):
        term({"energy": _renamed_properties(prediction)}, {"energy": target})


def test_mismatched_sample_count(generator):
    prediction = random_energy([3, 2], generator)
    target = random_energy([3, 2, 2], generator)
    term = create_loss("mse", name="energy", gradient="positions")
    with pytest.raises(
        ValueError,
        match=r"gradient 'positions' of target 'energy'.*"
        r"prediction has 5 samples, the target 7",
    ):
        term({"energy": prediction}, {"energy": target})


def test_mismatched_keys_and_components(generator):
    prediction = multi_block_map(N_ATOMS, generator)
    target = multi_block_map(N_ATOMS, generator)
    one_block = TensorMap(labels(["o3_lambda"], [[0]]), [prediction.block_by_id(0).copy()])
    term = create_loss("mse", name="t")
    with pytest.raises(ValueError, match=r"target 't'.*prediction keys.*differ"):
        term({"t": one_block}, {"t": target})
    other_keys = TensorMap(
        labels(["o3_lambda"], [[0], [2]]), [b.copy() for b in prediction.blocks()]
    )
    with pytest.raises(ValueError, match=r"prediction keys.*differ from the target keys"):
        create_loss("mse", name="t")({"t": other_keys}, {"t": target})
    # same shapes, different component labels: caught by the full check
    blocks = []
    for block in prediction.blocks():
        component = block.components[0]
        renamed = Labels(["m"], component.values)
        blocks.append(TensorBlock(block.values, block.samples, [renamed], block.properties))
    with pytest.raises(ValueError, match=r"block 0 \(key o3_lambda=0\).*components"):
        create_loss("mse", name="t")({"t": TensorMap(prediction.keys, blocks)}, {"t": target})


def test_dtype_mismatch(generator):
    prediction = random_energy(N_ATOMS, generator, dtype=torch.float32)
    target = random_energy(N_ATOMS, generator)
    with pytest.raises(
        ValueError,
        match=r"prediction \(torch.float32, cpu\) and target \(torch.float64, cpu\) differ",
    ):
        create_loss("mse", name="energy")({"energy": prediction}, {"energy": target})


def test_missing_mask(generator):
    prediction, target, _ = _batch(generator, "energy")
    term = create_loss("masked_mse", name="energy")
    with pytest.raises(ValueError, match=r"'energy_mask' is missing from extra_data"):
        term({"energy": prediction}, {"energy": target}, {})
    with pytest.raises(ValueError, match=r"'energy_mask' is missing from extra_data"):
        term({"energy": prediction}, {"energy": target})


def test_mask_without_gradient_block(generator):
    prediction, target, _ = _batch(generator, "energy")
    mask = random_mask(random_energy(N_ATOMS, generator, gradients=False), generator)
    term = create_loss("masked_mae", name="energy", gradient="positions")
    with pytest.raises(ValueError, match=r"the mask has no gradient 'positions'"):
        term({"energy": prediction}, {"energy": target}, {"energy_mask": mask})


def test_mask_with_other_shape(generator):
    prediction, target, _ = _batch(generator, "energy")
    mask = random_mask(random_energy([1, 2], generator), generator)
    term = create_loss("masked_mse", name="energy")
    with pytest.raises(ValueError, match=r"the mask has 2 samples, the target 4"):
        term({"energy": prediction}, {"energy": target}, {"energy_mask": mask})


def test_unknown_gradient(generator):
    prediction, target, _ = _batch(generator, "energy")
    term = create_loss("mse", name="energy", gradient="cell")
    with pytest.raises(
        ValueError,
        match=r"prediction has no gradient 'cell'.*"
        r"positions.*strain",
    ):
        term({"energy": prediction}, {"energy": target})
    no_gradients = random_energy(N_ATOMS, generator, gradients=False)
    with pytest.raises(ValueError, match=r"the target has no gradient 'positions'"):
        create_loss("mse", name="energy", gradient="positions")(
            {"energy": prediction}, {"energy": no_gradients}
        )


def test_target_missing(generator):
    prediction, target, _ = _batch(generator, "energy")
    term = create_loss("mse", name="energy")
    with pytest.raises(
        ValueError,
        match=r"'energy' is missing from predictions \(available: "
        r"\['other'\]\)",
    ):
        term({"other": prediction}, {"energy": target})
    with pytest.raises(ValueError, match=r"'energy' is missing from targets"):
        term({"energy": prediction}, {})


def test_energy_map_helper_layout():
    """The test data has the documented energy layout (guards the other tests)."""
    generator = torch.Generator().manual_seed(0)
    tensor_map = random_energy([2, 3], generator)
    block = tensor_map.block_by_id(0)
    assert block.gradient("positions").samples.names == ["sample", "system", "atom"]
    assert block.gradient("positions").values.shape == (5, 3, 1)
    assert block.gradient("strain").values.shape == (2, 3, 3, 1)
    assert energy_map(torch.zeros(2, 1), [1, 1]).block_by_id(0).properties.names == ["energy"]


def test_predictions_at_ignored_entries_do_not_matter():
    """NaN/inf predictions where the target is NaN or masked out contribute exactly 0
    and get a zero gradient (as with metatrain's boolean filtering)."""
    prediction = torch.tensor([1.0, float("nan"), float("inf"), 4.0], dtype=torch.float64)
    prediction.requires_grad_(True)
    target = torch.tensor([0.0, float("nan"), 1.0, 2.0], dtype=torch.float64)
    mask = torch.tensor([1.0, 1.0, 0.0, 1.0], dtype=torch.float64)
    for kind in KINDS:
        total, count = pointwise_sum_and_count(prediction, target, mask, kind=kind)
        expected = [elementwise_reference(kind, 1.0, 1.0), elementwise_reference(kind, 2.0, 1.0)]
        assert total.item() == pytest.approx(sum(expected), abs=1e-15)
        assert count.item() == 2
        (grad,) = torch.autograd.grad(total, prediction)
        assert grad[1].item() == 0.0
        assert grad[2].item() == 0.0
        assert torch.isfinite(grad).all()
