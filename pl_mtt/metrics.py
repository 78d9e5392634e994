"""MAE and RMSE per target and gradient in physical units (DESIGN decision 10).

Built on torchmetrics' ``MeanAbsoluteError`` / ``MeanSquaredError`` (their states and
their DDP reduction), with NaN target entries (e.g. stress of non-periodic systems)
left out by arithmetic masking and a count.

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

from pl_mtt.config import gradient_alias, is_energy_like
from pl_mtt.tensormaps import value_blocks

__all__ = ["MetricSpec", "PhysicalMetrics", "metric_specs"]


def _residuals(preds: torch.Tensor, target: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    valid = ~torch.isnan(target)
    return torch.where(valid, preds - target, 0.0), valid.sum()


class NaNIgnoringMeanAbsoluteError(MeanAbsoluteError):
    """torchmetrics MAE that leaves NaN target entries out (no boolean indexing)."""

    def update(self, preds: torch.Tensor, target: torch.Tensor) -> None:
        residual, count = _residuals(preds, target)
        self.sum_abs_error += residual.abs().sum()
        self.total += count


class NaNIgnoringRootMeanSquaredError(MeanSquaredError):
    """torchmetrics RMSE (``squared=False``) that leaves NaN target entries out."""

    def __init__(self, **kwargs) -> None:
        super().__init__(squared=False, **kwargs)

    def update(self, preds: torch.Tensor, target: torch.Tensor) -> None:
        residual, count = _residuals(preds, target)
        self.sum_squared_error += residual.square().sum()
        self.total += count


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
        unit = options.get("unit") or ("eV" if is_energy_like(name, options) else "")
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


def _flat(tensor_map: TensorMap, gradient: str | None) -> torch.Tensor:
    return torch.cat([block.values.reshape(-1) for block in value_blocks(tensor_map, gradient)])


def _stress_factor(systems: Sequence, divided: bool) -> torch.Tensor:
    """Factor per strain-gradient entry (9 per structure) turning it into stress.

    stress = (dE/d strain) / V; NaN for structures without a cell (V = 0).
    """
    cells = torch.stack([system.cell for system in systems])
    volumes = torch.linalg.det(cells).abs()
    factor = 1.0 / volumes
    if divided:
        n_atoms = torch.tensor([len(system) for system in systems], device=volumes.device)
        factor = factor * n_atoms.to(volumes.dtype)
    factor = torch.where(volumes > 0, factor, torch.nan)
    return factor.repeat_interleave(9)


class PhysicalMetrics(torch.nn.Module):
    """MAE and RMSE of each :class:`MetricSpec`, logged as ``<stage>/<name>/MAE``.

    ``update(predictions, targets, systems)`` takes both in physical units (per atom
    where divided, as :mod:`pl_mtt.scaling` returns them for metrics). Pass
    :attr:`metrics` to ``LightningModule.log_dict`` to have Lightning compute, sync
    across ranks and reset them every epoch.
    """

    def __init__(self, specs: Sequence[MetricSpec], stage: str) -> None:
        super().__init__()
        self.specs = list(specs)
        self.stage = stage
        self.per_atom_strain = {s.target for s in specs if s.name.startswith("virial_per_atom")}
        self.metrics = torch.nn.ModuleDict()
        for spec in self.specs:
            self.metrics[self.key(spec, "MAE")] = NaNIgnoringMeanAbsoluteError()
            self.metrics[self.key(spec, "RMSE")] = NaNIgnoringRootMeanSquaredError()
        for metric in self.metrics.values():
            metric.set_dtype(torch.float64)  # sums over an epoch: keep them exact

    def key(self, spec: MetricSpec, kind: str) -> str:
        # ModuleDict keys cannot contain "."; "/" is fine and reads well in loggers
        return f"{self.stage}/{spec.name}/{kind}".replace(".", "_")

    def update(
        self,
        predictions: Mapping[str, TensorMap],
        targets: Mapping[str, TensorMap],
        systems: Sequence,
    ) -> None:
        for spec in self.specs:
            if spec.target not in targets:
                continue
            preds = _flat(predictions[spec.target], spec.gradient)
            target = _flat(targets[spec.target], spec.gradient)
            if spec.stress_from_strain:
                factor = _stress_factor(systems, spec.target in self.per_atom_strain)
                if factor.numel() != target.numel():
                    raise ValueError(
                        f"stress metric of '{spec.target}': expected one 3x3 strain gradient "
                        f"per structure ({factor.numel()} entries), got {target.numel()}"
                    )
                preds, target = preds * factor, target * factor
            self.metrics[self.key(spec, "MAE")].update(preds.detach(), target)
            self.metrics[self.key(spec, "RMSE")].update(preds.detach(), target)

    def compute(self) -> dict[str, torch.Tensor]:
        return {name: metric.compute() for name, metric in self.metrics.items()}

    def reset(self) -> None:
        for metric in self.metrics.values():
            metric.reset()

    def units(self) -> dict[str, str]:
        """Metric key -> unit, for tables and plot labels."""
        return {self.key(spec, kind): spec.unit for spec in self.specs for kind in ("MAE", "RMSE")}
