"""One pass over the training data fits the composition baseline and the scales together.

Per batch: the composition model accumulates its sums on the physical targets and
returns them minus its *shift* baseline; those are divided by atoms and accumulated by
the scaler. After the pass, rank 0's shift is broadcast and every rank moves its sums to
it, then one all_reduce of all sums (under DDP), the baseline solve,
the algebraic correction of the scaler's sums from shifted to residual second moments
(:mod:`pl_mtt.scaling.composition` explains why this is exact), and the scale fit. Every rank
then holds the same state, equal to a single-process fit over the union of the shards.

.. code-block:: python

    scaler = Scaler(None, layouts)
    composition = CompositionModel(None, layouts)
    fit_pass(train_batches, scaler, composition)
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from metatensor.torch import TensorMap

from pl_mtt.scaling.composition import CompositionModel
from pl_mtt.scaling.pipeline import divide_by_atoms
from pl_mtt.scaling.scaler import Scaler

__all__ = ["FitSummary", "fit_pass", "unfitted_models", "unpack_batch"]

Batch = tuple[list, dict[str, TensorMap], dict[str, TensorMap]]


def unpack_batch(batch: Any) -> Batch:
    """``(systems, targets)`` or ``(systems, targets, extra_data)`` -> the three parts.

    Raises:
        ValueError: for anything else, naming what was found.
    """
    if isinstance(batch, (tuple, list)) and len(batch) in (2, 3):
        systems, targets = batch[0], batch[1]
        extra_data = batch[2] if len(batch) == 3 else {}
        if isinstance(systems, (list, tuple)) and isinstance(targets, Mapping):
            return list(systems), dict(targets), dict(extra_data or {})
    what = type(batch).__name__
    if isinstance(batch, (tuple, list)):
        what += f" of {len(batch)} items ({', '.join(type(b).__name__ for b in batch)})"
    raise ValueError(
        f"cannot unpack a training batch of type {what}: expected a tuple (systems, targets, "
        f"extra_data) with a list of metatomic Systems and dicts of TensorMaps; pass "
        f"unpack_batch=<function batch -> (systems, targets, extra_data)> for other formats"
    )


@dataclass(frozen=True)
class FitSummary:
    """What one fit pass saw: structures on this rank and on all ranks."""

    local_structures: int
    total_structures: int
    local_batches: int


def unfitted_models(
    atomic_types: Sequence[int] | None,
    layouts: Mapping[str, TensorMap],
    *,
    per_structure_targets: Sequence[str] = (),
    no_per_property_scales: Sequence[str] = (),
    composition: bool = True,
    no_composition: Sequence[str] = (),
) -> tuple[Scaler, CompositionModel | None]:
    """The unfitted :class:`Scaler` and :class:`CompositionModel` (None without
    ``composition``) of the targets of ``layouts``, as :class:`pl_mtt.ScalerCallback`
    builds them: targets with ``no_per_property_scales`` (DOS) and ``no_composition``
    get no baseline."""
    scaler = Scaler(
        atomic_types,
        layouts,
        no_per_property_scales=list(no_per_property_scales),
        per_structure_targets=list(per_structure_targets),
    )
    if not composition:
        return scaler, None
    exclude = sorted({*no_per_property_scales, *no_composition} & set(layouts))
    baseline = CompositionModel(
        atomic_types,
        layouts,
        exclude=exclude,
        per_structure_targets=list(per_structure_targets),
    )
    return scaler, baseline


def _identity(tensor: torch.Tensor) -> torch.Tensor:
    return tensor


@torch.no_grad()
def fit_pass(
    batches: Iterable[Any],
    scaler: Scaler,
    composition: CompositionModel | None = None,
    *,
    fixed_scales: Mapping[str, Any] | None = None,
    fixed_baseline: Mapping[str, Any] | None = None,
    unpack: Callable[[Any], Batch] | None = None,
    broadcast: Callable[[torch.Tensor], torch.Tensor] | None = None,
    all_reduce: Callable[[torch.Tensor], torch.Tensor] | None = None,
    progress: Callable[[Iterable[Any]], Iterable[Any]] | None = None,
) -> FitSummary:
    """Fit ``composition`` (if given) and ``scaler`` in one pass over ``batches``.

    Args:
        batches: this rank's share of the training batches (physical units).
        scaler: an unfitted (or to be refitted) :class:`Scaler`; its sums are reset.
        composition: the baseline, built for the same targets; its sums are reset.
        fixed_scales: passed to :meth:`Scaler.fit`.
        fixed_baseline: passed to :meth:`CompositionModel.fit` (``fixed_weights``).
        unpack: batch -> ``(systems, targets, extra_data)`` (default :func:`unpack_batch`).
            Targets the scaler does not know are ignored.
        broadcast: returns rank 0's tensor on every rank (the shift of the sums).
        all_reduce: returns the sum of a tensor over ranks (all the sums, once).
        progress: wraps the batch iterable (e.g. a progress bar).
    """
    unpack = unpack or unpack_batch
    if fixed_baseline and composition is None:
        raise ValueError("fit_pass: fixed_baseline needs a composition model")
    broadcast = broadcast or _identity
    all_reduce = all_reduce or _identity
    if composition is not None:
        if set(composition.targets) != set(scaler.targets):
            raise ValueError(
                f"fit_pass: the composition model's targets {sorted(composition.targets)} "
                f"differ from the scaler's {sorted(scaler.targets)}"
            )
        if composition.per_structure_targets != scaler.per_structure_targets:
            raise ValueError(
                f"fit_pass: per_structure_targets differ between the composition model "
                f"({sorted(composition.per_structure_targets)}) and the scaler "
                f"({sorted(scaler.per_structure_targets)})"
            )
        composition.fixed_weight_tables(fixed_baseline)  # mistakes fail before the pass
        composition.reset()
    scaler.reset_sums()

    def parts(batch: Any) -> Batch:
        systems, targets, extra_data = unpack(batch)
        return systems, {k: v for k, v in targets.items() if k in scaler.targets}, extra_data

    local_structures = local_batches = 0
    for batch in progress(batches) if progress is not None else batches:
        systems, targets, extra_data = parts(batch)
        local_structures += len(systems)
        local_batches += 1
        if composition is not None:
            targets = composition.accumulate_and_shift(systems, targets, extra_data)
        divided = divide_by_atoms(systems, targets, scaler.per_structure_targets)
        scaler.accumulate(systems, divided, extra_data)

    if composition is not None:
        shift = composition.flat_shift()
        if shift.numel() > 0:  # every rank moves its sums to rank 0's shift
            scaler.add_to_sums(composition.recenter(broadcast(shift)))
    pieces = [scaler.flat_sums()]
    if composition is not None:
        pieces.append(composition.flat_sums().to(pieces[0].device))
    pieces.append(torch.tensor([float(local_structures)], dtype=torch.float64))
    flat = all_reduce(torch.cat([p.to(pieces[0].device) for p in pieces]))
    n_scaler = pieces[0].numel()
    scaler.load_flat_sums(flat[:n_scaler])
    if composition is not None:
        composition.load_flat_sums(flat[n_scaler:-1])
        composition.fit(fixed_baseline)
        scaler.add_to_sums(composition.sum_corrections())
    scaler.fit(fixed_scales)
    return FitSummary(local_structures, round(float(flat[-1])), local_batches)
