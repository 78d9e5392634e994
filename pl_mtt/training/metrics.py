"""MAE and RMSE per target and gradient in physical units (DESIGN decision 10).

Built on torchmetrics' ``MeanAbsoluteError`` / ``MeanSquaredError`` (their states, their
formulas and their DDP reduction), one metric of each kind with one output per measured
quantity, so that a training step makes one update of each. NaN target entries (e.g.
stress of non-periodic systems) are left out by arithmetic masking and a count.

Metric names say what is measured and in which units: ``energy_per_atom`` (eV/atom),
``forces`` (eV/Å), ``virial_per_atom`` (eV/atom), ``stress`` (eV/Å^3, from the strain
gradient and the cell volume); other targets ``<target>`` or ``<target>_per_atom``,
and ``<target>/<gradient>`` for other gradients.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import torch
from metatensor.torch import TensorMap
from torchmetrics.regression import MeanAbsoluteError, MeanSquaredError

from pl_mtt.config import gradient_alias, is_energy_like, target_unit
from pl_mtt.scaling.prepared import physical_pair
from pl_mtt.tensormaps.batch_atoms import BatchAtoms
from pl_mtt.tensormaps.block_ops import flat_values
from pl_mtt.training.residual_queue import QueuedResidual, ResidualQueue

__all__ = ["MetricSpec", "PhysicalMetrics", "metric_specs"]


class SummedMeanAbsoluteError(MeanAbsoluteError):
    """torchmetrics MAE with one output per quantity, updated with per-output sums of
    absolute residuals and per-output entry counts (entries left out are not counted)."""

    def __init__(self, num_outputs: int) -> None:
        super().__init__(num_outputs=num_outputs)
        self.add_state("total", default=torch.zeros(num_outputs), dist_reduce_fx="sum")

    def update(self, sum_abs_error: torch.Tensor, total: torch.Tensor) -> None:
        self.sum_abs_error.add_(sum_abs_error)
        self.total.add_(total)


class SummedRootMeanSquaredError(MeanSquaredError):
    """torchmetrics RMSE (``squared=False``) with one output per quantity, updated with
    per-output sums of squared residuals and entry counts."""

    def __init__(self, num_outputs: int) -> None:
        super().__init__(squared=False, num_outputs=num_outputs)
        self.add_state("total", default=torch.zeros(num_outputs), dist_reduce_fx="sum")

    def update(self, sum_squared_error: torch.Tensor, total: torch.Tensor) -> None:
        self.sum_squared_error.add_(sum_squared_error)
        self.total.add_(total)


@dataclass(frozen=True)
class MetricSpec:
    """One measured quantity: a target, optionally one of its gradients, and units."""

    name: str
    target: str
    gradient: str | None
    unit: str
    stress_from_strain: bool = False


def metric_specs(
    target_options: Mapping[str, Mapping],
    per_atom_normalized: Sequence[str] = (),
    gradients: Mapping[str, Sequence[str]] | None = None,
) -> list[MetricSpec]:
    """The quantities measured for training targets, named by DESIGN decision 10.

    Args:
        target_options: target name -> options (``unit`` is used for names of units).
        per_atom_normalized: targets whose per-structure values are divided by atoms.
        gradients: target name -> gradient names present (default: none).
    """
    specs = []
    for name, options in target_options.items():
        options = options or {}
        unit = target_unit(name, options)
        divided = name in per_atom_normalized
        suffix = "_per_atom" if divided else ""
        specs.append(
            MetricSpec(name + suffix, name, None, f"{unit}/atom" if divided and unit else unit)
        )
        for gradient in (gradients or {}).get(name, ()):
            alias = gradient_alias(name, options, gradient)
            if alias == "forces":
                specs.append(MetricSpec("forces", name, gradient, f"{unit}/Å" if unit else ""))
            elif gradient == "strain" and is_energy_like(name, options):
                specs.append(
                    MetricSpec(
                        f"virial{suffix}", name, gradient, f"{unit}/atom" if divided else unit
                    )
                )
                specs.append(
                    MetricSpec("stress", name, gradient, f"{unit}/Å^3" if unit else "", True)
                )
            else:
                specs.append(MetricSpec(f"{name}/{gradient}", name, gradient, ""))
    return specs


def _stress_factor(atoms: BatchAtoms, divided: bool) -> torch.Tensor:
    """Factor per strain-gradient entry (9 per structure) turning it into stress.

    stress = (dE/d strain) / V; NaN for structures without a cell (V = 0).
    """
    volumes = atoms.volumes()
    factor = 1.0 / volumes
    if divided:
        factor = factor * atoms.n_atoms.to(volumes.device, volumes.dtype)
    factor = torch.where(volumes > 0, factor, torch.nan)
    return factor.repeat_interleave(9)


class PhysicalMetrics(torch.nn.Module):
    """MAE and RMSE of each :class:`MetricSpec`, named ``<stage>/<name>/MAE`` (``RMSE``).

    ``update(predictions, targets, systems)`` takes both in physical units (per atom
    where divided, as :mod:`pl_mtt.scaling` returns them for metrics); :meth:`compute`
    returns the epoch values, reduced across DDP ranks (torchmetrics), for
    ``LightningModule.log_dict``; :meth:`reset` starts a new epoch.

    Given the mappings of :func:`pl_mtt.scaling.for_metrics` for a batch whose loss was
    fused (:mod:`pl_mtt.scaling.prepared`), an update only keeps the loss's residuals
    (no tensor operation); they are summed many steps at a time
    (:class:`pl_mtt.training.residual_queue.ResidualQueue`) before the state is read.
    """

    def __init__(self, specs: Sequence[MetricSpec], stage: str) -> None:
        super().__init__()
        self.specs = list(specs)
        self.stage = stage
        self.per_atom_strain = {s.target for s in specs if s.name.startswith("virial_per_atom")}
        # per target: the parts read from its TensorMaps ("" = values, else a gradient)
        # and, per spec, the index of its part
        self.parts: dict[str, list[str]] = {}
        self.part_index: list[int] = []
        for spec in self.specs:
            parts = self.parts.setdefault(spec.target, [])
            part = spec.gradient or ""
            if part not in parts:
                parts.append(part)
            self.part_index.append(parts.index(part))
        n_outputs = max(len(self.specs), 1)
        self.mae = SummedMeanAbsoluteError(n_outputs).set_dtype(torch.float64)
        self.rmse = SummedRootMeanSquaredError(n_outputs).set_dtype(torch.float64)
        self.queue = ResidualQueue(n_outputs)

    def key(self, spec: MetricSpec, kind: str) -> str:
        return f"{self.stage}/{spec.name}/{kind}".replace(".", "_")

    def update(
        self,
        predictions: Mapping[str, TensorMap],
        targets: Mapping[str, TensorMap],
        systems: Sequence,
    ) -> None:
        """Add one batch: the fused loss's residuals queued where there are some, else
        one flattening per TensorMap and one update per metric kind."""
        queued = self._queue_residuals(predictions, targets, systems)
        flat: dict[str, tuple[list[torch.Tensor], list[torch.Tensor]]] = {}
        for name, parts in self.parts.items():
            if name in targets and not all(
                j in queued for j, spec in enumerate(self.specs) if spec.target == name
            ):
                flat[name] = (
                    flat_values(predictions[name], parts),
                    flat_values(targets[name], parts),
                )
        if not flat:
            return
        atoms = BatchAtoms.of(systems) if any(s.stress_from_strain for s in self.specs) else None
        preds, target, sizes = [], [], []
        for j, (spec, part) in enumerate(zip(self.specs, self.part_index, strict=True)):
            if spec.target not in flat or j in queued:
                sizes.append(0)
                continue
            p, t = flat[spec.target][0][part], flat[spec.target][1][part]
            if spec.stress_from_strain:
                factor = atoms.cached(
                    ("stress factor", spec.target in self.per_atom_strain),
                    lambda divided=spec.target in self.per_atom_strain: _stress_factor(
                        atoms, divided
                    ),
                )
                if factor.numel() != t.numel():
                    raise ValueError(
                        f"stress metric of '{spec.target}': expected one 3x3 strain gradient "
                        f"per structure ({factor.numel()} entries), got {t.numel()}"
                    )
                factor = factor.to(t.dtype)
                p, t = p * factor, t * factor
            preds.append(p)
            target.append(t)
            sizes.append(t.numel())
        preds, target = torch.cat(preds).detach(), torch.cat(target)
        valid = target == target  # not NaN
        residual = torch.where(valid, preds - target, 0.0).to(torch.float64)
        terms = torch.stack([residual.abs(), residual.square(), valid.to(torch.float64)])
        sums = torch.stack([chunk.sum(1) for chunk in terms.split(sizes, 1)], 1)
        sum_abs, sum_squares, counts = sums.unbind(0)
        self.mae.update(sum_abs, counts)
        self.rmse.update(sum_squares, counts)

    def _queue_residuals(
        self, predictions: Mapping[str, TensorMap], targets: Mapping[str, TensorMap], systems
    ) -> set[int]:
        """Queue the fused loss's residuals of every spec that has them; returns those
        specs."""
        batch = physical_pair(predictions, targets)
        if batch is None or not batch.residuals:
            return set()
        residuals = []
        for j, spec in enumerate(self.specs):
            record = batch.residuals.get(spec.target)
            part = spec.gradient or ""
            if (
                record is None
                or part not in record.parts
                or not (predictions.is_lazy(spec.target) and targets.is_lazy(spec.target))
            ):
                continue
            position = record.parts.index(part)
            difference = record.differences[position]
            stress = None
            if spec.stress_from_strain:
                stress = ResidualQueue.stress_info(systems, spec.target in self.per_atom_strain)
                if difference.numel() != 9 * len(stress[0]):
                    raise ValueError(
                        f"stress metric of '{spec.target}': expected one 3x3 strain gradient "
                        f"per structure ({9 * len(stress[0])} entries), got "
                        f"{difference.numel()}"
                    )
            residuals.append(
                QueuedResidual(
                    j,
                    difference,
                    record.valid[position],
                    record.counts,
                    position,
                    record.inverse_scale,
                    stress,
                )
            )
        if residuals and self.queue.add(residuals):
            self.flush()
        return {residual.output for residual in residuals}

    def flush(self) -> None:
        """Add the queued residuals to the state."""
        sums = self.queue.flush()
        if sums is not None:
            sum_abs, sum_squares, counts = sums
            self.mae.update(sum_abs, counts)
            self.rmse.update(sum_squares, counts)

    def compute(self) -> dict[str, torch.Tensor]:
        """``{key: value}`` for every spec and kind (reduced across ranks)."""
        self.flush()
        # torchmetrics squeezes a one-element result
        mae, rmse = self.mae.compute().reshape(-1), self.rmse.compute().reshape(-1)
        result = {}
        for index, spec in enumerate(self.specs):
            result[self.key(spec, "MAE")] = mae[index]
            result[self.key(spec, "RMSE")] = rmse[index]
        return result

    def reset(self) -> None:
        self.queue.clear()
        self.mae.reset()
        self.rmse.reset()

    def _apply(self, fn, *args, **kwargs):
        self.flush()  # the queued residuals live where the state was
        return super()._apply(fn, *args, **kwargs)

    def units(self) -> dict[str, str]:
        """Metric key -> unit, for tables and plot labels."""
        return {self.key(spec, kind): spec.unit for spec in self.specs for kind in ("MAE", "RMSE")}
