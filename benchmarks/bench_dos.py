"""masked_dos: FFT shift search + one gather vs the spec transcribed directly.

The naive baseline is what a direct transcription of the spec writes (and what the
public PET-MAD-DOS training code does): unfold all shifts into a ``(B, shifts, n)``
tensor, take the minimum of the masked integrated error over shifts with autograd
through it, then gather each structure's aligned window in a Python loop for the
gradient and cumulative terms. Sizes: PET-MAD-DOS scale, ``n + extra_targets = 4806``,
``extra_targets = 200``, float32, forward + backward. On CUDA a third case runs the
core compiled (``torch.compile(fullgraph=True, mode="reduce-overhead")``, what
``LossModule.compile_cores("reduce-overhead")`` does): eager, the step is launch-bound.

.. code-block:: bash

    python benchmarks/bench_dos.py [--device cuda] [--quick]
"""

from __future__ import annotations

import sys
from pathlib import Path

import torch

HERE = Path(__file__).resolve().parent
sys.path[:0] = [str(HERE), str(HERE.parent)]  # the harness; this checkout of pl_mtt

from harness import Case, main_for  # noqa: E402

from pl_mtt.losses.functional.dos import masked_dos_loss  # noqa: E402

GRID_SPACING = 0.05
GRAD_WEIGHT = 1e-4
INT_WEIGHT = 2.0
TARGET = "≥50× faster at B=64, ≤0.1× memory (CPU); ≤1 ms (H100)"


def naive_dos_loss(
    pred: torch.Tensor, target: torch.Tensor, mask: torch.Tensor, extra_targets: int
) -> torch.Tensor:
    """The spec's three terms, all shifts materialised, per-structure window loop (mean)."""
    n = target.shape[1]
    x = torch.arange(n, dtype=pred.dtype, device=pred.device) * GRID_SPACING
    mask = mask.to(pred.dtype)
    windows = pred.unfold(1, n, 1)  # (B, extra_targets + 1, n)
    errors = torch.trapezoid((windows - target[:, None, :]) ** 2 * mask[:, None, :], x=x, dim=-1)
    masked, shifts = errors.min(dim=1)
    aligned = torch.stack(
        [pred[i, int(shifts[i]) : int(shifts[i]) + n] for i in range(pred.shape[0])]
    )
    slope = torch.gradient(aligned, spacing=(x,), dim=1)[0]
    smooth = torch.trapezoid(slope**2 * (1 - mask), x=x, dim=1)
    cumulative = torch.cumulative_trapezoid(aligned, x=x, dim=1) - torch.cumulative_trapezoid(
        target, x=x, dim=1
    )
    integrated = torch.trapezoid(cumulative**2 * mask[:, 1:], x=x[1:], dim=1)
    return (masked + GRAD_WEIGHT * smooth + INT_WEIGHT * integrated).mean()


def mean_loss(core=masked_dos_loss):
    """The benchmark's loss through ``core`` (the functional masked_dos, or a compiled
    version of it): mean over structures."""

    def loss(pred, target, mask, extra_targets: int) -> torch.Tensor:
        return core(
            pred,
            target,
            mask,
            extra_targets=extra_targets,
            grid_spacing=GRID_SPACING,
            grad_weight=GRAD_WEIGHT,
            int_weight=INT_WEIGHT,
        ).mean()

    return loss


ours_dos_loss = mean_loss()


def dos_batch(batch: int, width: int, extra_targets: int, device: torch.device):
    """Smooth DOS-like data (sums of Gaussians), targets shifted copies plus noise."""
    generator = torch.Generator().manual_seed(batch)
    energy = torch.arange(width, dtype=torch.float64) * GRID_SPACING
    centers = torch.rand(batch, 40, 1, generator=generator, dtype=torch.float64) * energy[-1]
    widths = 0.2 + torch.rand(batch, 40, 1, generator=generator, dtype=torch.float64)
    dos = torch.exp(-(((energy - centers) / widths) ** 2)).sum(1)
    n = width - extra_targets
    shifts = torch.randint(extra_targets + 1, (batch,), generator=generator)
    target = dos.gather(1, shifts[:, None] + torch.arange(n))
    target = target + 0.01 * torch.randn(batch, n, generator=generator, dtype=torch.float64)
    mask = torch.arange(n)[None, :] < torch.randint(n // 2, n, (batch, 1), generator=generator)
    pred = dos * (1 + 0.05 * torch.randn(batch, width, generator=generator, dtype=torch.float64))
    pred = pred.float().to(device).requires_grad_(True)
    return pred, target.float().to(device), mask.to(device)


def _step(loss_fn, pred, target, mask, extra_targets):
    def step():
        pred.grad = None
        loss = loss_fn(pred, target, mask, extra_targets)
        loss.backward()
        return loss.detach()

    return step


def cases(device: torch.device, quick: bool) -> list[Case]:
    width, extra_targets = (806, 50) if quick else (4806, 200)
    result = []
    for batch in (16, 64):
        pred, target, mask = dos_batch(batch, width, extra_targets, device)
        naive = naive_dos_loss(pred, target, mask, extra_targets).item()
        ours = ours_dos_loss(pred, target, mask, extra_targets).item()
        if abs(naive - ours) > 1e-4 * abs(naive):
            raise RuntimeError(f"masked_dos disagrees with the naive loss: {ours} vs {naive}")
        result.append(
            Case(
                benchmark="masked_dos",
                case=f"B={batch}, n+extra={width}, extra={extra_targets}, fwd+bwd",
                baseline=_step(naive_dos_loss, pred, target, mask, extra_targets),
                ours=_step(ours_dos_loss, pred, target, mask, extra_targets),
                target=TARGET if batch == 64 and not quick else "",
                repeats=5 if device.type == "cpu" else 20,
            )
        )
    if device.type == "cuda":  # the launch-bound core compiled, with CUDA graphs
        compiled = torch.compile(masked_dos_loss, fullgraph=True, mode="reduce-overhead")
        compiled_loss = mean_loss(compiled)
        result.append(
            Case(
                benchmark="masked_dos",
                case=f"B={batch}, same, core compiled with mode='reduce-overhead'",
                baseline=_step(naive_dos_loss, pred, target, mask, extra_targets),
                ours=_step(compiled_loss, pred, target, mask, extra_targets),
                target=TARGET if not quick else "",
                repeats=20,
                warmup=3,
            )
        )
    return result


if __name__ == "__main__":
    main_for(cases, "masked_dos: FFT shift search vs all shifts materialised")
