"""masked_dos: the shift-aligned DOS loss against a loop reference (DESIGN decision 8)."""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch
import yaml
from metatensor.torch import Labels, TensorBlock, TensorMap
from omegaconf import OmegaConf

from pl_mtt.config import expand_loss_config
from pl_mtt.losses import create_loss
from pl_mtt.losses.dos import MaskedDOSLoss
from pl_mtt.losses.functional.dos import dos_alignment_shifts, masked_dos_loss

NAME = "mtt::dos"
F64 = torch.float64


# -- reference: the spec's formulas, every shift tried explicitly, loops everywhere -------
def reference(pred, target, mask, extra, h, grad_weight, int_weight):
    """Per-structure losses and shifts, float64, one structure and one shift at a time."""
    pred, target = pred.to(F64), target.to(F64)
    batch, width = pred.shape
    n = width - extra
    if target.shape[1] == width:  # PET-MAD-DOS layout: the first `extra` points are ignored
        target, mask = target[:, extra:], mask[:, extra:]
    grid = -7.3 + h * torch.arange(width, dtype=F64)  # the energy grid (offset irrelevant)
    losses, shifts = [], []
    for b in range(batch):
        valid = (mask[b] != 0) & ~torch.isnan(target[b])  # NaN targets count as masked out
        m = valid.to(F64)
        t = torch.where(torch.isnan(target[b]), 0.0, target[b])  # ... and as 0 in cumtrapz
        best_shift, best = 0, math.inf
        if bool(valid.any()):  # a fully masked structure keeps shift 0
            for s in range(extra + 1):
                x = grid[s : s + n]
                l1 = float(torch.trapezoid((pred[b, s : s + n] - t) ** 2 * m, x=x))
                if l1 < best:  # strict: ties keep the smallest shift
                    best, best_shift = l1, s
        s = best_shift
        x = grid[s : s + n]
        aligned = pred[b, s : s + n]
        l1 = torch.trapezoid((aligned - t) ** 2 * m, x=x)
        slope = torch.gradient(aligned, spacing=h)[0]
        l2 = torch.trapezoid(slope**2 * (1 - m), x=x)
        cumulative = torch.cumulative_trapezoid(aligned, x=x) - torch.cumulative_trapezoid(t, x=x)
        l3 = torch.trapezoid(cumulative**2 * m[1:], x=x[1:])
        losses.append(float(l1 + grad_weight * l2 + int_weight * l3))
        shifts.append(s)
    return torch.tensor(losses, dtype=F64), torch.tensor(shifts)


# -- helpers ---------------------------------------------------------------------------
def tensor_map(values: torch.Tensor, first_point: int = 0) -> TensorMap:
    batch, width = values.shape
    block = TensorBlock(
        values=values,
        samples=Labels(["system"], torch.arange(batch, dtype=torch.int32)[:, None]).to(
            values.device
        ),
        components=[],
        properties=Labels(
            ["point"], torch.arange(first_point, first_point + width, dtype=torch.int32)[:, None]
        ).to(values.device),
    )
    return TensorMap(Labels.single().to(values.device), [block])


def as_maps(pred, target, mask):
    return {NAME: tensor_map(pred)}, {NAME: tensor_map(target)}, {NAME + "_mask": tensor_map(mask)}


def random_case(batch, n, extra, full_width, dtype=F64, seed=0):
    """Random DOS data with fully masked, fully unmasked, partial and NaN-holding rows."""
    generator = torch.Generator().manual_seed(seed)
    width = n + extra
    pred = torch.rand(batch, width, generator=generator, dtype=F64) * 2.0
    target = torch.rand(batch, n, generator=generator, dtype=F64) * 2.0
    mask = torch.rand(batch, n, generator=generator, dtype=F64)
    mask = torch.where(mask > 0.3, mask, torch.zeros_like(mask))  # fractional = counts
    for b in range(batch):
        if b % 3 == 1:
            mask[b] = 0.0
        elif b % 3 == 2:
            mask[b] = 1.0
        if b % 4 == 3:
            target[b, torch.randint(n, (2,), generator=generator)] = math.nan
    if full_width:  # ignored prefix full of garbage
        junk = torch.full((batch, extra), 1e6, dtype=F64)
        junk[:, ::2] = math.nan
        target = torch.cat([junk, target], dim=1)
        mask = torch.cat([torch.ones(batch, extra, dtype=F64), mask], dim=1)
    if seed % 2:
        mask = mask != 0
    return pred.to(dtype), target.to(dtype), mask


# -- parity with the reference -----------------------------------------------------------
@pytest.mark.parametrize("full_width", [False, True])
@pytest.mark.parametrize("extra", [0, 1, 7, 40])
@pytest.mark.parametrize("n", [5, 64, 500])
@pytest.mark.parametrize("batch", [1, 3, 17])
def test_matches_reference(batch, n, extra, full_width):
    seed = batch * 1000 + n * 10 + extra + full_width
    pred, target, mask = random_case(batch, n, extra, full_width, seed=seed)
    h = 0.05 if n != 64 else 0.02
    gw, iw = (1e-4, 2.0) if n != 5 else (0.7, 0.3)
    expected, expected_shifts = reference(pred, target, mask, extra, h, gw, iw)

    losses, shifts = masked_dos_loss(
        pred,
        target,
        mask,
        extra_targets=extra,
        grid_spacing=h,
        grad_weight=gw,
        int_weight=iw,
        return_shifts=True,
    )
    assert shifts.dtype == torch.long
    assert shifts.tolist() == expected_shifts.tolist()
    torch.testing.assert_close(losses, expected, rtol=1e-10, atol=1e-12)
    assert dos_alignment_shifts(pred, target, mask, extra_targets=extra).tolist() == (
        expected_shifts.tolist()
    )

    maps = as_maps(pred, target, mask)
    params = {"extra_targets": extra, "grid_spacing": h, "grad_weight": gw, "int_weight": iw}
    for reduction, value in (
        ("mean", expected.mean()),
        ("sum", expected.sum()),
        ("none", expected),
    ):
        term = create_loss("masked_dos", name=NAME, reduction=reduction, **params)
        torch.testing.assert_close(term(*maps), value, rtol=1e-10, atol=1e-12)
    total, count = term.sum_and_count(*maps)
    torch.testing.assert_close(total, expected.sum(), rtol=1e-10, atol=1e-12)
    assert count.item() == batch


@pytest.mark.parametrize("full_width", [False, True])
def test_float32_matches_float64_reference(full_width):
    pred, target, mask = random_case(17, 300, 40, full_width, dtype=torch.float32, seed=5)
    expected, expected_shifts = reference(pred, target, mask, 40, 0.05, 1e-4, 2.0)
    losses, shifts = masked_dos_loss(pred, target, mask, extra_targets=40, return_shifts=True)
    assert losses.dtype == torch.float32
    assert shifts.tolist() == expected_shifts.tolist()
    torch.testing.assert_close(losses.double(), expected, rtol=2e-5, atol=1e-6)


def test_hand_computed_case():
    # n = 3, extra = 1, h = 0.5; target [1, 0, 1]; mask [1, 1, 0]; pred [0, 1, 0, 1]
    pred = torch.tensor([[0.0, 1.0, 0.0, 1.0]], dtype=F64)
    target = torch.tensor([[1.0, 0.0, 1.0]], dtype=F64)
    mask = torch.tensor([[1.0, 1.0, 0.0]], dtype=F64)
    # shift 0: 0.5 * (0.5 * 1 + 1 * 1) = 0.75; shift 1: 0 -> shift 1, aligned [1, 0, 1]
    # L1 = 0; gradient [-2, 0, 2], (1 - m) = [0, 0, 1] -> L2 = 0.5 * 0.5 * 4 = 1
    # cumtrapz difference = 0 -> L3 = 0
    loss, shifts = masked_dos_loss(
        pred, target, mask, extra_targets=1, grid_spacing=0.5, grad_weight=3.0, return_shifts=True
    )
    assert shifts.tolist() == [1]
    assert loss.tolist() == [3.0]
    # without alignment freedom: pred [0, 1, 0], diff [-1, 1, -1]
    # L1 = 0.5 * (0.5 * 1 + 1 * 1 + 0) = 0.75; gradient [2, -1, -2] -> L2 = 0.5 * 0.5 * 4 = 1
    # cumtrapz(diff) = [0, 0]            -> L3 = 0
    loss = masked_dos_loss(
        pred[:, :3], target, mask, extra_targets=0, grid_spacing=0.5, grad_weight=2.0
    )
    assert loss.tolist() == [0.75 + 2.0]
    # cumulative term: diff [1, 1, 1] -> cumtrapz [0.5, 1.0]; m[1:] = [1, 0]
    # L3 = 0.5 * 0.5 * (0.25 + 0) = 0.0625; L1 = 0.5 * (0.5 + 1) = 0.75
    # gradient of [2, 1, 2] = [-2, 0, 2], (1 - m) = [0, 0, 1] -> L2 = 0.5 * 0.5 * 4 = 1
    loss = masked_dos_loss(
        target + 1.0, target, mask, extra_targets=0, grid_spacing=0.5, int_weight=4.0
    )
    assert loss.tolist() == [0.75 + 1e-4 * 1.0 + 4.0 * 0.0625]


# -- planted shifts and ties ---------------------------------------------------------------
def smooth_dos(batch, width, generator, dtype):
    """Sums of Gaussians: neighbouring shifts give close criteria (a hard search)."""
    energy = torch.arange(width, dtype=F64)[None, None, :] * 0.05
    centers = torch.rand(batch, 12, 1, generator=generator, dtype=F64) * width * 0.05
    widths = 0.1 + torch.rand(batch, 12, 1, generator=generator, dtype=F64) * 0.4
    return torch.exp(-(((energy - centers) / widths) ** 2)).sum(1).to(dtype)


@pytest.mark.parametrize("dtype", [torch.float32, F64])
@pytest.mark.parametrize("full_width", [False, True])
@pytest.mark.parametrize("kind", ["random", "smooth"])
def test_planted_shift_is_found_with_zero_masked_loss(dtype, full_width, kind):
    generator = torch.Generator().manual_seed(7)
    batch, n, extra = 17, 400, 60
    if kind == "random":
        pred = torch.rand(batch, n + extra, generator=generator, dtype=F64).to(dtype)
    else:
        pred = smooth_dos(batch, n + extra, generator, dtype)
    planted = torch.randint(extra + 1, (batch,), generator=generator)
    planted[:2] = torch.tensor([0, extra])
    index = planted[:, None] + torch.arange(n)
    target = pred.gather(1, index)
    mask = torch.rand(batch, n, generator=generator) > 0.4
    mask[::3] = True
    if full_width:
        target = torch.cat([torch.rand(batch, extra, dtype=dtype), target], dim=1)
        mask = torch.cat([torch.ones(batch, extra, dtype=torch.bool), mask], dim=1)
    loss, shifts = masked_dos_loss(
        pred, target, mask, extra_targets=extra, grad_weight=0.0, return_shifts=True
    )
    assert shifts.tolist() == planted.tolist()
    assert loss.abs().max().item() == 0.0  # L1 and L3 vanish exactly
    full = masked_dos_loss(pred, target, mask, extra_targets=extra)
    assert full[::3].abs().max().item() == 0.0  # fully unmasked rows: L2 weighted by 0
    expected, _ = reference(pred, target, mask, extra, 0.05, 1e-4, 2.0)
    tolerance = 1e-10 if dtype == F64 else 1e-5
    torch.testing.assert_close(full.double(), expected, rtol=tolerance, atol=tolerance * 1e-2)


def test_ties_go_to_the_smallest_shift():
    generator = torch.Generator().manual_seed(3)
    n, extra = 90, 30
    # constant predictions: every shift gives the same criterion -> 0
    pred = torch.full((4, n + extra), 0.7, dtype=F64)
    target = torch.rand(4, n, generator=generator, dtype=F64)
    mask = torch.rand(4, n, generator=generator) > 0.5
    assert dos_alignment_shifts(pred, target, mask, extra_targets=extra).tolist() == [0] * 4
    # period-10 predictions, target = window at 3 (exact zero at 3, 13, 23) -> 3
    pattern = torch.rand(10, generator=generator, dtype=F64)
    periodic = pattern.repeat(12)[None].repeat(2, 1)
    target = periodic[:, 3 : 3 + n].clone()
    assert dos_alignment_shifts(periodic, target, mask[:2], extra_targets=extra).tolist() == [3, 3]
    # float32 too
    shifts = dos_alignment_shifts(periodic.float(), target.float(), mask[:2], extra_targets=extra)
    assert shifts.tolist() == [3, 3]
    # fully masked rows use shift 0 whatever the data
    none = torch.zeros(2, n, dtype=torch.bool)
    assert dos_alignment_shifts(periodic, target, none, extra_targets=extra).tolist() == [0, 0]


# -- gradients ---------------------------------------------------------------------------
def test_gradcheck():
    generator = torch.Generator().manual_seed(11)
    pred = torch.rand(3, 9, generator=generator, dtype=F64, requires_grad=True)
    target = torch.rand(3, 6, generator=generator, dtype=F64)
    target[1, 2] = math.nan
    mask = torch.rand(3, 6, generator=generator) > 0.3
    mask[2] = False

    def loss(p):
        return masked_dos_loss(
            p, target, mask, extra_targets=3, grid_spacing=0.1, grad_weight=0.5, int_weight=2.0
        )

    assert torch.autograd.gradcheck(loss, (pred,))


@pytest.mark.parametrize(("grad_weight", "int_weight"), [(0.0, 0.0), (1e-4, 2.0)])
def test_gradient_flows_only_through_the_chosen_window(grad_weight, int_weight):
    pred, target, mask = random_case(6, 50, 12, False, seed=4)
    pred.requires_grad_(True)
    h = 0.05
    loss, shifts = masked_dos_loss(
        pred,
        target,
        mask,
        extra_targets=12,
        grid_spacing=h,
        grad_weight=grad_weight,
        int_weight=int_weight,
        return_shifts=True,
    )
    loss.sum().backward()
    inside = torch.zeros_like(pred, dtype=torch.bool)
    for b, s in enumerate(shifts.tolist()):
        inside[b, s : s + 50] = True
    assert pred.grad[~inside].abs().max().item() == 0.0
    if grad_weight == 0.0 and int_weight == 0.0:
        # masked term only: d/da h * sum_i w_i m_i (a_i - t_i)^2 = 2 h w_i m_i (a_i - t_i)
        m = ((mask != 0) & ~torch.isnan(target)).to(F64)
        t = torch.nan_to_num(target)
        w = torch.ones(50, dtype=F64)
        w[[0, -1]] = 0.5
        aligned = pred.detach()[inside].view(6, 50)
        expected = 2 * h * w * m * (aligned - t)
        torch.testing.assert_close(pred.grad[inside].view(6, 50), expected, rtol=1e-12, atol=0)


# -- the TensorMap adapter -----------------------------------------------------------------
SPEC_EXAMPLE = """
loss:
  mtt::dos:
    type: "masked_dos"
    grad_weight: 1e-4
    int_weight: 2.0
    extra_targets: 200
    reduction: "mean"
"""


@pytest.mark.parametrize("loader", ["plain_yaml", "hydra_group"])
def test_spec_yaml_example_builds_a_working_term(loader):
    if loader == "plain_yaml":
        raw = yaml.safe_load(SPEC_EXAMPLE)["loss"]
        assert raw[NAME]["grad_weight"] == "1e-4"  # YAML 1.1: a string
    else:  # the Hydra group file conf/loss/dos.yaml, read by OmegaConf
        raw = OmegaConf.load(Path(__file__).parent.parent / "conf" / "loss" / "dos.yaml")
    entry = expand_loss_config(raw, {NAME: {}})[NAME]
    assert entry["gradients"] == {}
    params = {
        k: v for k, v in entry.items() if k not in ("type", "weight", "reduction", "gradients")
    }
    term = create_loss(
        entry["type"], name=NAME, weight=entry["weight"], reduction=entry["reduction"], **params
    )
    assert isinstance(term, MaskedDOSLoss)
    assert (term.grad_weight, term.int_weight, term.extra_targets) == (1e-4, 2.0, 200)
    assert term.grid_spacing == 0.05
    pred, target, mask = random_case(5, 60, 200, True, seed=1)
    expected, _ = reference(pred, target, mask, 200, 0.05, 1e-4, 2.0)
    torch.testing.assert_close(
        term(*as_maps(pred, target, mask)), expected.mean(), rtol=1e-10, atol=0
    )


def test_energy_grid_sets_the_spacing():
    pred, target, mask = random_case(3, 40, 5, False, seed=2)
    grid = [-2.0 + 0.1 * i for i in range(45)]
    term = create_loss("masked_dos", name=NAME, extra_targets=5, energy_grid=grid)
    assert term.grid_spacing == pytest.approx(0.1, rel=1e-12)
    expected, _ = reference(pred, target, mask, 5, 0.1, 1e-4, 2.0)
    torch.testing.assert_close(
        term(*as_maps(pred, target, mask)), expected.mean(), rtol=1e-10, atol=0
    )
    # an explicit spacing that agrees with the grid is fine
    create_loss("masked_dos", name=NAME, extra_targets=5, energy_grid=grid, grid_spacing=0.1)


def test_empty_batch_and_steady_state_calls():
    term = create_loss("masked_dos", name=NAME, extra_targets=4)
    for batch in (3, 0, 5):  # same layout, different sample counts: checked once
        pred, target, mask = random_case(max(batch, 1), 20, 4, False, seed=2 * batch)
        pred, target, mask = pred[:batch], target[:batch], mask[:batch]
        value = term(*as_maps(pred, target, mask))
        expected = reference(pred, target, mask, 4, 0.05, 1e-4, 2.0)[0] if batch else None
        if batch:
            torch.testing.assert_close(value, expected.mean(), rtol=1e-10, atol=0)
        else:
            assert value.item() == 0.0
    assert len(term._checked_layouts) == 1


# -- bad inputs --------------------------------------------------------------------------
def test_missing_mask_names_the_key():
    pred, target, mask = random_case(2, 10, 2, False)
    predictions, targets, _ = as_maps(pred, target, mask)
    term = create_loss("masked_dos", name=NAME, extra_targets=2)
    with pytest.raises(ValueError, match="'mtt::dos_mask' is missing from extra_data"):
        term(predictions, targets, {})
    with pytest.raises(ValueError, match="'mtt::dos_mask' is missing"):
        term(predictions, targets)


@pytest.mark.parametrize("width", [9, 11, 13])
def test_wrong_target_width_states_the_three_widths(width):
    pred = torch.rand(2, 12, dtype=F64)
    target, mask = torch.rand(2, width, dtype=F64), torch.ones(2, width, dtype=F64)
    message = f"targets have {width} points.*n=10 or n \\+ extra_targets=12"
    with pytest.raises(ValueError, match=message):
        masked_dos_loss(pred, target, mask, extra_targets=2)
    term = create_loss("masked_dos", name=NAME, extra_targets=2)
    with pytest.raises(ValueError, match="target 'mtt::dos'.*" + message):
        term(*as_maps(pred, target, mask))


def test_other_layout_errors():
    pred, target, mask = random_case(2, 10, 2, False)
    term = create_loss("masked_dos", name=NAME, extra_targets=2)
    with pytest.raises(ValueError, match="mask has shape \\(2, 12\\)"):
        masked_dos_loss(pred, target, torch.ones(2, 12), extra_targets=2)
    with pytest.raises(ValueError, match="at least 14"):
        masked_dos_loss(pred, target, mask, extra_targets=12)
    with pytest.raises(ValueError, match="sample counts differ"):
        term(*as_maps(pred, target[:1], mask[:1]))
    two_blocks = TensorMap(
        Labels(["k"], torch.tensor([[0], [1]])),
        [tensor_map(pred).block_by_id(0).copy(), tensor_map(pred).block_by_id(0).copy()],
    )
    with pytest.raises(ValueError, match=r"exactly one block.*got 2"):
        term({NAME: two_blocks}, *as_maps(pred, target, mask)[1:])
    per_atom = TensorBlock(
        pred,
        Labels(["system", "atom"], torch.tensor([[0, 0], [0, 1]])),
        [],
        Labels(["point"], torch.arange(12)[:, None]),
    )
    with pytest.raises(ValueError, match="per-structure samples"):
        term({NAME: TensorMap(Labels.single(), [per_atom])}, *as_maps(pred, target, mask)[1:])
    predictions, targets, _ = as_maps(pred, target, mask)
    shifted_mask = {NAME + "_mask": tensor_map(mask.double(), first_point=5)}
    with pytest.raises(ValueError, match="must have the target's properties"):
        create_loss("masked_dos", name=NAME, extra_targets=2)(predictions, targets, shifted_mask)


def test_bad_parameters():
    with pytest.raises(ValueError, match="extra_targets"):
        create_loss("masked_dos", name=NAME, extra_targets=-1)
    with pytest.raises(ValueError, match="requires parameter 'extra_targets'"):
        create_loss("masked_dos", name=NAME)
    with pytest.raises(
        ValueError, match="masked_dos: extra_targets must be a non-negative integer, got -3"
    ):
        MaskedDOSLoss(name=NAME, extra_targets=-3)
    pred, target, mask = random_case(2, 10, 2, False)
    with pytest.raises(ValueError, match="extra_targets must be a non-negative integer"):
        masked_dos_loss(pred, target, mask, extra_targets=-1)
    with pytest.raises(ValueError, match="uniform to 1e-06"):
        create_loss("masked_dos", name=NAME, extra_targets=1, energy_grid=[0.0, 0.1, 0.25, 0.3])
    with pytest.raises(ValueError, match="increasing"):
        create_loss("masked_dos", name=NAME, extra_targets=1, energy_grid=[0.3, 0.2, 0.1])
    grid = [0.1 * i for i in range(12)]
    with pytest.raises(ValueError, match=r"grid_spacing=0\.2 disagrees"):
        create_loss("masked_dos", name=NAME, extra_targets=2, energy_grid=grid, grid_spacing=0.2)
    term = create_loss("masked_dos", name=NAME, extra_targets=2, energy_grid=grid[:-1])
    with pytest.raises(ValueError, match="predictions have 12 points but energy_grid has 11"):
        term(*as_maps(pred, target, mask))
    with pytest.raises(ValueError, match="cannot be used on a gradient"):
        create_loss("masked_dos", name=NAME, gradient="positions", extra_targets=2)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_steady_state_makes_no_host_sync():
    pred, target, mask = random_case(8, 300, 40, True, seed=9)
    expected, _ = reference(pred, target, mask, 40, 0.05, 1e-4, 2.0)
    pred, target, mask = (x.cuda() for x in (pred, target, mask))
    pred.requires_grad_(True)
    term = create_loss("masked_dos", name=NAME, extra_targets=40)
    maps = as_maps(pred, target, mask)
    term(*maps)  # first call: full metadata check
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        value = term(*maps)
        value.backward()
    finally:
        torch.cuda.set_sync_debug_mode("default")
    torch.testing.assert_close(value.cpu(), expected.mean(), rtol=1e-10, atol=0)


# -- compiled core -----------------------------------------------------------------------
def test_core_compiles_with_fullgraph():
    pred, target, mask = random_case(5, 64, 7, True, seed=2)
    kwargs = dict(extra_targets=7, grid_spacing=0.05, grad_weight=1e-4, int_weight=2.0)
    compiled = torch.compile(masked_dos_loss, fullgraph=True, backend="aot_eager")
    eager_pred, compiled_pred = pred.clone().requires_grad_(), pred.clone().requires_grad_()
    expected = masked_dos_loss(eager_pred, target, mask, **kwargs)
    value = compiled(compiled_pred, target, mask, **kwargs)
    torch.testing.assert_close(value, expected, rtol=1e-12, atol=0)
    expected.sum().backward()
    value.sum().backward()
    torch.testing.assert_close(compiled_pred.grad, eager_pred.grad, rtol=1e-12, atol=1e-15)


def test_loss_module_compile_cores(monkeypatch):
    from pl_mtt import LossModule
    from pl_mtt.losses import base

    calls = []
    real_compile = torch.compile

    def recording_compile(function, **kwargs):
        calls.append((function, kwargs))
        return real_compile(function, fullgraph=kwargs["fullgraph"], backend="aot_eager")

    monkeypatch.setattr(torch, "compile", recording_compile)
    base._compiled.cache_clear()
    loss = {NAME: {"type": "masked_dos", "extra_targets": 7}, "energy": "mse"}
    targets = {NAME: {}, "energy": {}}
    eager, compiled = LossModule(loss, targets), LossModule(loss, targets)
    assert compiled.compile_cores("reduce-overhead") == [NAME]  # only DOS has a core
    pred, target, mask = random_case(4, 32, 7, False, seed=5)
    maps = as_maps(pred, target, mask)
    value = compiled.terms[NAME](*maps)
    torch.testing.assert_close(value, eager.terms[NAME](*maps), rtol=1e-12, atol=0)
    assert calls == [(masked_dos_loss, {"fullgraph": True, "mode": "reduce-overhead"})]
    assert compiled.compile_cores(None) == [NAME]
    assert compiled.terms[NAME].core_function() is masked_dos_loss
    with pytest.raises(ValueError, match=r"compile mode must be one of \['default'"):
        compiled.compile_cores("fastest")
    base._compiled.cache_clear()
