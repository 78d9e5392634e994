"""Physical predictions against references over a dataset, for plots and tables.

:func:`collect` runs a trained task over a dataloader and returns, per quantity,
flat arrays of predictions and references in the units of the data:
``energy_per_atom`` (eV/atom), ``forces`` (eV/Å, = minus the positions gradient),
``stress`` (eV/Å^3, where the structure has a cell), other per-structure targets per
atom, per-atom targets as they are, and for DOS targets the aligned window of each
structure next to its reference and mask (``dos``). The errors of the composition
baseline alone (what a model predicting nothing would reach) are kept for comparison.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass, field

import metatensor.torch as mts
import numpy as np
import torch
from metatensor.torch import TensorMap

from pl_mtt.config import gradient_alias, target_unit
from pl_mtt.training.profiles import align_profile

__all__ = ["Collected", "collect"]


@dataclass
class Collected:
    """Flat predictions and references per quantity, plus DOS curves."""

    pairs: dict[str, tuple[list[np.ndarray], list[np.ndarray]]] = field(default_factory=dict)
    units: dict[str, str] = field(default_factory=dict)
    dos: dict[str, list[tuple[np.ndarray, np.ndarray, np.ndarray]]] = field(default_factory=dict)
    shifts: dict[str, list[int]] = field(default_factory=dict)
    baseline_errors: dict[str, list[np.ndarray]] = field(default_factory=dict)

    def add_baseline(self, name: str, prediction: torch.Tensor, target: torch.Tensor) -> None:
        """Errors of the composition baseline alone (model output zero)."""
        error = (prediction.detach() - target.detach()).reshape(-1).cpu().numpy()
        self.baseline_errors.setdefault(name, []).append(error)

    def baseline_mae(self, name: str) -> float:
        if name not in self.baseline_errors:
            return float("nan")
        error = np.concatenate(self.baseline_errors[name])
        error = error[~np.isnan(error)]
        return float(np.abs(error).mean()) if error.size else float("nan")

    def add(self, name: str, unit: str, prediction: torch.Tensor, target: torch.Tensor) -> None:
        predictions, targets = self.pairs.setdefault(name, ([], []))
        predictions.append(prediction.detach().reshape(-1).cpu().numpy())
        targets.append(target.detach().reshape(-1).cpu().numpy())
        self.units[name] = unit

    def arrays(self, name: str) -> tuple[np.ndarray, np.ndarray]:
        predictions, targets = self.pairs[name]
        return np.concatenate(predictions), np.concatenate(targets)

    def table(self) -> list[dict[str, object]]:
        """MAE, RMSE, the references' RMS and the MAE of the composition baseline alone
        (zero forces) of every quantity; NaN references are skipped."""
        rows = []
        for name in self.pairs:
            prediction, target = self.arrays(name)
            keep = ~np.isnan(target)
            error = prediction[keep] - target[keep]
            rows.append(
                {
                    "quantity": name,
                    "unit": self.units[name],
                    "count": int(keep.sum()),
                    "MAE": float(np.abs(error).mean()) if error.size else float("nan"),
                    "RMSE": float(np.sqrt((error**2).mean())) if error.size else float("nan"),
                    "reference RMS": float(np.sqrt((target[keep] ** 2).mean()))
                    if error.size
                    else float("nan"),
                    "composition-only MAE": self.baseline_mae(name),
                }
            )
        return rows


def _values(tensor_map: TensorMap, gradient: str | None = None) -> torch.Tensor:
    blocks = tensor_map.blocks()
    if gradient is not None:
        blocks = [block.gradient(gradient) for block in blocks]
    return torch.cat([block.values.reshape(block.values.shape[0], -1) for block in blocks], 1)


def _quantities(
    name: str,
    options: dict,
    prediction: TensorMap,
    target: TensorMap,
    n_atoms: torch.Tensor,
    volumes: torch.Tensor,
) -> list[tuple[str, str, torch.Tensor, torch.Tensor]]:
    """(quantity, unit, prediction, reference) in physical units for one target."""
    unit = target_unit(name, options)
    p, t = _values(prediction), _values(target)
    if options.get("per_atom"):
        quantities = [(name, unit, p, t)]
    else:
        per_atom = n_atoms[:, None].to(p.dtype)
        quantities = [
            (f"{name}_per_atom", f"{unit}/atom" if unit else "", p / per_atom, t / per_atom)
        ]
    for gradient in target.block_by_id(0).gradients_list():
        if gradient not in prediction.block_by_id(0).gradients_list():
            continue
        p, t = _values(prediction, gradient), _values(target, gradient)
        if gradient_alias(name, options, gradient) == "forces":
            quantities.append(("forces", f"{unit}/Å" if unit else "", -p, -t))
        elif gradient == "strain":
            factor = torch.where(volumes > 0, 1.0 / volumes, torch.nan)[:, None].to(p.dtype)
            quantities.append(("stress", f"{unit}/Å^3" if unit else "", p * factor, t * factor))
        else:
            quantities.append((f"{name}/{gradient}", "", p, t))
    return quantities


def collect(task, batches: Iterable, max_dos_curves: int = 6) -> Collected:
    """Physical predictions and references of ``task`` (an ``AtomisticTask``) over
    ``batches`` of ``(systems, targets, extra_data)``, and the errors of the
    composition baseline alone (``Collected.baseline_mae``)."""
    collected = Collected()
    for systems, targets, extra_data in batches:
        systems = [system.to(device=task.device) for system in systems]
        with torch.enable_grad():
            predictions = task(systems)
        n_atoms = torch.tensor([len(s) for s in systems], dtype=torch.float64)
        volumes = torch.stack([torch.linalg.det(s.cell).abs().cpu() for s in systems])
        for name, target in targets.items():
            if name not in predictions:
                continue
            options = task.target_options.get(name, {})
            prediction = predictions[name].to("cpu")
            target = target.to("cpu")
            if name in getattr(task, "dos_targets", {}):
                entry = task.dos_targets[name]
                unit = options.get("unit", "")
                window = align_profile(
                    entry, _values(prediction).detach(), _values(target), extra_data, name
                )
                _collect_dos(collected, name, unit, *window, max_dos_curves)
                continue
            for quantity in _quantities(name, options, prediction, target, n_atoms, volumes):
                collected.add(*quantity)
            if task.composition is not None:
                zero = mts.zeros_like(target.to(task.device))
                baseline = task.composition(systems, {name: zero}, remove=False)[name]
                quantities = _quantities(
                    name, options, baseline.to("cpu"), target, n_atoms, volumes
                )
                for quantity, _, p, t in quantities:
                    collected.add_baseline(quantity, p, t)
    return collected


def _collect_dos(
    collected: Collected,
    name: str,
    unit: str,
    aligned: torch.Tensor,
    target: torch.Tensor,
    mask: torch.Tensor,
    shifts: torch.Tensor,
    max_curves: int,
) -> None:
    """Aligned profiles and their targets (NaN where masked out)."""
    aligned, target, mask = aligned.cpu(), target.cpu(), mask.cpu()
    collected.add(name, unit, aligned, torch.where(mask != 0, target, torch.nan))
    collected.shifts.setdefault(name, []).extend(shifts.tolist())
    curves = collected.dos.setdefault(name, [])
    for row in range(min(aligned.shape[0], max_curves - len(curves))):
        curves.append((aligned[row].numpy(), target[row].numpy(), mask[row].numpy()))
