"""Overhead of pl_mtt inside a training step of the reference model.

.. code-block:: bash

    python benchmarks/bench_step.py [--quick] [--device cuda]

Both sides run the same ``RadialMLP`` forward (energy, forces and stress by autograd)
and backward on the same sequence of batches of embedded EMT structures (each step
takes the next of 6 batches, so nothing derived from a batch is reused across steps):

- bare: a hand-written MSE on the raw block values (energy per atom, forces, strain
  gradient per atom), no scaling, no NaN handling, no metrics;
- pl_mtt: the training task's step: :func:`pl_mtt.scaling.prepare_for_loss` (baseline,
  division by atoms, per-target scales of a fitted scaler), the :class:`LossModule`
  (energy + forces + stress mse, epoch aggregates) and the physical-unit metrics update.

The "speedup" column is bare time / pl_mtt time: the overhead of pl_mtt is
``1 / speedup - 1`` (goal on a GPU: at most 5%).
"""

from __future__ import annotations

import itertools
import sys
import tempfile
from collections.abc import Callable
from pathlib import Path
from types import SimpleNamespace

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from harness import Case, main_for

from pl_mtt import CompositionModel, LossModule, Scaler, fit_pass, scaling
from pl_mtt.data import AtomisticDataModule, batch_to
from pl_mtt.models import RadialMLP
from pl_mtt.training.metrics import PhysicalMetrics, metric_specs

LOSS = {"energy": {"type": "mse", "forces": "mse", "stress": "mse"}}


class _Holder(torch.nn.Module):
    """What ``prepare_for_loss`` reads: ``.scaler`` and ``.composition``."""

    def __init__(self, scaler: Scaler, composition: CompositionModel) -> None:
        super().__init__()
        self.scaler = scaler
        self.composition = composition


def _bare_loss(predictions, targets, n_atoms) -> torch.Tensor:
    p, t = predictions["energy"].block(), targets["energy"].block()
    energy = ((p.values - t.values) / n_atoms).square().mean()
    forces = (p.gradient("positions").values - t.gradient("positions").values).square().mean()
    strain = (p.gradient("strain").values - t.gradient("strain").values) / n_atoms[:, None, None]
    return energy + forces + strain.square().mean()


def setup(device: torch.device, quick: bool) -> SimpleNamespace:
    """Batches, fitted scaler and baseline, LossModule, metrics and model on ``device``."""
    torch.manual_seed(0)
    with tempfile.TemporaryDirectory() as cache:
        import os

        os.environ.setdefault("PL_MTT_CACHE", cache)
        data = AtomisticDataModule("emt", n_structures=48, batch_size=8)
        data.setup()
        batches = [batch_to(b, device) for b in data.train_dataloader()]
    options = data.target_options
    scaler = Scaler(data.atomic_types, data.layouts()).to(device)
    composition = CompositionModel(data.atomic_types, data.layouts()).to(device)
    fit_pass(batches, scaler, composition)
    loss = LossModule(LOSS, options).to(device)
    loss.set_scaler(scaler)
    specs = metric_specs(options, ["energy"], {"energy": ["positions", "strain"]})
    model = RadialMLP(n_radial=8 if quick else 16, hidden=(16,) if quick else (64, 64))
    return SimpleNamespace(
        batches=batches,
        scaler=scaler,
        holder=_Holder(scaler, composition),
        loss=loss,
        metrics=PhysicalMetrics(specs, "train").to(device),
        model=model.to(device).train(),
    )


def step_stages(parts: SimpleNamespace, batch: tuple) -> list[tuple[str, Callable[[], None]]]:
    """pl_mtt's part of a training step on ``batch``, as named stages run in order.

    The model's forward runs here, before the stages; the last stage is the backward.
    """
    systems, targets, extra_data = batch
    outputs = parts.model(systems)
    state = {}

    def prepare() -> None:
        state["pair"] = scaling.prepare_for_loss(parts.holder, systems, outputs, targets)

    def loss_forward() -> None:
        state["loss"] = parts.loss(*state["pair"], extra_data, systems)

    def metrics_update() -> None:
        with torch.no_grad():
            physical = scaling.for_metrics(systems, *state["pair"], parts.scaler)
            parts.metrics.update(*physical, systems)

    def backward() -> None:
        state["loss"].backward()

    return [
        ("prepare_for_loss (baseline, division by atoms, scales)", prepare),
        ("LossModule forward", loss_forward),
        ("for_metrics + metrics update", metrics_update),
        ("backward", backward),
    ]


def cases(device: torch.device, quick: bool) -> list[Case]:
    parts = setup(device, quick)
    # each step takes the next batch (as training does: nothing cached across steps);
    # both sides see the same sequence
    n_atoms = [
        torch.tensor([[len(s)] for s in b[0]], dtype=torch.float64, device=device)
        for b in parts.batches
    ]
    bare_batches = itertools.cycle(list(zip(parts.batches, n_atoms, strict=True)))
    our_batches = itertools.cycle(parts.batches)

    def bare() -> None:
        (systems, targets, _), atoms = next(bare_batches)
        _bare_loss(parts.model(systems), targets, atoms).backward()

    def ours() -> None:
        for _, run in step_stages(parts, next(our_batches)):
            run()

    return [
        Case(
            "training step",
            "RadialMLP, 8 EMT structures, E+F+S: bare step vs step with pl_mtt",
            bare,
            ours,
            target="overhead = 1/speedup - 1 (GPU goal ≤ 5%)",
            repeats=5 if quick else 30,
            warmup=2 if quick else 5,
        )
    ]


if __name__ == "__main__":
    main_for(cases, "pl_mtt's overhead in a training step")
