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

Beside the times, the number of aten operations each stage dispatches (counted with a
``TorchDispatchMode``: every operation, views included, i.e. what an eager GPU step pays
a launch or a dispatch for), in steady state (after one step per batch layout: the first
call of a layout runs the full metadata checks), and the time of each stage:

.. code-block:: bash

    python benchmarks/bench_step.py --quick     # the tables, small sizes
"""

from __future__ import annotations

import copy
import itertools
import statistics
import sys
import tempfile
import time
from collections import Counter
from collections.abc import Callable
from pathlib import Path
from types import SimpleNamespace

import torch
from torch.utils._python_dispatch import TorchDispatchMode

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from harness import Case, device_name, main_for, one_thread, parse_args

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
        ),
        _forward_stages_case(parts, quick),
    ]


def _forward_stages_case(parts: SimpleNamespace, quick: bool) -> Case:
    """pl_mtt's forward stages alone (model outputs computed once per batch): the eager
    pipeline on plain dicts (every TensorMap built, the general LossModule path, eager
    metrics) against the lean step (prepare_for_loss's mappings, fused loss, queued
    metrics), on the same batches, one thread."""
    eager_loss = copy.deepcopy(parts.loss)
    eager_loss.set_scaler(parts.scaler)
    eager_metrics = copy.deepcopy(parts.metrics)
    composition = parts.holder.composition
    steps = [(batch, parts.model(batch[0])) for batch in parts.batches]
    eager_steps, lean_steps = itertools.cycle(steps), itertools.cycle(steps)

    def eager() -> None:
        (systems, targets, extra), outputs = next(eager_steps)
        predictions = scaling.predictions_for_loss(systems, outputs, parts.scaler)
        loss_targets = scaling.targets_for_loss(systems, targets, parts.scaler, composition)
        eager_loss(predictions, loss_targets, extra, systems)
        with torch.no_grad():
            physical = scaling.for_metrics(systems, predictions, loss_targets, parts.scaler)
            eager_metrics.update(*physical, systems)

    def lean() -> None:
        (systems, targets, extra), outputs = next(lean_steps)
        predictions, loss_targets = scaling.prepare_for_loss(
            parts.holder, systems, outputs, targets
        )
        parts.loss(predictions, loss_targets, extra, systems)
        with torch.no_grad():
            physical = scaling.for_metrics(systems, predictions, loss_targets, parts.scaler)
            parts.metrics.update(*physical, systems)

    return Case(
        "training step",
        "pl_mtt's forward stages only: eager pipeline on dicts vs lean step (1 thread)",
        one_thread(eager),
        one_thread(lean),
        target="fewer operations, less host time",
        repeats=20 if quick else 200,
        warmup=len(steps),
    )


# -- dispatched operations per stage ----------------------------------------------------
class OperationCounter(TorchDispatchMode):
    """Counts the aten operations dispatched while active (views included), by name."""

    def __init__(self) -> None:
        super().__init__()
        self.names: Counter[str] = Counter()

    @property
    def count(self) -> int:
        return sum(self.names.values())

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.names[str(func)] += 1
        return func(*args, **(kwargs or {}))


def warm_up(parts: SimpleNamespace) -> None:
    """One step on every batch: the first call of a layout runs the full checks."""
    for batch in parts.batches:
        for _, run in step_stages(parts, batch):
            run()


def stage_operations(parts: SimpleNamespace, batch: tuple) -> list[tuple[str, OperationCounter]]:
    """The operations each stage of pl_mtt's step dispatches on ``batch``."""
    result = []
    for name, run in step_stages(parts, batch):
        with OperationCounter() as counter:
            run()
        result.append((name, counter))
    return result


def bare_operations(parts: SimpleNamespace, batch: tuple) -> tuple[int, int]:
    """(forward, backward) operations of the hand-written loss on ``batch``."""
    systems, targets, _ = batch
    n_atoms = torch.tensor(
        [[len(s)] for s in systems], dtype=torch.float64, device=targets["energy"].device
    )
    outputs = parts.model(systems)
    with OperationCounter() as forward:
        loss = _bare_loss(outputs, targets, n_atoms)
    with OperationCounter() as backward:
        loss.backward()
    return forward.count, backward.count


def flush_operations(parts: SimpleNamespace) -> tuple[int, int]:
    """(operations of one metrics flush of a full queue, steps in that queue): the
    metrics' share of a step, amortised over the queue."""
    metrics = parts.metrics
    metrics.flush()
    batches = itertools.cycle(parts.batches)
    steps = metrics.queue.STEPS - 1  # the next update would flush by itself
    for _ in range(steps):
        for name, run in step_stages(parts, next(batches)):
            if not name.startswith("backward"):
                run()
    with OperationCounter() as counter:
        metrics.flush()
    return counter.count, steps + 1


def _stage_times(parts: SimpleNamespace, device: torch.device, repeats: int) -> list[float]:
    """Median time of each stage (synchronised around every stage on CUDA)."""
    batches = itertools.cycle(parts.batches)
    times: list[list[float]] = []
    for _ in range(repeats):
        stages = step_stages(parts, next(batches))
        times.append([])
        for _, run in stages:
            if device.type == "cuda":
                torch.cuda.synchronize(device)
            start = time.perf_counter()
            run()
            if device.type == "cuda":
                torch.cuda.synchronize(device)
            times[-1].append(time.perf_counter() - start)
        parts.model.zero_grad(set_to_none=True)
    return [statistics.median(column) for column in zip(*times, strict=True)]


def operations_table(device: torch.device, quick: bool) -> str:
    """Markdown: dispatched operations and median time of every stage, the bare loss,
    and the metrics flush amortised over its queue."""
    parts = setup(device, quick)
    warm_up(parts)
    batch = parts.batches[1]
    counted = stage_operations(parts, batch)
    times = one_thread(lambda: _stage_times(parts, device, 5 if quick else 30))()
    bare_forward, bare_backward = bare_operations(parts, batch)
    flush, steps = flush_operations(parts)
    forward = sum(c.count for name, c in counted if not name.startswith("backward"))
    rows = [
        "",
        f"Training step, dispatched aten operations per stage ({device_name(device)}; "
        "steady state, views included; times: medians, one torch thread):",
        "",
        "| stage | operations | time |",
        "|---|---|---|",
    ]
    for (name, counter), seconds in zip(counted, times, strict=True):
        rows.append(f"| {name} | {counter.count} | {seconds * 1e6:.0f} µs |")
    rows += [
        f"| pl_mtt forward, all stages | {forward} (+{flush / steps:.1f} amortised: one "
        f"metrics flush of {flush} operations per {steps} steps) | "
        f"{sum(times[:-1]) * 1e6:.0f} µs |",
        f"| hand-written loss (`_bare_loss`): forward, backward | {bare_forward}, "
        f"{bare_backward} | |",
        "",
        "Goal: at most 40 forward operations, and a backward of at most the hand-written "
        "loss's backward + 10 (both backwards include the model's).",
    ]
    return "\n".join(rows)


def extra_report(device: torch.device, quick: bool) -> str:
    """The table of :func:`operations_table` for ``run_all.py``'s RESULTS.md."""
    return operations_table(device, quick)


if __name__ == "__main__":
    main_for(cases, "pl_mtt's overhead in a training step")
    arguments = parse_args("")
    print(operations_table(torch.device(arguments.device), arguments.quick))
