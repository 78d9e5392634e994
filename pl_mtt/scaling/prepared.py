"""Loss units on demand: what :func:`pl_mtt.scaling.prepare_for_loss` returns.

A training step reads the same batch three times: the loss compares predictions and
targets in loss units, the metrics compare them in physical units, and both need the
baseline, the scales and the number of atoms of every structure. Building the
intermediate TensorMaps eagerly costs dozens of small tensor operations per step (each
a kernel launch on a GPU), most of which only move values between containers.

:func:`pl_mtt.scaling.prepare_for_loss` therefore returns two :class:`LossUnits`
mappings over one :class:`PreparedBatch`: they behave like ``Dict[str, TensorMap]``
(reading an entry computes it exactly as :func:`predictions_for_loss` /
:func:`targets_for_loss` do, once), and they let the :class:`pl_mtt.LossModule` compute
the loss of a per-structure target straight from the raw model output and the data
(:meth:`PreparedBatch.fused_inputs`): one functional core per target, no TensorMap
built. The loss-unit residuals it computes are recorded on the batch
(:meth:`PreparedBatch.record`), and :func:`pl_mtt.scaling.for_metrics` returns
:class:`PhysicalUnits` mappings through which the metrics read them.

.. code-block:: python

    predictions, targets = scaling.prepare_for_loss(self, systems, raw, physical)
    targets["energy"]          # a TensorMap in loss units, computed on first access
    dict(targets)              # every entry computed: a plain dict
    loss = self.loss(predictions, targets, extra_data, systems)  # fused where it can

Assigning or deleting an entry works as on a dict; such entries are then taken as
given everywhere. The raw inputs are read when needed, so they must not be modified in
place while the mappings are in use.
"""

from __future__ import annotations

from collections.abc import Callable, Hashable, Iterator, Mapping, MutableMapping
from dataclasses import dataclass

import torch
from metatensor.torch import TensorMap
from metatomic.torch import System

from pl_mtt.tensormaps.batch_atoms import BatchAtoms
from pl_mtt.tensormaps.block_ops import lazy_script

__all__ = [
    "FusedInputs",
    "FusedResiduals",
    "LossUnits",
    "PhysicalUnits",
    "PreparedBatch",
    "physical_pair",
    "prepared_pair",
]

SIDES = ("predictions", "targets")


@dataclass
class FusedInputs:
    """The tensors of :func:`pl_mtt.losses.functional.pointwise.scaled_segment_sums` for
    one target: per part (values, then gradients) the raw prediction, the target in the
    units of the data and the row factor (``1 / n_atoms`` where divided), the baseline
    of the values, and the inverse per-target scale; the loss sets the weights of the
    entries of each part (``None``: unweighted; see :mod:`pl_mtt.losses.weights`)."""

    parts: list[str]
    predictions: list[torch.Tensor]
    targets: list[torch.Tensor]
    row_factors: list[torch.Tensor | None]
    shifts: list[torch.Tensor | None]
    inverse_scale: torch.Tensor | None
    weights: list[torch.Tensor | None] | None = None


@dataclass
class FusedResiduals:
    """What a fused loss computed for one target, in loss units, for the metrics: per
    part the residual ``prediction - target`` (0 where the target is NaN) and the mask
    of entries that count, the ``(K,)`` counts and the inverse scale (physical residual
    = loss-unit residual / inverse scale)."""

    parts: list[str]
    differences: list[torch.Tensor]
    valid: list[torch.Tensor]
    counts: torch.Tensor
    inverse_scale: torch.Tensor | None


# -- one TorchScript call per target and step ------------------------------------------
@lazy_script
def _read_pair(
    prediction: TensorMap, target: TensorMap, parts: list[str], divide: bool, rows: bool
) -> tuple[
    list[list[str]],
    list[list[int]],
    list[torch.Tensor],
    list[torch.Tensor],
    torch.Tensor | None,
    list[torch.Tensor | None],
]:
    """For block 0 of ``prediction`` and ``target`` and each part (``""``: the values;
    else a gradient): the sample names (target's, prediction's), the shapes (prediction's,
    target's) and the values of both; the ``system`` column of the target's values (if
    ``rows``) and, with ``divide``, the ``sample`` column of the target's gradient blocks
    without atoms. Nothing (empty lists) when a map has not exactly one block or a part
    is missing."""
    names: list[list[str]] = []
    shapes: list[list[int]] = []
    predictions: list[torch.Tensor] = []
    targets: list[torch.Tensor] = []
    samples: list[torch.Tensor | None] = []
    system: torch.Tensor | None = None
    if len(prediction) != 1 or len(target) != 1:
        return names, shapes, predictions, targets, system, samples
    p = prediction.block_by_id(0)
    t = target.block_by_id(0)
    for part in parts:
        if part != "" and (part not in p.gradients_list() or part not in t.gradients_list()):
            return names, shapes, predictions, targets, system, samples
    if rows:
        system = t.samples.column("system")
    for part in parts:
        if part == "":
            p_block = p
            t_block = t
        else:
            p_block = p.gradient(part)
            t_block = t.gradient(part)
        sample_names = t_block.samples.names
        names.append(sample_names)
        names.append(p_block.samples.names)
        predictions.append(p_block.values)
        targets.append(t_block.values)
        shapes.append(p_block.values.shape)
        shapes.append(t_block.values.shape)
        if (
            divide
            and part != ""
            and "atom" not in sample_names
            and "first_atom" not in sample_names
        ):
            samples.append(t_block.samples.column("sample"))
        else:
            samples.append(None)
    return names, shapes, predictions, targets, system, samples


def _has_atoms(names: list[str]) -> bool:
    return "atom" in names or "first_atom" in names


@dataclass
class _Read:
    """One target of one batch as the fused loss reads it."""

    layout: Hashable
    divided: list[bool]  # per part: divided by the number of atoms
    shift: bool  # the values have a baseline
    scale: bool  # the scaler knows the target
    predictions: list[torch.Tensor]
    targets: list[torch.Tensor]
    system: torch.Tensor | None  # system of each row of the target's values
    samples: list[torch.Tensor | None]  # row of the values of each gradient row (divided)


class PreparedBatch:
    """One batch between model and loss: the systems, the raw model outputs, the
    targets in the units of the data, the scaler and the composition baseline.

    Entries in loss or physical units are computed on first request by the pipeline's
    own functions (``to_loss_units(side, name, raw_map)`` and ``to_metric_units(side,
    name, loss_units_map, scaler)``, given by :mod:`pl_mtt.scaling.pipeline`) and kept;
    :meth:`fused_inputs` gives the fused loss what it needs instead, and :meth:`record`
    keeps its residuals for the metrics.
    """

    def __init__(
        self,
        systems: list[System],
        predictions: Mapping[str, TensorMap],
        targets: Mapping[str, TensorMap],
        scaler: torch.nn.Module | None,
        composition: torch.nn.Module | None,
        *,
        not_divided: frozenset[str],
        to_loss_units: Callable[[str, str, TensorMap], TensorMap],
        to_metric_units: Callable[[str, str, TensorMap, torch.nn.Module | None], TensorMap],
    ) -> None:
        self.systems = list(systems)
        self.raw = {"predictions": dict(predictions), "targets": dict(targets)}
        self.scaler = scaler
        self.composition = composition
        self.not_divided = not_divided
        self.to_metric_units = to_metric_units
        self._to_loss_units = to_loss_units
        self._loss_units: dict[str, dict[str, TensorMap]] = {side: {} for side in SIDES}
        self._reads: dict[tuple, _Read | None] = {}
        self.residuals: dict[str, FusedResiduals] = {}

    def atoms(self) -> BatchAtoms:
        """The flattened atoms of the batch (shared by every stage of the step)."""
        return BatchAtoms.of(self.systems)

    # -- entries -----------------------------------------------------------------------
    def loss_units(self, side: str, name: str) -> TensorMap:
        """Entry ``name`` of the predictions or targets in loss units (computed once)."""
        done = self._loss_units[side]
        found = done.get(name)
        if found is None:
            found = done[name] = self._to_loss_units(side, name, self.raw[side][name])
        return found

    # -- the fused loss ----------------------------------------------------------------
    def _read(self, name: str, parts: list[str]) -> _Read | None:
        """The values and layout of target ``name`` (once per batch), or None when it
        cannot be fused: not one per-structure block with one property in both maps, a
        part missing, prediction and target differing in shape, dtype or device, or
        ``parts`` not starting with the values (``""``)."""
        key = (name, *parts)
        if key in self._reads:
            return self._reads[key]
        self._reads[key] = None
        prediction = self.raw["predictions"].get(name)
        target = self.raw["targets"].get(name)
        if prediction is None or target is None or not parts or parts[0] != "":
            return None
        divide = name not in self.not_divided
        composition = self.composition
        shift = (
            composition is not None
            and name in composition.targets
            and composition.targets[name].per_structure
            and 0 in composition.blocks[name]
        )
        names, shapes, predictions, targets, system, samples = _read_pair(
            prediction, target, parts, divide, divide or shift
        )
        if not names:
            return None
        values_names = names[0]
        if "system" not in values_names or _has_atoms(values_names) or len(shapes[1]) != 2:
            return None
        for index in range(len(parts)):
            p_shape, t_shape = shapes[2 * index], shapes[2 * index + 1]
            p_values, t_values = predictions[index], targets[index]
            if (
                names[2 * index] != names[2 * index + 1]
                or p_shape != t_shape
                or t_shape[-1] != 1
                or p_values.dtype != t_values.dtype
                or p_values.device != t_values.device
            ):
                return None
        scale = self.scaler is not None and name in self.scaler.targets
        layout = (
            tuple(tuple(n) for n in names[::2]),
            tuple(tuple(shape[1:]) for shape in shapes[1::2]),
            targets[0].dtype,
            targets[0].device,
            divide,
            shift,
            scale,
            id(self.scaler),
            id(composition),
        )
        divided = [
            divide and (index == 0 or not _has_atoms(names[2 * index]))
            for index in range(len(parts))
        ]
        read = _Read(layout, divided, shift, scale, predictions, targets, system, samples)
        self._reads[key] = read
        return read

    def fusion_key(self, name: str, parts: list[str]) -> Hashable | None:
        """A key of everything the fused loss of ``name`` depends on besides the values
        (sample names, shapes, dtype, device, division, baseline, scale), or ``None``
        when ``name`` cannot be fused (not one per-structure block with one property, a
        missing part, prediction and target of different shapes)."""
        read = self._read(name, parts)
        return None if read is None else read.layout

    def fused_inputs(self, name: str, parts: list[str]) -> FusedInputs:
        """What the fused loss of ``name`` needs (after :meth:`fusion_key` said it can):
        ``1 / n_atoms`` and the baseline gathered to the target's rows, the inverse
        per-target scale; a handful of tensor operations, no TensorMap built."""
        read = self._read(name, parts)
        predictions, targets = read.predictions, read.targets
        values = targets[0]
        dtype, device = values.dtype, values.device
        divided = any(read.divided)
        atoms = self.atoms() if divided or read.shift else None
        row_factors: list[torch.Tensor | None] = [None] * len(parts)
        if divided:
            per_row = atoms.inverse_atom_counts(dtype).index_select(0, read.system)
            for index, tensor in enumerate(targets):
                if not read.divided[index]:
                    continue
                sample = read.samples[index]
                if sample is None:
                    row_factors[index] = per_row
                else:
                    rows = per_row.index_select(0, sample)
                    row_factors[index] = rows.view(-1, *([1] * (tensor.dim() - 1)))
        shifts: list[torch.Tensor | None] = [None] * len(parts)
        if read.shift:
            baseline = self.composition.structure_baseline(atoms, name, torch.float64)
            if dtype != torch.float64:
                baseline = baseline.to(dtype)
            shifts[0] = baseline.index_select(0, read.system)
        inverse_scale = None
        if read.scale:
            inverse_scale = self.scaler.inverse_scale(name, dtype, device)
        return FusedInputs(parts, predictions, targets, row_factors, shifts, inverse_scale)

    def record(self, name: str, residuals: FusedResiduals) -> None:
        """Keep the loss-unit residuals the fused loss computed for ``name``."""
        self.residuals[name] = residuals


class _Entries(MutableMapping):
    """A ``Dict[str, TensorMap]`` whose entries are computed on first access; entries
    assigned (or deleted) are taken as given."""

    def __init__(self, batch: PreparedBatch, side: str, source_keys: list[str]) -> None:
        self.batch = batch
        self.side = side
        self._keys = list(source_keys)
        self._given: dict[str, TensorMap] = {}

    def _compute(self, name: str) -> TensorMap:
        raise NotImplementedError

    def __getitem__(self, name: str) -> TensorMap:
        given = self._given.get(name)
        if given is not None:
            return given
        if name not in self._keys:
            raise KeyError(name)
        return self._compute(name)

    def __setitem__(self, name: str, value: TensorMap) -> None:
        self._given[name] = value
        if name not in self._keys:
            self._keys.append(name)

    def __delitem__(self, name: str) -> None:
        if name not in self._keys:
            raise KeyError(name)
        self._keys.remove(name)
        self._given.pop(name, None)

    def __contains__(self, name: object) -> bool:
        return name in self._keys

    def __iter__(self) -> Iterator[str]:
        return iter(list(self._keys))

    def __len__(self) -> int:
        return len(self._keys)

    def copy(self) -> _Entries:
        """A new mapping over the same batch, with the same entries."""
        new = object.__new__(type(self))
        new.__dict__.update(self.__dict__)
        new._keys = list(self._keys)
        new._given = dict(self._given)
        return new

    def is_lazy(self, name: str) -> bool:
        """Whether entry ``name`` is still the batch's own (neither assigned nor removed)."""
        return name in self._keys and name not in self._given

    def layout(self, name: str) -> TensorMap | None:
        """A TensorMap with the metadata of entry ``name`` (no value computed), or None."""
        given = self._given.get(name)
        if given is not None:
            return given
        if name not in self._keys:
            return None
        return self.batch.raw[self.side].get(name)

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.side}: {self._keys})"


class LossUnits(_Entries):
    """Predictions or targets in loss units (see the module docstring)."""

    def _compute(self, name: str) -> TensorMap:
        return self.batch.loss_units(self.side, name)


class PhysicalUnits(_Entries):
    """Predictions or targets in physical units for metrics, read from a
    :class:`LossUnits` mapping (see :func:`pl_mtt.scaling.for_metrics`)."""

    def __init__(self, source: LossUnits, scaler: torch.nn.Module | None) -> None:
        super().__init__(source.batch, source.side, list(source))
        self.source = source
        self.scaler = scaler
        self._done: dict[str, TensorMap] = {}

    def _compute(self, name: str) -> TensorMap:
        found = self._done.get(name)
        if found is None:
            found = self._done[name] = self.batch.to_metric_units(
                self.side, name, self.source[name], self.scaler
            )
        return found

    def is_lazy(self, name: str) -> bool:
        return super().is_lazy(name) and self.source.is_lazy(name)


def _pair_batch(predictions: Mapping, targets: Mapping, kind: type) -> PreparedBatch | None:
    """The batch behind a (predictions, targets) pair of ``kind`` mappings, or None."""
    if (
        type(predictions) is kind
        and type(targets) is kind
        and predictions.batch is targets.batch
        and predictions.side == "predictions"
        and targets.side == "targets"
    ):
        return targets.batch
    return None


def prepared_pair(predictions: Mapping, targets: Mapping) -> PreparedBatch | None:
    """The batch behind ``predictions`` and ``targets`` when both are the
    :class:`LossUnits` of one :func:`prepare_for_loss` call, else None."""
    return _pair_batch(predictions, targets, LossUnits)


def physical_pair(predictions: Mapping, targets: Mapping) -> PreparedBatch | None:
    """The batch behind ``predictions`` and ``targets`` when both are the
    :class:`PhysicalUnits` of one :func:`for_metrics` call (with the batch's scaler),
    else None."""
    batch = _pair_batch(predictions, targets, PhysicalUnits)
    if batch is None or not (predictions.scaler is targets.scaler is batch.scaler):
        return None
    return batch
