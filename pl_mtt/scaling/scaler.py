"""Scaler: per-target and per-property scales of training targets (spec: target scaling).

Scales are uncentered RMS values without Bessel's correction of the targets as given to
:meth:`Scaler.accumulate` (baseline removed, per-structure targets divided by their
number of atoms; :mod:`pl_mtt.scaling.fit` prepares them in one pass). For every block
``a``, property ``p`` and (per-atom targets) atomic type ``Z`` one pass keeps, in float64,

- ``S[a, Z, p]``: the sum of squares of the entries that count (not NaN, not masked out
  by ``extra_data["<target>_mask"]``), over samples and components;
- ``N[a, Z, p]``: the number of such entries.

Everything follows from these sums, without a second pass (DESIGN decision 3):

- full scale (``scales``): ``sqrt(S[a, Z, p] / N[a, Z, p])``, the raw per-property RMS;
- per-target scale (``per_target_scales``): ``sqrt(sum_ap S / sum_ap N)``, pooled over
  blocks and properties (per type for per-atom targets, over all structures for
  per-structure targets);
- per-property scale (``per_property_scales``): ``full / per_target`` for multi-property
  targets (more than one block, or one block with several properties); 1.0 otherwise,
  so that always ``full = per_target x per_property``.

Zero RMS or no samples give 1.0 (a per-property factor of 1.0 for an empty or all-zero
block, a per-target scale of 1.0 for a type without samples). Blocks keyed by
``atom_type`` belong wholly to that type; atom-pair targets are never fitted (1.0);
targets listed in ``no_per_property_scales`` (DOS) get one pooled per-target scale and
per-property scales 1.0. Gradients are not scaled separately: they follow their target.

The per-type sums are one ``index_add_`` over the rows of each block, so the cost of
the pass does not depend on the number of atomic types.

Applying scales (:meth:`Scaler.forward`) is one :func:`pl_mtt.tensormaps.block_ops.transform_map`
call per TensorMap with the factor tables of :meth:`Scaler.factor_tables`, which
:mod:`pl_mtt.scaling` also fuses with the baseline and the division by atoms.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from typing import Any

import torch
from metatensor.torch import Labels, TensorBlock, TensorMap
from metatomic.torch import System
from torch.nn.functional import pad

from pl_mtt.scaling.one_pass import OnePassState, check_mask, known_names
from pl_mtt.scaling.target_info import (
    TargetInfo,
)
from pl_mtt.tensormaps.batch_atoms import BatchAtoms
from pl_mtt.tensormaps.block_ops import grouped_sums, transform_map

__all__ = ["Scaler", "rms_scales"]


def rms_scales(
    sum_sq: list[torch.Tensor], count: list[torch.Tensor], *, pooled_only: bool
) -> tuple[torch.Tensor, list[torch.Tensor]]:
    """Per-target and per-property scales of one target from its sums.

    Args:
        sum_sq: per block, ``[rows, n_properties]`` sums of squares (rows: types or 1).
        count: per block, the matching numbers of entries.
        pooled_only: per-property scales are all 1.0 (single-property targets, DOS).

    Returns:
        ``per_target`` ``[rows]`` and per block ``per_property`` ``[rows, n_properties]``,
        with 1.0 wherever there are no samples or the RMS is zero.
    """
    total_sq = sum(s.sum(-1) for s in sum_sq)
    total_n = sum(n.sum(-1) for n in count)
    per_target = _safe_rms(total_sq, total_n)
    per_property = []
    for s, n in zip(sum_sq, count, strict=True):
        if pooled_only:
            per_property.append(torch.ones_like(s))
            continue
        full = torch.sqrt(s / n.clamp(min=1))
        valid = (n > 0) & (full > 0)
        per_property.append(torch.where(valid, full / per_target[:, None], torch.ones_like(s)))
    return per_target, per_property


def _safe_rms(sum_sq: torch.Tensor, count: torch.Tensor) -> torch.Tensor:
    rms = torch.sqrt(sum_sq.clamp(min=0) / count.clamp(min=1))
    return torch.where((count > 0) & (rms > 0), rms, torch.ones_like(rms))


class _TargetScales(torch.nn.Module):
    """Buffers of one target: ``per_target`` ``[rows]``, ``per_property_<b>`` ``[rows, P_b]``."""

    def __init__(self, rows: int, n_properties: list[int]) -> None:
        super().__init__()
        self.register_buffer("per_target", torch.ones(rows, dtype=torch.float64))
        for index, n in enumerate(n_properties):
            self.register_buffer(f"per_property_{index}", torch.ones(rows, n, dtype=torch.float64))
        self.n_blocks = len(n_properties)

    def per_property(self) -> list[torch.Tensor]:
        return [getattr(self, f"per_property_{b}") for b in range(self.n_blocks)]


class Scaler(OnePassState, torch.nn.Module):
    """Fits and applies per-target and per-property scales (see the module docstring).

    Args:
        atomic_types: atomic types of the per-type scales, in the order of the rows of
            the public TensorMaps; ``None`` to discover them from the data (internal
            state then has one row per atomic number 0..118).
        layouts: target name -> zero-sample TensorMap describing the target.
        no_per_property_scales: targets that get one pooled per-target scale and no
            per-property scales (DOS targets).
        per_structure_targets: per-structure targets that are NOT divided by the number
            of atoms (intensive quantities); read by :mod:`pl_mtt.scaling`.

    .. code-block:: python

        scaler = Scaler([1, 6, 8], {"energy": energy_layout})
        for systems, targets, extra_data in batches:   # baseline-free, divided by atoms
            scaler.accumulate(systems, targets, extra_data)
        scaler.fit()
        scaled = scaler(systems, outputs, remove=True)  # divide by the full scales
    """

    def __init__(
        self,
        atomic_types: Sequence[int] | None,
        layouts: Mapping[str, TensorMap],
        *,
        no_per_property_scales: Sequence[str] = (),
        per_structure_targets: Sequence[str] = (),
    ) -> None:
        super().__init__()
        self._set_targets(atomic_types, layouts, per_structure_targets)
        self.no_per_property_scales = known_names(
            no_per_property_scales, self.targets, "no_per_property_scales"
        )
        n_rows = self.type_table.n_rows
        self.target_scales = torch.nn.ModuleList(
            [
                _TargetScales(n_rows if info.per_atom else 1, [b.n_properties for b in info.blocks])
                for info in self.targets.values()
            ]
        )
        self.reset_sums()

    # -- what it was built for (saved in the state_dict) -----------------------------
    def options(self) -> dict[str, Any]:
        return {"no_per_property_scales": sorted(self.no_per_property_scales)}

    # -- accumulation --------------------------------------------------------------
    def reset_sums(self) -> None:
        """Forget everything accumulated (the fitted scales are kept)."""
        n_rows = self.type_table.n_rows
        self._sum_sq: dict[str, list[torch.Tensor]] = {}
        self._count: dict[str, list[torch.Tensor]] = {}
        for name, info in self.targets.items():
            rows = n_rows if info.per_atom else 1
            shapes = [(rows, b.n_properties) for b in info.blocks]
            self._sum_sq[name] = [torch.zeros(s, dtype=torch.float64) for s in shapes]
            self._count[name] = [torch.zeros(s, dtype=torch.float64) for s in shapes]
        self._type_count = torch.zeros(n_rows, dtype=torch.float64)

    def sum_tensors(self) -> list[torch.Tensor]:
        out = [self._type_count]
        for name in self.targets:
            out.extend(self._sum_sq[name])
            out.extend(self._count[name])
        return out

    def add_to_sums(self, corrections: Mapping[str, Mapping[int, torch.Tensor]]) -> None:
        """Add ``corrections[target][block]`` (``[rows, P_b]``) to the sums of squares.

        :class:`pl_mtt.CompositionModel` uses this to turn sums accumulated around its
        shift into sums of the residuals of the fitted baseline (see
        :mod:`pl_mtt.scaling.composition`).
        """
        for name, blocks in corrections.items():
            for index, delta in blocks.items():
                target = self._sum_sq[name][index]
                target += delta.to(device=target.device, dtype=torch.float64)

    def _move_sums(self, device: torch.device) -> None:
        if self._type_count.device != device:
            for name in self.targets:
                self._sum_sq[name] = [s.to(device) for s in self._sum_sq[name]]
                self._count[name] = [s.to(device) for s in self._count[name]]
            self._type_count = self._type_count.to(device)

    @torch.no_grad()
    def accumulate(
        self,
        systems: list[System],
        targets: Mapping[str, TensorMap],
        extra_data: Mapping[str, TensorMap] | None = None,
    ) -> None:
        """Add one batch to the sums. Never modifies its inputs.

        ``targets`` are taken as given: baseline removed and per-structure targets
        divided by the number of atoms (:mod:`pl_mtt.scaling.fit` does both). NaN entries
        and entries where ``extra_data["<target>_mask"]`` is zero do not count.

        Raises:
            ValueError: for a target the scaler does not know, a target or mask whose
                layout differs from the target's layout, or atomic types outside
                ``atomic_types``.
        """
        extra_data = extra_data or {}
        atoms = BatchAtoms.of(systems)
        atoms.type_rows(self.type_table, check=True)
        self._move_sums(atoms.device)
        self._type_count += atoms.type_totals(self.type_table)
        for name, tensor in targets.items():
            info = self._target_info(name)
            info.check(tensor, "target")
            if info.atom_pair:
                continue
            mask = extra_data.get(name + "_mask")
            if mask is not None:
                check_mask(mask, tensor, name)
            for index, block in enumerate(tensor.blocks()):
                mask_values = None if mask is None else mask.block_by_id(index).values
                self._add_block(name, index, info, block, mask_values, atoms)

    def _add_block(
        self,
        name: str,
        index: int,
        info: TargetInfo,
        block: TensorBlock,
        mask: torch.Tensor | None,
        atoms: BatchAtoms,
    ) -> None:
        block_type = info.blocks[index].atom_type
        n_rows = self.type_table.n_rows
        if info.per_structure or block_type is not None:
            row = 0 if info.per_structure else self.type_table.row_of(block_type)
            if row >= n_rows:
                raise ValueError(
                    f"target '{name}', block {index}: key atom_type={block_type} is not "
                    f"among atomic_types {self.type_table.types}"
                )
            squares, counts = grouped_sums(block.values.detach(), None, 1, mask, square=True)
            self._sum_sq[name][index][row] += squares[0]
            self._count[name][index][row] += counts[0]
            return
        rows = atoms.types_of(block.samples, self.type_table)
        squares, counts = grouped_sums(block.values.detach(), rows, n_rows, mask, square=True)
        self._sum_sq[name][index] += squares
        self._count[name][index] += counts

    # -- fitting -------------------------------------------------------------------
    @torch.no_grad()
    def fit(self, fixed_scales: Mapping[str, object] | None = None) -> None:
        """Compute all scales from the accumulated sums.

        Args:
            fixed_scales: target name -> its per-target scale instead of the fitted one:
                a number, or for per-atom targets a mapping atomic type -> number (types
                not listed keep their fitted scale) or a list in ``atomic_types`` order.
                Per-property factors of multi-property targets keep their fitted values.

        .. code-block:: yaml

            fixed_scales:
              energy: 0.5
              mtt::charge: {1: 0.2, 8: 0.9}
        """
        fixed_scales = dict(fixed_scales or {})
        known_names(list(fixed_scales), self.targets, "fixed_scales")
        for (name, info), state in zip(self.targets.items(), self.target_scales, strict=True):
            if info.atom_pair:
                continue
            per_target, per_property = rms_scales(
                self._sum_sq[name],
                self._count[name],
                pooled_only=(not info.multi_property) or name in self.no_per_property_scales,
            )
            if name in fixed_scales:
                per_target = self._fixed(name, info, fixed_scales[name], per_target)
            state.per_target.copy_(per_target)
            for buffer, values in zip(state.per_property(), per_property, strict=True):
                buffer.copy_(values)
        self.type_seen.copy_(self._type_count > 0)
        self.fitted.fill_(True)

    @torch.no_grad()
    def set_scales(
        self,
        per_target: Mapping[str, torch.Tensor],
        per_property: Mapping[str, Sequence[torch.Tensor]],
        types_seen: torch.Tensor,
    ) -> None:
        """Load scales without a pass (e.g. from a statistics file): ``per_target[name]``
        is ``[rows]`` and ``per_property[name][b]`` ``[rows, P_b]`` (rows: one per row of
        the type table for per-atom targets, else 1); ``types_seen`` ``[n_rows]``."""
        for (name, info), state in zip(self.targets.items(), self.target_scales, strict=True):
            if info.atom_pair:
                continue
            state.per_target.copy_(per_target[name])
            for buffer, values in zip(state.per_property(), per_property[name], strict=True):
                buffer.copy_(values)
        self.type_seen.copy_(types_seen)
        self.fitted.fill_(True)

    def scale_tables(self, name: str) -> tuple[torch.Tensor, list[torch.Tensor]]:
        """The fitted ``per_target`` ``[rows]`` and per block ``per_property`` ``[rows, P_b]``
        tables of target ``name`` (rows as in :meth:`set_scales`)."""
        state = self.target_scales[self._index[self._target_info(name).name]]
        return state.per_target, state.per_property()

    def _fixed(
        self, name: str, info: TargetInfo, value: object, fitted: torch.Tensor
    ) -> torch.Tensor:
        path = f"fixed_scales.{name}"
        result = fitted.clone()
        if isinstance(value, (Mapping, list, tuple)):
            if not info.per_atom:
                raise ValueError(
                    f"{path}: per-type scales need a per-atom target; '{name}' is "
                    f"{info.kind}: give one number"
                )
            if isinstance(value, Mapping):
                items = list(value.items())
            else:
                types = self.atomic_types
                if len(value) != len(types):
                    raise ValueError(
                        f"{path}: expected {len(types)} values (one per atomic type "
                        f"{types}), got {len(value)}"
                    )
                items = list(zip(types, value, strict=True))
            for atomic_type, scale in items:
                row = self.type_table.row_of(atomic_type)
                if row >= self.type_table.n_rows:
                    raise ValueError(
                        f"{path}: atomic type {atomic_type!r} is not among {self.type_table.types}"
                    )
                result[row] = _positive(scale, f"{path}.{atomic_type}")
            return result
        result.fill_(_positive(value, path))
        return result

    # -- results -------------------------------------------------------------------
    def _public(self, which: str) -> dict[str, TensorMap]:
        result = {}
        for (name, info), state in zip(self.targets.items(), self.target_scales, strict=True):
            device = state.per_target.device
            if info.per_atom:
                samples, index = self._type_samples(device)
            else:
                samples = Labels(["atomic_type"], torch.tensor([[-1]], dtype=torch.int32)).to(
                    device
                )
                index = torch.zeros(1, dtype=torch.long, device=device)
            blocks = []
            for b, per_property in enumerate(state.per_property()):
                per_target = state.per_target[:, None].expand_as(per_property)
                values = {
                    "full": per_target * per_property,
                    "per_target": per_target,
                    "per_property": per_property,
                }[which]
                blocks.append(
                    TensorBlock(
                        values=values[index].clone(),
                        samples=samples,
                        components=[],
                        properties=info.blocks[b].properties.to(device),
                    )
                )
            result[name] = TensorMap(info.keys.to(device), blocks)
        return result

    @property
    def scales(self) -> dict[str, TensorMap]:
        """Full scales (per-target x per-property = the raw per-property RMS)."""
        return self._public("full")

    @property
    def per_target_scales(self) -> dict[str, TensorMap]:
        """Per-target scales, repeated over blocks and properties."""
        return self._public("per_target")

    @property
    def per_property_scales(self) -> dict[str, TensorMap]:
        """Per-property correction factors (1.0 for single-property and DOS targets)."""
        return self._public("per_property")

    # -- applying ------------------------------------------------------------------
    def _tables(
        self, name: str, use_per_target: bool, use_per_property: bool
    ) -> list[torch.Tensor] | None:
        """Per block the factor table ``[rows, P_b]``, or None when all factors are 1."""
        info = self.targets[name]
        pooled = (not info.multi_property) or name in self.no_per_property_scales
        if info.atom_pair or (not use_per_target and (pooled or not use_per_property)):
            return None
        state = self.target_scales[self._index[name]]
        if name in self.no_per_property_scales:
            # one factor per row, broadcast over any number of properties (a DOS
            # prediction has n + extra_targets points, its target n)
            return [state.per_target[:, None] for _ in state.per_property()]
        tables = []
        for per_property in state.per_property():
            if use_per_target and use_per_property:
                tables.append(state.per_target[:, None] * per_property)
            elif use_per_target:
                tables.append(state.per_target[:, None].expand_as(per_property))
            else:
                tables.append(per_property)
        return tables

    def factor_tables(
        self,
        systems: list[System],
        name: str,
        tensor: TensorMap,
        use_per_target_scales: bool = True,
        use_per_property_scales: bool = True,
    ) -> list[torch.Tensor | None] | None:
        """The scale factors of output ``name`` as tables for
        :func:`pl_mtt.tensormaps.block_ops.transform_map`: per block ``[1, P]`` or, for per-atom
        outputs, one row per atom of the batch; ``None`` when every factor is 1 or the
        name is not a target (or ensemble output) of this scaler. Checks the layout."""
        target = name if name in self.targets else self._ensembles.get(name)
        if target is None:
            return None
        info = self.targets[target]
        pooled = target in self.no_per_property_scales
        members = info.check(tensor, "output", ensemble=target != name, any_properties=pooled)
        tables = self._tables(target, use_per_target_scales, use_per_property_scales)
        if tables is None:
            return None
        result: list[torch.Tensor | None] = []
        for index, table in enumerate(tables):
            if members > 1 and not pooled:
                table = table.repeat(1, members)
            result.append(self._entity_factors(systems, info, index, table))
        return result

    def inverse_scale(
        self, name: str, dtype: torch.dtype, device: torch.device
    ) -> torch.Tensor | None:
        """``1 / per-target scale`` of a per-structure target as a 0-dim tensor (cached
        until the scales change), or ``None`` when the scaler does not know ``name``.
        Multiplying by it is :meth:`forward` with ``remove=True`` and the per-target
        scales only, for a single-property target."""
        info = self.targets.get(name)
        if info is None or not info.per_structure:
            return None
        per_target = self.target_scales[self._index[name]].per_target
        return self.derived(
            ("inverse scale", name, dtype, device),
            [per_target],
            lambda: (1.0 / per_target[0]).to(device=device, dtype=dtype),
        )

    def forward(
        self,
        systems: list[System],
        outputs: Mapping[str, TensorMap],
        remove: bool = False,
        use_per_target_scales: bool = True,
        use_per_property_scales: bool = True,
    ) -> dict[str, TensorMap]:
        """Multiply (``remove=False``) or divide (``remove=True``) outputs by scales.

        Uses per-target x per-property (full) scales by default; either factor can be
        left out. Per-atom outputs are scaled per atomic type of each atom (from
        ``systems``; atoms of types the scaler does not know get 1.0), per-structure
        outputs by their single row, gradient blocks like their values, ensemble outputs
        (:func:`pl_mtt.tensormaps.builders.ensemble_output_name`) like their target per member.
        Outputs of unknown names pass through unchanged. Returns a new dict; the inputs
        are never modified.
        """
        result: dict[str, TensorMap] = {}
        for name, tensor in outputs.items():
            tables = self.factor_tables(
                systems, name, tensor, use_per_target_scales, use_per_property_scales
            )
            if tables is None:
                result[name] = tensor
                continue
            target = name if name in self.targets else self._ensembles[name]
            per_atom = self.targets[target].per_atom
            first_atom = BatchAtoms.of(systems).first_atom if per_atom else None
            new = transform_map(tensor, remove, None, tables, None, first_atom)
            result[name] = tensor if new is None else new
        return result

    def _entity_factors(
        self, systems: list[System], info: TargetInfo, index: int, table: torch.Tensor
    ) -> torch.Tensor:
        """``[1, P]`` factors of a block, or ``[n_atoms, P]`` per atom of the batch."""
        if info.per_structure:
            return table
        block_type = info.blocks[index].atom_type
        if block_type is not None:
            row = self.type_table.row_of(block_type)
            if row >= self.type_table.n_rows:
                return torch.ones_like(table[:1])
            return table[row : row + 1]
        padded = pad(table, (0, 0, 0, 1), value=1.0)  # unknown types: 1.0
        return padded.index_select(0, BatchAtoms.of(systems).type_rows(self.type_table))


def _positive(value: object, path: str) -> float:
    try:
        number = float(value)  # type: ignore[arg-type]
    except (TypeError, ValueError):
        raise ValueError(f"{path}: expected a positive number, got {value!r}") from None
    if not math.isfinite(number) or number <= 0:
        raise ValueError(f"{path}: expected a positive finite number, got {value!r}")
    return number
