"""Ensemble scoring rules (Gaussian NLL, Gaussian CRPS, empirical CRPS) on LLPR outputs."""

from __future__ import annotations

import math

import pytest
import torch
from metatensor.torch import Labels, TensorBlock, TensorMap

from pl_mtt.losses import create_loss
from pl_mtt.losses.functional.ensemble import (
    empirical_crps,
    ensemble_loss,
    ensemble_mean_and_variance,
    ensemble_sum_and_count,
    gaussian_crps,
    gaussian_nll,
)
from tests.scripts.losses_data import (
    energy_map,
    labels,
    map_like,
    multi_block_map,
    random_energy,
    with_nans,
)

N_ATOMS = [3, 2, 4]
TYPES = ["gaussian_nll_ensemble", "gaussian_crps_ensemble", "empirical_crps_ensemble"]


# --- reference, written from the spec formulas with loops -------------------------------
def mean_var(xs):
    mu = sum(xs) / len(xs)
    return mu, sum((x - mu) ** 2 for x in xs) / (len(xs) - 1)


def nll_reference(xs, y):
    mu, var = mean_var(xs)
    var = max(var, 1e-6)
    return 0.5 * (math.log(var) + (mu - y) ** 2 / var)


def gaussian_crps_reference(xs, y):
    mu, var = mean_var(xs)
    sigma = math.sqrt(max(var, 1e-12))
    z = (y - mu) / sigma
    cdf = 0.5 * (1 + math.erf(z / math.sqrt(2)))
    pdf = math.exp(-0.5 * z * z) / math.sqrt(2 * math.pi)
    # the non-negative CRPS (DESIGN decision 1): minus the spec's expression
    return -sigma * (1 / math.sqrt(math.pi) - 2 * pdf - z * (2 * cdf - 1))


def empirical_reference(xs, y):
    m = len(xs)
    spread = sum(abs(a - b) for a in xs for b in xs)
    return sum(abs(x - y) for x in xs) / m - spread / (2 * m * m)


REFERENCES = {
    "gaussian_nll_ensemble": nll_reference,
    "gaussian_crps_ensemble": gaussian_crps_reference,
    "empirical_crps_ensemble": empirical_reference,
}


def reference(type_, ensemble, target, gradient=None, reduction="mean"):
    """Loop over blocks, rows, components and properties; member m of property p is
    property ``m * P + p`` of the ensemble output."""
    score = REFERENCES[type_]
    total, count = 0.0, 0
    for i in range(len(target)):
        e_block, t_block = ensemble.block_by_id(i), target.block_by_id(i)
        if gradient is not None:
            e_block, t_block = e_block.gradient(gradient), t_block.gradient(gradient)
        n_properties = t_block.values.shape[-1]
        e = e_block.values.detach().reshape(-1, e_block.values.shape[-1]).tolist()
        t = t_block.values.detach().reshape(-1, n_properties).tolist()
        n_members = len(e[0]) // n_properties
        for row in range(len(t)):
            for p in range(n_properties):
                y = t[row][p]
                if math.isnan(y):
                    continue
                xs = [e[row][m * n_properties + p] for m in range(n_members)]
                total += score(xs, y)
                count += 1
    if reduction == "sum":
        return total
    return total / count if count else 0.0


def ensemble_of(tensor_map, n_members, generator, spread=1.0):
    """A member-major ensemble around ``tensor_map``'s values."""

    def members(values):
        noise = torch.randn(
            *values.shape[:-1],
            n_members,
            values.shape[-1],
            generator=generator,
            dtype=values.dtype,
        )
        return (values.detach().unsqueeze(-2) + spread * noise).reshape(
            *values.shape[:-1], n_members * values.shape[-1]
        )

    blocks = []
    for block in tensor_map.blocks():
        n_properties = len(block.properties)
        properties = labels(["member_property"], torch.arange(n_members * n_properties))
        new = TensorBlock(members(block.values), block.samples, block.components, properties)
        for name, gradient in block.gradients():
            new.add_gradient(
                name,
                TensorBlock(
                    members(gradient.values), gradient.samples, gradient.components, properties
                ),
            )
        blocks.append(new)
    return TensorMap(tensor_map.keys, blocks)


@pytest.fixture
def generator():
    return torch.Generator().manual_seed(99)


# --- TensorMap terms against the reference -------------------------------------------------
@pytest.mark.parametrize("type_", TYPES)
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
def test_matches_loop_reference(generator, type_, reduction, target_kind, gradient):
    if target_kind == "multi_block":
        name, target = "mtt::x", multi_block_map(N_ATOMS, generator)
    else:
        name, target = "energy", random_energy(N_ATOMS, generator, n_properties=2)
    ensemble = ensemble_of(target, 5, generator)
    target = with_nans(target, generator, fraction=0.25)
    output = "mtt::aux::x_ensemble" if name == "mtt::x" else "energy_ensemble"
    term = create_loss(type_, name=name, gradient=gradient, reduction=reduction)
    value = term({output: ensemble}, {name: target})
    expected = reference(type_, ensemble, target, gradient, reduction)
    assert value.item() == pytest.approx(expected, rel=1e-10, abs=1e-12)


@pytest.mark.parametrize("type_", TYPES)
def test_float32(generator, type_):
    target = multi_block_map(N_ATOMS, generator, dtype=torch.float32)
    ensemble = ensemble_of(target, 3, generator)
    value = create_loss(type_, name="t")({"mtt::aux::t_ensemble": ensemble}, {"t": target})
    assert value.dtype == torch.float32
    assert value.item() == pytest.approx(reference(type_, ensemble, target), rel=1e-5)


# --- small hand-computed cases ---------------------------------------------------------------
def test_hand_computed():
    members = torch.tensor([[-1.0, 1.0], [0.0, 2.0]], dtype=torch.float64)
    target = torch.tensor([0.0, 1.0], dtype=torch.float64)
    # mean 0 / 1, unbiased variance 2, y = mu: NLL = log(2) / 2
    nll = ensemble_loss(members, target, kind="gaussian_nll", reduction="sum")
    assert nll.item() == pytest.approx(math.log(2.0), abs=1e-15)
    # CRPS at z = 0: sigma * (2 phi(0) - 1/sqrt(pi)) = sqrt(2) (sqrt(2) - 1) / sqrt(pi)
    crps = ensemble_loss(members, target, kind="gaussian_crps")
    assert crps.item() == pytest.approx((2 - math.sqrt(2)) / math.sqrt(math.pi), abs=1e-15)
    # empirical: mean |x - y| = 1, sum |x_j - x_k| = 4 -> 1 - 4 / 8
    emp = ensemble_loss(members, target, kind="empirical_crps")
    assert emp.item() == pytest.approx(0.5, abs=1e-15)


def test_mean_and_unbiased_variance():
    members = torch.tensor([[1.0, 2.0, 6.0]], dtype=torch.float64)
    mean, variance = ensemble_mean_and_variance(members)
    assert mean.item() == 3.0
    assert variance.item() == pytest.approx((4 + 1 + 9) / 2)


def test_nan_targets_are_ignored_with_finite_gradients():
    generator = torch.Generator().manual_seed(12)
    members = torch.randn(6, 4, dtype=torch.float64, generator=generator, requires_grad=True)
    target = torch.randn(6, dtype=torch.float64, generator=generator)
    target[[1, 4]] = float("nan")
    for kind in ("gaussian_nll", "gaussian_crps", "empirical_crps"):
        total, count = ensemble_sum_and_count(members, target, kind=kind)
        keep = ~torch.isnan(target)
        expected, _ = ensemble_sum_and_count(members[keep], target[keep], kind=kind)
        assert count.item() == 4
        # a sum of terms of both signs (NLL): rounding is relative to the terms, not the sum
        torch.testing.assert_close(total, expected, rtol=1e-14, atol=1e-15)
        (grad,) = torch.autograd.grad(total, members)
        assert torch.isfinite(grad).all()
        assert torch.equal(grad[[1, 4]], torch.zeros(2, 4, dtype=torch.float64))


def test_all_nan_is_exact_zero_with_gradient_path():
    members = torch.randn(3, 4, dtype=torch.float64, requires_grad=True)
    target = torch.full((3,), float("nan"), dtype=torch.float64)
    for kind in ("gaussian_nll", "gaussian_crps", "empirical_crps"):
        value = ensemble_loss(members, target, kind=kind)
        assert value.item() == 0.0
        (grad,) = torch.autograd.grad(value, members)
        assert torch.equal(grad, torch.zeros_like(members))


# --- empirical CRPS: sorted form == pairwise form ------------------------------------------
def pairwise(members, target):
    m = members.shape[-1]
    spread = (members.unsqueeze(-1) - members.unsqueeze(-2)).abs().sum((-1, -2))
    return (members - target.unsqueeze(-1)).abs().mean(-1) - spread / (2 * m * m)


@pytest.mark.parametrize("n_members", [1, 2, 7, 64])
def test_empirical_crps_equals_pairwise_formula(n_members):
    generator = torch.Generator().manual_seed(n_members)
    members = torch.randn(50, n_members, generator=generator, dtype=torch.float64)
    target = torch.randn(50, generator=generator, dtype=torch.float64)
    # ties: rounded members repeat values; a few targets equal to members
    tied = (members * 2).round() / 2
    tied_target = target.clone()
    tied_target[:10] = tied[:10, 0]
    torch.testing.assert_close(
        empirical_crps(tied, tied_target), pairwise(tied, tied_target), rtol=1e-12, atol=1e-14
    )
    for row in range(5):
        xs, y = tied[row].tolist(), tied_target[row].item()
        assert empirical_crps(tied[row], tied_target[row]).item() == pytest.approx(
            empirical_reference(xs, y), abs=1e-12
        )
    # gradients on tie-free data
    members.requires_grad_(True)
    target.requires_grad_(True)
    ours = torch.autograd.grad(empirical_crps(members, target).sum(), (members, target))
    theirs = torch.autograd.grad(pairwise(members, target).sum(), (members, target))
    for a, b in zip(ours, theirs, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-14)


def test_empirical_crps_one_member_is_absolute_error():
    members = torch.tensor([[1.5], [-2.0]], dtype=torch.float64)
    target = torch.tensor([0.5, 1.0], dtype=torch.float64)
    torch.testing.assert_close(
        empirical_crps(members, target), torch.tensor([1.0, 3.0], dtype=torch.float64)
    )


def test_empirical_crps_member_dim():
    generator = torch.Generator().manual_seed(3)
    members = torch.randn(4, 6, 3, generator=generator, dtype=torch.float64)
    target = torch.randn(4, 3, generator=generator, dtype=torch.float64)
    torch.testing.assert_close(
        empirical_crps(members, target, member_dim=1),
        empirical_crps(members.transpose(1, 2), target),
    )


# --- Gaussian scores ---------------------------------------------------------------------------
@pytest.mark.parametrize(
    ("mu", "sigma", "y"), [(0.0, 1.0, 0.3), (2.0, 0.5, -1.0), (-1.0, 3.0, 4.0), (0.5, 1e-3, 0.5007)]
)
def test_gaussian_crps_equals_integral_of_definition(mu, sigma, y):
    """CRPS = integral of (F(x) - 1{x >= y})^2 dx, by the trapezoid rule on each side of y."""
    normal = torch.distributions.Normal(
        torch.tensor(mu, dtype=torch.float64), torch.tensor(sigma, dtype=torch.float64)
    )
    low, high = min(mu - 14 * sigma, y), max(mu + 14 * sigma, y)
    left = torch.linspace(low, y, 200_001, dtype=torch.float64)
    right = torch.linspace(y, high, 200_001, dtype=torch.float64)
    integral = torch.trapezoid(normal.cdf(left) ** 2, left) + torch.trapezoid(
        (normal.cdf(right) - 1) ** 2, right
    )
    value = gaussian_crps(
        torch.tensor(mu, dtype=torch.float64),
        torch.tensor(sigma**2, dtype=torch.float64),
        torch.tensor(y, dtype=torch.float64),
    )
    assert value.item() >= 0
    assert value.item() == pytest.approx(integral.item(), rel=1e-8)


def test_gaussian_crps_variance_floor():
    mean = torch.tensor([1.0], dtype=torch.float64)
    value = gaussian_crps(mean, torch.zeros(1, dtype=torch.float64), mean + 0.25)
    # sigma = 1e-6: the CRPS tends to |y - mu|
    assert value.item() == pytest.approx(0.25, rel=1e-5)
    assert torch.isfinite(value).all()


def test_gaussian_nll_matches_torch(generator):
    members = torch.randn(20, 4, generator=generator, dtype=torch.float64)
    members[:3] = 0.7  # zero variance: clamped to eps like torch
    members[3, :] = torch.tensor([0.0, 0.0, 0.0, 1e-4])
    members.requires_grad_(True)
    target = torch.randn(20, generator=generator, dtype=torch.float64)
    ours = ensemble_loss(members, target, kind="gaussian_nll")
    mean, variance = members.mean(-1), members.var(-1)
    theirs = torch.nn.GaussianNLLLoss()(mean, target, variance)
    torch.testing.assert_close(ours, theirs, rtol=1e-14, atol=0)
    ours_grad = torch.autograd.grad(ours, members)[0]
    theirs_grad = torch.autograd.grad(theirs, members)[0]
    torch.testing.assert_close(ours_grad, theirs_grad, rtol=1e-12, atol=1e-14)
    direct = gaussian_nll(mean.detach(), variance.detach(), target)
    torch.testing.assert_close(direct.mean(), theirs.detach(), rtol=1e-14, atol=0)


# --- gradients ------------------------------------------------------------------------------
@pytest.mark.parametrize("type_", TYPES)
@pytest.mark.parametrize("gradient", [None, "positions"])
def test_gradcheck(generator, type_, gradient):
    target = with_nans(multi_block_map([2, 1], generator), generator, fraction=0.2)
    ensemble = ensemble_of(multi_block_map([2, 1], generator), 3, generator)
    tensors = []
    for block in ensemble.blocks():
        tensors.append(block.values.detach().clone().requires_grad_(True))
        for _, gradient_block in block.gradients():
            tensors.append(gradient_block.values.detach().clone().requires_grad_(True))
    term = create_loss(type_, name="t", gradient=gradient)

    def loss(*leaves):
        remaining = iter(leaves)
        rebuilt = map_like(ensemble, lambda _: next(remaining))
        return term({"mtt::aux::t_ensemble": rebuilt}, {"t": target})

    assert torch.autograd.gradcheck(loss, tensors, fast_mode=True)


@pytest.mark.parametrize("kind", ["gaussian_nll", "gaussian_crps", "empirical_crps"])
def test_functional_gradcheck_including_target(kind):
    generator = torch.Generator().manual_seed(5)
    members = torch.randn(4, 5, generator=generator, dtype=torch.float64, requires_grad=True)
    target = torch.randn(4, generator=generator, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(
        lambda m, t: ensemble_loss(m, t, kind=kind, reduction="sum"), (members, target)
    )


def test_functional_compiles_fullgraph():
    def all_kinds(members, target):
        results = []
        for kind in ("gaussian_nll", "gaussian_crps", "empirical_crps"):
            results.extend(ensemble_sum_and_count(members, target, kind=kind, member_dim=-2))
        return results

    generator = torch.Generator().manual_seed(0)
    members = torch.randn(30, 8, 2, generator=generator, dtype=torch.float64)
    target = torch.randn(30, 2, generator=generator, dtype=torch.float64)
    target[::4, 0] = float("nan")
    compiled = torch.compile(all_kinds, fullgraph=True, backend="aot_eager")
    for got, expected in zip(compiled(members, target), all_kinds(members, target), strict=True):
        torch.testing.assert_close(got, expected, rtol=1e-12, atol=0)


# --- bad inputs ---------------------------------------------------------------------------------
def test_missing_ensemble_output(generator):
    target = random_energy(N_ATOMS, generator)
    term = create_loss("empirical_crps_ensemble", name="energy")
    with pytest.raises(ValueError, match=r"'energy_ensemble' is missing from predictions"):
        term({"energy": target}, {"energy": target})
    term = create_loss("gaussian_nll_ensemble", name="mtt::dipole")
    with pytest.raises(ValueError, match=r"'mtt::aux::dipole_ensemble' is missing"):
        term({"mtt::dipole": target}, {"mtt::dipole": target})


@pytest.mark.parametrize("type_", ["gaussian_nll_ensemble", "gaussian_crps_ensemble"])
def test_gaussian_needs_two_members(generator, type_):
    target = random_energy(N_ATOMS, generator, n_properties=2)
    ensemble = ensemble_of(target, 1, generator)
    term = create_loss(type_, name="energy")
    with pytest.raises(ValueError, match=r"needs at least 2 ensemble members.*has 1"):
        term({"energy_ensemble": ensemble}, {"energy": target})


def test_empirical_crps_accepts_one_member(generator):
    target = random_energy(N_ATOMS, generator, gradients=False)
    ensemble = ensemble_of(target, 1, generator)
    value = create_loss("empirical_crps_ensemble", name="energy")(
        {"energy_ensemble": ensemble}, {"energy": target}
    )
    mae = (ensemble.block_by_id(0).values - target.block_by_id(0).values).abs().mean()
    assert value.item() == pytest.approx(mae.item(), rel=1e-14)


def test_property_count_not_a_multiple(generator):
    target = random_energy(N_ATOMS, generator, n_properties=2, gradients=False)
    ensemble = random_energy(N_ATOMS, generator, n_properties=5, gradients=False)
    term = create_loss("empirical_crps_ensemble", name="energy")
    with pytest.raises(ValueError, match=r"block 0 \(key _=0\).*5 properties, expected M x 2"):
        term({"energy_ensemble": ensemble}, {"energy": target})


def test_sample_count_mismatch(generator):
    target = random_energy(N_ATOMS, generator)
    ensemble = ensemble_of(random_energy([1, 1], generator), 4, generator)
    term = create_loss("gaussian_crps_ensemble", name="energy", gradient="positions")
    with pytest.raises(
        ValueError,
        match=r"gradient 'positions' of target 'energy'.*"
        r"'energy_ensemble' has 2 samples, the target 9",
    ):
        term({"energy_ensemble": ensemble}, {"energy": target})


def test_ensemble_without_the_gradient(generator):
    target = random_energy(N_ATOMS, generator)
    ensemble = ensemble_of(random_energy(N_ATOMS, generator, gradients=False), 4, generator)
    term = create_loss("empirical_crps_ensemble", name="energy", gradient="positions")
    with pytest.raises(
        ValueError,
        match=r"ensemble output 'energy_ensemble' has no gradient "
        r"'positions'",
    ):
        term({"energy_ensemble": ensemble}, {"energy": target})


def test_dtype_mismatch(generator):
    target = random_energy(N_ATOMS, generator)
    ensemble = ensemble_of(random_energy(N_ATOMS, generator, dtype=torch.float32), 3, generator)
    term = create_loss("gaussian_nll_ensemble", name="energy")
    with pytest.raises(
        ValueError,
        match=r"ensemble output 'energy_ensemble' \(torch.float32, cpu\) and target "
        r"\(torch.float64, cpu\) differ in dtype or device",
    ):
        term({"energy_ensemble": ensemble}, {"energy": target})


def test_mismatched_keys(generator):
    target = multi_block_map(N_ATOMS, generator)
    ensemble = ensemble_of(target, 3, generator)
    block = ensemble.block_by_id(0).copy()
    wrong = TensorMap(labels(["o3_lambda"], [[5]]), [block])
    term = create_loss("empirical_crps_ensemble", name="t")
    with pytest.raises(ValueError, match=r"target 't'.*keys.*differ"):
        term({"mtt::aux::t_ensemble": wrong}, {"t": target})


def test_member_major_layout_matters():
    """Property index m * P + p is member m of property p (not p * M + m)."""
    target = energy_map(torch.tensor([[0.0, 10.0]], dtype=torch.float64), [1])
    # members of property 0: (-1, 1); of property 1: (10, 12)
    values = torch.tensor([[-1.0, 10.0, 1.0, 12.0]], dtype=torch.float64)
    block = TensorBlock(
        values,
        target.block_by_id(0).samples,
        [],
        Labels(["member"], torch.arange(4).reshape(-1, 1)),
    )
    ensemble = TensorMap(target.keys, [block])
    value = create_loss("empirical_crps_ensemble", name="energy", reduction="sum")(
        {"energy_ensemble": ensemble}, {"energy": target}
    )
    expected = empirical_reference([-1.0, 1.0], 0.0) + empirical_reference([10.0, 12.0], 10.0)
    assert value.item() == pytest.approx(expected, abs=1e-15)
