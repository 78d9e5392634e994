"""LossModule and ensemble CRPS versus naive spec-derived implementations.

.. code-block:: bash

    python benchmarks/bench_losses.py            # CPU
    python benchmarks/bench_losses.py --quick    # small sizes (smoke test)

Cases (forward + backward each):

- ``mlip``: energy + forces + stress ``mse`` on 32 systems x 64 atoms (float64), NaN
  stress for a quarter of the systems. Naive: per term, flatten and concatenate the
  blocks, drop NaN targets by boolean indexing, ``torch.nn.functional.mse_loss``, then
  the weighted sum. Ours: ``pl_mtt.LossModule``. Each step ends by setting the
  gradients to None, as ``optimizer.zero_grad()`` does. Measured twice: with torch's default
  thread count and with one torch thread for both sides (a step is a few dozen small
  operations; on a shared machine a stalled pool thread makes each of them wait).
  Where the time goes in ours: reading the TensorMap values (one TorchScript call for
  both maps), the layout-signature checks, one autograd node for the three fused terms
  (about six small operations per term), the weighted sum, and ``backward()``'s fixed
  engine cost; the naive step pays the boolean indexing and three times as many
  autograd nodes. A third row times the functional core alone (values read,
  ``pointwise_segment_sums``, the weighted sum; no checks, no bookkeeping): the
  LossModule's own layer costs the difference between the two rows. A fourth row
  times a bare lower bound in place of pl_mtt: one autograd Function doing the least
  any fused implementation must (mse only, no masks, checks or bookkeeping).
- ``empirical_crps``: ``B = 20,000`` targets with ``M = 64`` and ``256`` members
  (float32). Naive: the spec's formula with the ``M x M`` matrix of pairwise
  differences (about 16 GB of memory at ``M = 256``). Ours: the sorted-member form.
"""

from __future__ import annotations

import sys
from pathlib import Path

import torch
from metatensor.torch import Labels, TensorBlock, TensorMap

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from harness import Case, main_for, one_thread, parse_args

from pl_mtt.loss_module import LossModule
from pl_mtt.losses.base import read_values
from pl_mtt.losses.functional.ensemble import empirical_crps
from pl_mtt.losses.functional.pointwise import pointwise_segment_sums

MLIP_LOSS = {"energy": {"type": "mse", "forces": "mse", "stress": "mse"}}
MLIP_TARGETS = {"energy": {"quantity": "energy", "forces": True, "stress": True}}


def _labels(names: list[str], values: torch.Tensor, device: torch.device) -> Labels:
    return Labels(names, values.to(torch.int32).reshape(-1, len(names)).to(device))


def _energy_map(values, forces, strain, n_systems, n_atoms, device) -> TensorMap:
    system = torch.arange(n_systems).repeat_interleave(n_atoms)
    atom = torch.arange(n_atoms).repeat(n_systems)
    properties = _labels(["energy"], torch.tensor([0]), device)
    block = TensorBlock(
        values, _labels(["system"], torch.arange(n_systems), device), [], properties
    )
    block.add_gradient(
        "positions",
        TensorBlock(
            forces,
            _labels(["sample", "system", "atom"], torch.stack([system, system, atom], 1), device),
            [_labels(["xyz"], torch.arange(3), device)],
            properties,
        ),
    )
    block.add_gradient(
        "strain",
        TensorBlock(
            strain,
            _labels(["sample"], torch.arange(n_systems), device),
            [
                _labels(["xyz_1"], torch.arange(3), device),
                _labels(["xyz_2"], torch.arange(3), device),
            ],
            properties,
        ),
    )
    return TensorMap(_labels(["_"], torch.tensor([0]), device), [block])


def naive_mlip_loss(predictions, targets, config) -> torch.Tensor:
    """The spec, literally: flatten, concatenate, drop NaN targets, torch loss."""
    total = 0.0
    for target_name, entry in config.items():
        terms = [(None, entry), *entry["gradients"].items()]
        for gradient, term in terms:

            def flat(tensor_map, gradient=gradient):
                blocks = tensor_map.blocks()
                if gradient is not None:
                    blocks = [block.gradient(gradient) for block in blocks]
                return torch.cat([block.values.reshape(-1) for block in blocks])

            prediction = flat(predictions[target_name])
            target = flat(targets[target_name])
            keep = ~torch.isnan(target)
            loss = torch.nn.functional.mse_loss(
                prediction[keep], target[keep], reduction=term["reduction"]
            )
            total = total + term["weight"] * loss
    return total


def _mlip_segments(predictions, targets) -> tuple[list, list]:
    """The energy, position-gradient and strain-gradient values of predictions and
    targets (single-block maps), read without creating block objects."""
    p_values, p_gradients = read_values(predictions["energy"])
    t_values, t_gradients = read_values(targets["energy"])
    gradients = ("positions", "strain")
    return (
        [p_values[0], *(p_gradients[g][0] for g in gradients)],
        [t_values[0], *(t_gradients[g][0] for g in gradients)],
    )


def core_mlip_loss(predictions, targets) -> torch.Tensor:
    """What remains of the LossModule step without its checks and bookkeeping: the
    values read, the fused core, the weighted sum (all weights 1, means)."""
    sums, counts = pointwise_segment_sums(*_mlip_segments(predictions, targets))
    return (sums / counts.clamp(min=1)).sum()


class _BareMeanSquares(torch.autograd.Function):
    """A lower bound for any fused implementation: mse only, no masks, no checks, no
    bookkeeping, one autograd node. Per segment: difference, NaN entries zeroed, dot
    product, kept count, mean; then the total."""

    @staticmethod
    def forward(ctx, n_segments: int, *tensors: torch.Tensor) -> torch.Tensor:
        means, ctx.differences, ctx.kept = [], [], []
        for prediction, target in zip(tensors[:n_segments], tensors[n_segments:], strict=True):
            nan = torch.isnan(target)
            difference = (prediction - target).masked_fill_(nan, 0.0).view(-1)
            kept = torch.rsub(torch.count_nonzero(nan), nan.numel()).clamp_(min=1)
            means.append(torch.dot(difference, difference) / kept)
            ctx.differences.append(difference.view(prediction.shape))
            ctx.kept.append(kept)
        return torch.stack(means).sum()

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        grads = [d * (2 * grad / k) for d, k in zip(ctx.differences, ctx.kept, strict=True)]
        return None, *grads, *([None] * len(grads))


def bare_mlip_loss(predictions, targets) -> torch.Tensor:
    """The values read as in :func:`core_mlip_loss`, then :class:`_BareMeanSquares`."""
    prediction_values, target_values = _mlip_segments(predictions, targets)
    return _BareMeanSquares.apply(len(prediction_values), *prediction_values, *target_values)


VARIANTS = {
    "module": ("", None),
    "core": (", pl_mtt: functional core only", core_mlip_loss),
    "bare": (", bare lower bound instead of pl_mtt", bare_mlip_loss),
}
"""MLIP rows, name -> (case-name suffix, loss; None: the LossModule): the LossModule,
its functional core alone, the bare lower bound."""


def mlip_case(
    device: torch.device, quick: bool, single_thread: bool = False, variant: str = "module"
) -> Case:
    n_systems, n_atoms = (4, 8) if quick else (32, 64)
    generator = torch.Generator().manual_seed(0)
    dtype = torch.float64

    def rand(*shape):
        return torch.randn(*shape, generator=generator, dtype=dtype).to(device)

    leaves = [rand(n_systems, 1), rand(n_systems * n_atoms, 3, 1), rand(n_systems, 3, 3, 1)]
    for leaf in leaves:
        leaf.requires_grad_(True)
    target_strain = rand(n_systems, 3, 3, 1)
    target_strain[: n_systems // 4] = float("nan")  # non-periodic systems
    predictions = {"energy": _energy_map(*leaves, n_systems, n_atoms, device)}
    targets = {
        "energy": _energy_map(
            rand(n_systems, 1),
            rand(n_systems * n_atoms, 3, 1),
            target_strain,
            n_systems,
            n_atoms,
            device,
        )
    }
    module = LossModule(MLIP_LOSS, MLIP_TARGETS).to(device)
    suffix, loss = VARIANTS[variant]
    loss = loss or module

    def set_gradients_to_none():  # what optimizer.zero_grad() does every training step
        for leaf in leaves:
            leaf.grad = None

    def baseline():
        naive_mlip_loss(predictions, targets, module.config).backward()
        set_gradients_to_none()

    def ours():
        loss(predictions, targets).backward()
        set_gradients_to_none()

    torch.testing.assert_close(
        loss(predictions, targets), naive_mlip_loss(predictions, targets, module.config)
    )
    suffix = (", 1 thread" if single_thread else "") + suffix
    if single_thread:
        baseline, ours = one_thread(baseline), one_thread(ours)
    return Case(
        "losses",
        f"mlip E+F+S mse fwd+bwd ({n_systems}x{n_atoms} atoms, float64{suffix})",
        baseline,
        ours,
        target="≥ 3× (CPU)",
        repeats=200,
        warmup=20,
    )


def pairwise_empirical_crps(members: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """The spec's formula with the M x M matrix of pairwise differences."""
    n_members = members.shape[-1]
    spread = (members.unsqueeze(-1) - members.unsqueeze(-2)).abs().sum((-1, -2))
    return (members - target.unsqueeze(-1)).abs().mean(-1) - spread / (2 * n_members**2)


def crps_case(device: torch.device, quick: bool, n_members: int) -> Case:
    batch = 500 if quick else 20_000
    generator = torch.Generator().manual_seed(1)
    dtype = torch.float32
    members = torch.randn(batch, n_members, generator=generator, dtype=dtype).to(device)
    members.requires_grad_(True)
    target = torch.randn(batch, generator=generator, dtype=dtype).to(device)

    def baseline():
        pairwise_empirical_crps(members, target).mean().backward()

    def ours():
        empirical_crps(members, target).mean().backward()

    torch.testing.assert_close(
        empirical_crps(members, target),
        pairwise_empirical_crps(members, target),
        rtol=1e-4,
        atol=1e-4,
    )
    return Case(
        "losses",
        f"empirical CRPS fwd+bwd B={batch} M={n_members} (float32)",
        baseline,
        ours,
        target="≥ 10× at M=256, O(B·M) memory",
        # the naive M=256 step takes ~30 s and ~16 GB on a CPU: few repeats
        repeats=2 if n_members > 64 and not quick else 5,
        warmup=0 if n_members > 64 and not quick else 1,
    )


def cases(device: torch.device, quick: bool) -> list[Case]:
    mlip = [mlip_case(device, quick)]
    if device.type == "cpu":
        mlip.append(mlip_case(device, quick, single_thread=True))
    mlip += [mlip_case(device, quick, variant=variant) for variant in ("core", "bare")]
    return [*mlip, crps_case(device, quick, 64), crps_case(device, quick, 256)]


_FRESH_PROCESS_STEP = """
import sys, torch
sys.path.insert(0, {root!r})
from bench_losses import empirical_crps, pairwise_empirical_crps
from harness import _rss_bytes, _reset_peak_rss
members = torch.randn({batch}, {members}, requires_grad=True)
target = torch.randn({batch})
loss = {function}
_reset_peak_rss()
before = _rss_bytes("VmRSS")
loss(members, target).mean().backward()
print(_rss_bytes("VmHWM") - before)
"""


def extra_report(device: torch.device, quick: bool) -> str:
    """CPU peak memory of one empirical-CRPS step, each in a fresh process.

    In the side-by-side table the sorted form runs after the naive one, in a process
    whose allocator already holds freed pages, so its resident-set peak reads ~0; a
    fresh process shows what it really needs (inputs excluded)."""
    if device.type != "cpu":
        return ""
    import subprocess

    batch = 500 if quick else 20_000
    rows = [
        "",
        "Empirical CRPS fwd+bwd, peak extra resident memory in a fresh process "
        f"(B={batch}, float32; inputs are {batch} x M x 4 bytes):",
        "",
        "| M | pl_mtt (sorted) | naive (pairwise) |",
        "|---|---|---|",
    ]
    for n_members in (64, 256):
        cells = []
        for function in ("empirical_crps", "pairwise_empirical_crps"):
            if function == "pairwise_empirical_crps" and n_members > 64 and not quick:
                cells.append("see the table above")
                continue
            code = _FRESH_PROCESS_STEP.format(
                root=str(Path(__file__).resolve().parent),
                batch=batch,
                members=n_members,
                function=function,
            )
            result = subprocess.run(
                [sys.executable, "-c", code], capture_output=True, text=True, check=True
            )
            cells.append(f"{int(result.stdout.split()[-1]) / 2**20:.1f} MiB")
        rows.append(f"| {n_members} | {cells[0]} | {cells[1]} |")
    return "\n".join(rows)


if __name__ == "__main__":
    main_for(cases, "pl_mtt losses versus naive spec-derived implementations")
    print(extra_report(torch.device(parse_args("").device), parse_args("").quick))
