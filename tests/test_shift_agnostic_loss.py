"""shift_agnostic_mse: metatrain's profile loss, against a loop reference written from its
formulas and against metatrain's own implementation (run in float64)."""

from __future__ import annotations

import itertools
import math

import pytest
import torch
from metatensor.torch import Labels, TensorBlock, TensorMap

from pl_mtt import LossModule
from pl_mtt.config import expand_loss_config
from pl_mtt.losses import create_loss
from pl_mtt.losses.functional.shift_agnostic import (
    shift_agnostic_alignment,
    shift_agnostic_mse_loss,
)

NAME = "mtt::dos"
F64 = torch.float64
H = 0.05
STENCIL = [1 / 4, -4 / 3, 3.0, -4.0, 25 / 12]


# -- reference: every shift tried, loops everywhere -------------------------------------
def padded_profile(p: torch.Tensor) -> list[float]:
    width = len(p)
    return [0.0] * width + [float(v) for v in p] + [0.0] * width


def trapz(values: list[float]) -> float:
    return sum(H * (a + b) / 2 for a, b in itertools.pairwise(values))


def cumtrapz(values: list[float]) -> list[float]:
    out, total = [], 0.0
    for a, b in itertools.pairwise(values):
        total += H * (a + b) / 2
        out.append(total)
    return out


def reference_one(p, t, int_weight, grad_weight, batch_bug=None):
    """(loss, shift, base, gradient term, integral term) of one structure."""
    big = padded_profile(p)
    n = len(t)
    mask = [0.0 if math.isnan(v) else 1.0 for v in t.tolist()]
    target = [0.0 if math.isnan(v) else v for v in t.tolist()]
    best, shift = math.inf, 0
    for s in range(len(big) - n + 1):
        value = sum(mask[j] * (big[s + j] - target[j]) ** 2 for j in range(n))
        value += sum(big[k] ** 2 for k in range(s))  # the prediction in front of the window
        if value < best:  # strict: ties keep the first shift
            best, shift = value, s
    penalised = []
    for k in range(4, len(big)):
        slope = sum(c * big[k - 4 + i] for i, c in enumerate(STENCIL)) / H
        kept = k < shift or (shift <= k < shift + n and mask[k - shift] == 1.0)
        penalised.append(0.0 if kept else slope**2)
    gradient = trapz(penalised)
    aligned = big[shift : shift + n]
    error = [
        (a - b) ** 2 * m
        for a, b, m in zip(cumtrapz(aligned), cumtrapz(target), mask[1:], strict=True)
    ]
    integral = trapz(error)
    return best + grad_weight * gradient + int_weight * integral, shift, best, gradient, integral


def reference(pred, target, int_weight, grad_weight):
    rows = [reference_one(pred[b], target[b], int_weight, grad_weight) for b in range(len(pred))]
    return torch.tensor([r[0] for r in rows], dtype=F64), torch.tensor([r[1] for r in rows])


def random_case(batch, width, n, seed=0, nan=True):
    generator = torch.Generator().manual_seed(seed)
    pred = torch.rand(batch, width, generator=generator, dtype=F64)
    target = torch.rand(batch, n, generator=generator, dtype=F64)
    if nan:
        target[0, : n // 3] = torch.nan  # masked head
        target[-1, n // 2 : n // 2 + 2] = torch.nan  # masked points inside
    return pred, target


def tensor_map(values: torch.Tensor) -> TensorMap:
    batch, width = values.shape
    block = TensorBlock(
        values=values,
        samples=Labels(["system"], torch.arange(batch, dtype=torch.int32)[:, None]),
        components=[],
        properties=Labels(["point"], torch.arange(width, dtype=torch.int32)[:, None]),
    )
    return TensorMap(Labels.single(), [block])


# -- hand-computed cases ----------------------------------------------------------------
def test_hand_computed_base_term():
    # p = [1, 2], padded [0, 0, 1, 2, 0, 0]; t = [1, 2]: shift 2 matches exactly but pays
    # 0 in front; every other shift pays more -> loss 0 at shift 2
    p = torch.tensor([[1.0, 2.0]], dtype=F64)
    loss, shifts = shift_agnostic_mse_loss(
        p,
        torch.tensor([[1.0, 2.0]], dtype=F64),
        int_weight=0,
        grad_penalty_weight=0,
        return_shifts=True,
    )
    assert shifts.tolist() == [2]
    assert float(loss) == 0.0
    # t = [3, 3]: shifts 0..4 of [0,0,1,2,0,0]: s=0: 9+9=18; s=1: 9+4=13; s=2: 4+1=5;
    # s=3: 1+9 + (1) front = 11; s=4: 9+9 + (1+4) = 23 -> 5 at shift 2
    loss, shifts = shift_agnostic_mse_loss(
        p,
        torch.tensor([[3.0, 3.0]], dtype=F64),
        int_weight=0,
        grad_penalty_weight=0,
        return_shifts=True,
    )
    assert shifts.tolist() == [2]
    assert float(loss) == 5.0


def test_hand_computed_integral_term():
    # aligned window [1, 2] vs t = [1, 4] at shift 2 (front 0): base (2-4)^2 = 4;
    # cumtrapz: 0.05*1.5=0.075 vs 0.05*2.5=0.125 -> (0.05)^2 over one point: trapz of a
    # single point is 0, so with n = 2 the integral term vanishes: use n = 3 instead
    p = torch.tensor([[1.0, 2.0, 3.0]], dtype=F64)
    t = torch.tensor([[1.0, 2.0, 5.0]], dtype=F64)
    loss, shifts = shift_agnostic_mse_loss(
        p, t, int_weight=1.0, grad_penalty_weight=0, return_shifts=True
    )
    # shift 3 (front 0): base 4; cumtrapz difference [0, 0.05*(3-5)/2] = [0, -0.05]
    # squared [0, 0.0025] weighted by m[1:] = 1; trapz = 0.05 * 0.0025 / 2
    assert shifts.tolist() == [3]
    assert float(loss) == pytest.approx(4 + 0.05 * 0.0025 / 2, abs=1e-15)


# -- the loop reference -----------------------------------------------------------------
@pytest.mark.parametrize(
    ("batch", "width", "n", "int_weight", "grad_weight"),
    [(4, 12, 9, 0.7, 0.3), (3, 10, 25, 2.0, 1e-2), (1, 8, 8, 1.0, 1.0), (5, 6, 2, 0.0, 0.5)],
)
def test_matches_loop_reference(batch, width, n, int_weight, grad_weight):
    pred, target = random_case(batch, width, n, seed=width + n)
    expected, expected_shifts = reference(pred, target, int_weight, grad_weight)
    loss, shifts = shift_agnostic_mse_loss(
        pred, target, int_weight=int_weight, grad_penalty_weight=grad_weight, return_shifts=True
    )
    assert shifts.tolist() == expected_shifts.tolist()
    torch.testing.assert_close(loss, expected, rtol=1e-10, atol=1e-12)
    aligned_shifts, aligned = shift_agnostic_alignment(pred, target)
    assert aligned_shifts.tolist() == expected_shifts.tolist()
    for b, s in enumerate(expected_shifts.tolist()):
        assert aligned[b].tolist() == padded_profile(pred[b])[s : s + n]


def test_gradients_match_autograd_through_the_reference_formula():
    pred, target = random_case(3, 9, 7, seed=3)
    pred.requires_grad_(True)
    loss = shift_agnostic_mse_loss(pred, target, int_weight=0.5, grad_penalty_weight=0.2)
    (grad,) = torch.autograd.grad(loss.sum(), pred)
    # finite differences of the reference (the chosen shift is stable under tiny steps)
    step = 1e-6
    numeric = torch.zeros_like(pred)
    for b in range(3):
        for i in range(9):
            for sign in (1, -1):
                moved = pred.detach().clone()
                moved[b, i] += sign * step
                numeric[b, i] += sign * float(reference(moved, target, 0.5, 0.2)[0].sum())
    torch.testing.assert_close(grad, numeric / (2 * step), rtol=1e-6, atol=1e-7)


def test_errors_name_the_problem():
    with pytest.raises(ValueError, match="at most 3 x 4"):
        shift_agnostic_mse_loss(
            torch.zeros(2, 4), torch.zeros(2, 13), int_weight=0, grad_penalty_weight=0
        )
    with pytest.raises(ValueError, match="requires parameter 'grad_penalty_weight'"):
        create_loss("shift_agnostic_mse", name=NAME, int_weight=0.0)
    with pytest.raises(ValueError, match=r"loss\.mtt::dos\.grad_penalty_weight"):
        expand_loss_config({NAME: {"type": "shift_agnostic_mse", "int_weight": 1.0}}, {NAME: {}})
    with pytest.raises(ValueError, match="cannot be used on a gradient"):
        create_loss(
            "shift_agnostic_mse",
            name="energy",
            gradient="positions",
            int_weight=0,
            grad_penalty_weight=0,
        )


def test_reductions_and_loss_module():
    pred, target = random_case(4, 10, 8, seed=7)
    per_structure = shift_agnostic_mse_loss(pred, target, int_weight=1.0, grad_penalty_weight=0.1)
    predictions, targets = {NAME: tensor_map(pred)}, {NAME: tensor_map(target)}
    params = {"int_weight": 1.0, "grad_penalty_weight": 0.1}
    for reduction, expected in (
        ("mean", per_structure.mean()),
        ("sum", per_structure.sum()),
        ("none", per_structure),
    ):
        term = create_loss("shift_agnostic_mse", name=NAME, reduction=reduction, **params)
        torch.testing.assert_close(term(predictions, targets), expected, rtol=1e-14, atol=0)
    config = {NAME: {"type": "shift_agnostic_mse", "weight": 2.0, **params}}
    module = LossModule(config, {NAME: {}})
    torch.testing.assert_close(module(predictions, targets), 2.0 * per_structure.mean())


# -- parity with metatrain -----------------------------------------------------------------
@pytest.fixture
def metatrain_in_float64(monkeypatch):
    """metatrain's ShiftAgnosticMSE casts its inputs (and its mask) with ``.float()`` and
    builds its stencil in the default dtype; for a float64 comparison the cast gives
    float64 and the default dtype is float64 while it runs."""
    loss_module = pytest.importorskip("metatrain.utils.loss")
    monkeypatch.setattr(torch.Tensor, "float", lambda self: self.to(F64))
    default = torch.get_default_dtype()
    torch.set_default_dtype(F64)

    def compute(pred, target, int_weight, grad_weight):
        loss = loss_module.ShiftAgnosticMSE(
            name=NAME,
            gradient=None,
            weight=1.0,
            int_weight=int_weight,
            grad_penalty_weight=grad_weight,
            reduction="mean",
        )
        return loss.compute({NAME: tensor_map(pred)}, {NAME: tensor_map(target)})

    yield compute
    torch.set_default_dtype(default)


@pytest.mark.parametrize(
    ("batch", "width", "n", "grad_weight"),
    [(4, 12, 9, 0.3), (3, 10, 25, 1e-2), (1, 8, 8, 1.0), (5, 7, 12, 0.0)],
)
def test_parity_with_metatrain_without_the_integral_term(
    metatrain_in_float64, batch, width, n, grad_weight
):
    """int_weight = 0: metatrain computes what it intends; values and gradients agree."""
    pred, target = random_case(batch, width, n, seed=10 * width + n)
    pred.requires_grad_(True)
    theirs = metatrain_in_float64(pred, target, 0.0, grad_weight)
    assert theirs.dtype == F64
    ours = shift_agnostic_mse_loss(pred, target, int_weight=0.0, grad_penalty_weight=grad_weight)
    torch.testing.assert_close(ours.mean(), theirs, rtol=1e-10, atol=1e-12)
    (grad_theirs,) = torch.autograd.grad(theirs, pred)
    (grad_ours,) = torch.autograd.grad(ours.mean(), pred)
    torch.testing.assert_close(grad_ours, grad_theirs, rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("batch", [1, 3])
def test_metatrain_integral_term_integrates_over_the_batch_axis(metatrain_in_float64, batch):
    """metatrain's integral term is ``trapz over the BATCH axis`` of ``int_error[j, k] *
    mask[i, k + 1]`` (broadcast (B, 1, n-1) x (B, n-1)), averaged: 0 for one structure.
    pl_mtt integrates over the points of each structure (the intended term)."""
    pred, target = random_case(batch, 9, 7, seed=batch)
    int_weight = 2.0
    without = metatrain_in_float64(pred, target, 0.0, 0.4)
    with_integral = metatrain_in_float64(pred, target, int_weight, 0.4)
    rows = [reference_one(pred[b], target[b], int_weight, 0.4) for b in range(batch)]
    shifts = [r[1] for r in rows]
    # metatrain's term, reproduced: int_error (B, n-1), mask[:, 1:] (B, n-1)
    int_error = torch.stack(
        [
            (
                torch.tensor(cumtrapz(padded_profile(pred[b])[shifts[b] : shifts[b] + 7]))
                - torch.tensor(cumtrapz(torch.nan_to_num(target[b]).tolist()))
            )
            ** 2
            for b in range(batch)
        ]
    ).to(F64)
    mask = (~torch.isnan(target)).to(F64)[:, 1:]
    broadcast = int_error * mask.unsqueeze(1)  # [i, j, k] = int_error[j, k] * mask[i, k]
    buggy = torch.trapezoid(broadcast, dx=H, dim=1).mean()
    torch.testing.assert_close(with_integral - without, int_weight * buggy, rtol=1e-10, atol=1e-14)
    if batch == 1:
        assert float(with_integral - without) == 0.0
    intended = torch.tensor([r[4] for r in rows], dtype=F64).mean()
    assert float(intended) > 0.0  # what pl_mtt adds instead
    ours = shift_agnostic_mse_loss(pred, target, int_weight=int_weight, grad_penalty_weight=0.4)
    torch.testing.assert_close(ours.mean() - without, int_weight * intended, rtol=1e-9, atol=1e-13)
