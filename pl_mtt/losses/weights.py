"""Sample and per-type weights of a loss term's entries.

.. code-block:: yaml

    loss:
      energy:
        sample_weights: config_weight         # extra_data["config_weight"]
        forces:
          sample_weights: config_weight       # the structure's weight on its force rows too
          type_weights: {29: 1.0, 79: 2.0}    # forces on Cu x 1, on Au x 2, other types x 1

A weighted term computes ``sum_i w_i l_i`` over its entries; ``mean`` divides by
``sum_i w_i`` over the entries that count (NaN targets and masked-out entries count for
neither), so uniform weights change nothing. ``extra_data[<name>]`` is one of:

- **per structure**: one block, samples ``["system"]``, one property, no components; a
  structure's value weights every entry of the term that belongs to it (its energy, its
  force and stress rows, its per-atom rows);
- **per atom**: one block, samples ``["system", "atom"]``, one property, no components;
  an atom's value weights the entries of the rows that name it (rows of a per-atom
  target, force rows);
- **the target's own layout** (the target's keys, sample names and shapes, any
  property names; for a gradient term with that gradient): one weight per entry.

Type weights multiply the weight of every row that names an atom (``system`` and
``atom`` sample columns: per-atom targets, forces) by the weight of its atomic type
(unlisted types 1.0); a term whose rows name no atom cannot have them. Everything is
gathered with tensor operations from the rows' sample columns, never a loop over atoms.

Weights must be finite and non-negative. Values on the CPU are checked in every call;
values on an accelerator in the first call of each :class:`EntryWeights`, and later
without reading them on the host in the step: an invalid-entry flag per call is kept on
the device and read every :attr:`EntryWeights.CHECK_EVERY` calls (and by
:meth:`EntryWeights.check_pending`), so a bad weight stops the run within that many
steps with the same error.
"""

from __future__ import annotations

from collections.abc import Mapping

import torch
from metatensor.torch import TensorBlock, TensorMap

from pl_mtt.losses.layout_checks import CheckedTerm, check_same_layout
from pl_mtt.tensormaps.batch_atoms import BatchAtoms, TypeTable

__all__ = ["PER_ATOM", "PER_ENTRY", "PER_STRUCTURE", "EntryWeights"]


PER_STRUCTURE = "per structure"
PER_ATOM = "per atom"
PER_ENTRY = "per entry"


class EntryWeights:
    """The weights of one term: ``extra_data[sample_weights]`` and/or ``type_weights``
    (atomic number -> weight).

    Args:
        sample_weights: the ``extra_data`` key of the weights, or None.
        type_weights: atomic number -> weight of the rows of atoms of that type, or None.
    """

    CHECK_EVERY = 64
    """Calls between two host reads of the invalid-weight flags of device tensors."""

    HOST_DEVICES: tuple[str, ...] = ("cpu",)
    """Device types whose weights are read on the host in every call (no synchronisation)."""

    def __init__(
        self, sample_weights: str | None = None, type_weights: Mapping[int, float] | None = None
    ) -> None:
        self.sample_key = sample_weights
        self.type_weights = {int(k): float(v) for k, v in (type_weights or {}).items()}
        for atomic_type, weight in self.type_weights.items():
            if not weight >= 0 or weight == float("inf"):
                raise ValueError(
                    f"type_weights: the weight of type {atomic_type} must be finite and "
                    f">= 0, got {weight!r}"
                )
        self.table = TypeTable(list(self.type_weights)) if self.type_weights else None
        self._per_type: dict[tuple[torch.dtype, torch.device], torch.Tensor] = {}
        self._pending: list[tuple[str, torch.Tensor]] = []  # (term, invalid flag on device)
        self._checked_devices: set[torch.device] = set()

    def __repr__(self) -> str:
        parts = []
        if self.sample_key is not None:
            parts.append(f"sample_weights={self.sample_key!r}")
        if self.type_weights:
            parts.append(f"type_weights={self.type_weights}")
        return ", ".join(parts)

    @property
    def what(self) -> str:
        """``sample_weights extra_data['<key>']`` for error messages."""
        return f"sample_weights extra_data['{self.sample_key}']"

    # -- per block of a term -------------------------------------------------------
    def block_weights(
        self,
        term: CheckedTerm,
        target: TensorMap,
        values: list[torch.Tensor],
        extra_data: Mapping[str, TensorMap] | None,
        systems: list | None,
    ) -> list[torch.Tensor]:
        """Per block of ``term`` in ``target`` (values or gradient blocks; ``values``
        their values), the weights of its entries: a tensor that broadcasts against
        ``values[k]`` (``(n_rows, 1, ..., 1)`` or the full shape), in its dtype."""
        blocks = term.term_blocks(target, "the target")
        weights: list[torch.Tensor | None] = [None] * len(blocks)
        atoms = None
        if self.sample_key is not None:
            weight_map = self._weight_map(term, extra_data)
            kind, weight_values = self._kind(term, target, blocks, values, weight_map)
            if kind == PER_ENTRY:
                weights = [w.to(v.dtype) for w, v in zip(weight_values, values, strict=True)]
                for w in weight_values:
                    self._check_values(term, w)
            else:
                weight_block = weight_map.block_by_id(0)
                flat = weight_block.values.reshape(-1).to(values[0].dtype)
                self._check_values(term, flat)
                if kind == PER_STRUCTURE:
                    by_system = _by_row(flat, weight_block.samples.column("system"), len(flat))
                else:
                    atoms = _batch_atoms(term, systems, "per-atom sample_weights")
                    index = _flat_atoms(atoms, weight_block.samples)
                    by_atom = _by_row(flat, index, atoms.total_atoms)
                for k, block in enumerate(blocks):
                    if kind == PER_STRUCTURE:
                        rows = by_system.index_select(0, _row_systems(term, target, k, block))
                    else:
                        rows = by_atom.index_select(0, self._row_atoms(term, atoms, block))
                    weights[k] = _per_row(rows, values[k])
        if self.table is not None:
            if atoms is None:
                atoms = _batch_atoms(term, systems, "type_weights")
            type_rows = atoms.type_rows(self.table)
            per_type = self._type_values(values[0].dtype, values[0].device)
            for k, block in enumerate(blocks):
                flat_atoms = self._row_atoms(term, atoms, block, "type_weights")
                rows = per_type.index_select(0, type_rows.index_select(0, flat_atoms))
                rows = _per_row(rows, values[k])
                weights[k] = rows if weights[k] is None else weights[k] * rows
        return weights

    def structure_weights(
        self,
        term: CheckedTerm,
        target: TensorMap,
        extra_data: Mapping[str, TensorMap] | None,
    ) -> torch.Tensor:
        """``(n_rows,)`` weight of each row of a per-structure term (one loss per row of
        ``target``'s single block: ``masked_dos``, ``shift_agnostic_mse``), from per
        structure ``sample_weights``."""
        weight_map = self._weight_map(term, extra_data)
        block = weight_map.block_by_id(0)
        if not _is_one_value_per(weight_map, ["system"]):
            raise term.error(
                f"{self.what} must have one value per structure (one block, samples "
                f"['system'], one property, no components): {_describe(weight_map)}; a loss "
                f"of one value per structure takes no per-entry weights"
            )
        flat = block.values.reshape(-1)
        self._check_values(term, flat)
        by_system = _by_row(flat, block.samples.column("system"), len(flat))
        target_block = target.block_by_id(0)
        rows = by_system.index_select(0, target_block.samples.column("system"))
        return rows.to(target_block.values.dtype)

    # -- helpers -------------------------------------------------------------------
    def _weight_map(
        self, term: CheckedTerm, extra_data: Mapping[str, TensorMap] | None
    ) -> TensorMap:
        if extra_data is None or self.sample_key not in extra_data:
            available = sorted(extra_data) if extra_data else []
            raise term.error(
                f"{self.what} is missing: the batch's extra_data has no '{self.sample_key}' "
                f"(available: {available}); give it in the data's extra_data (e.g. "
                f"data.extra_data.{self.sample_key}: {{key: {self.sample_key}}} to read it "
                f"from the structure file)"
            )
        return extra_data[self.sample_key]

    def _kind(
        self,
        term: CheckedTerm,
        target: TensorMap,
        blocks: list[TensorBlock],
        values: list[torch.Tensor],
        weight_map: TensorMap,
    ) -> tuple[str, list[torch.Tensor]]:
        """How ``weight_map`` applies to the term, and the per-entry weight values (for
        :data:`PER_ENTRY`). One value per structure or per atom is placed by the rows'
        sample columns (whatever the order of the rows), so those forms come first; a
        gradient term whose weights have that gradient takes them per entry."""
        has_gradient = term.gradient is not None and all(
            term.gradient in b.gradients_list() for b in weight_map.blocks()
        )
        if not has_gradient:
            if _is_one_value_per(weight_map, ["system"]):
                return PER_STRUCTURE, []
            if _is_one_value_per(weight_map, ["system", "atom"]):
                return PER_ATOM, []
        if len(weight_map) == len(target) and (term.gradient is None or has_gradient):
            weight_blocks = weight_map.blocks()
            if term.gradient is not None:
                weight_blocks = [b.gradient(term.gradient) for b in weight_blocks]
            if weight_blocks and all(
                w.values.shape == v.shape and w.samples.names == b.samples.names
                for w, v, b in zip(weight_blocks, values, blocks, strict=True)
            ):
                term.check_once(
                    ("sample weights", self.sample_key, _shapes(values)),
                    lambda: _check_entry_layout(
                        term, target, blocks, weight_map, weight_blocks, self.what
                    ),
                )
                return PER_ENTRY, [w.values for w in weight_blocks]
        target_names = [b.samples.names for b in blocks]
        raise term.error(
            f"{self.what} must have one value per structure (one block, samples ['system'], "
            f"one property, no components), one value per atom (samples ['system', 'atom']) "
            f"or the layout of the target ({len(blocks)} block(s), samples {target_names[0]}, "
            f"values of shape {tuple(values[0].shape)}"
            + (f", in its '{term.gradient}' gradient" if term.gradient else "")
            + f"); got {_describe(weight_map)}"
        )

    def _row_atoms(
        self,
        term: CheckedTerm,
        atoms: BatchAtoms,
        block: TensorBlock,
        what: str = "per-atom sample_weights",
    ) -> torch.Tensor:
        names = block.samples.names
        if "system" not in names or "atom" not in names:
            raise term.error(
                f"{what} weight the rows of atoms, but the rows of this term (samples "
                f"{names}) name no atom; they apply to per-atom entries (forces, per-atom "
                f"targets)"
            )
        return _flat_atoms(atoms, block.samples)

    def _type_values(self, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
        """``[n_types + 1]``: the weight of each listed type, then 1.0 (unlisted types)."""
        found = self._per_type.get((dtype, device))
        if found is None:
            values = [*self.type_weights.values(), 1.0]
            found = self._per_type[(dtype, device)] = torch.tensor(values, dtype=dtype).to(device)
        return found

    def _check_values(self, term: CheckedTerm, values: torch.Tensor) -> None:
        """Weights must be finite and >= 0 (see the module docstring for when the check
        reads the values)."""
        if values.numel() == 0:
            return
        low, high = torch.aminmax(values)
        if values.device.type in self.HOST_DEVICES or values.device not in self._checked_devices:
            self._checked_devices.add(values.device)
            if not (float(low) >= 0 and float(high) < float("inf")):
                raise self._invalid(term, float(low), float(high))
            return
        invalid = torch.logical_not(torch.logical_and(low >= 0, high < float("inf")))
        self._pending.append((term.description, invalid))
        if len(self._pending) >= self.CHECK_EVERY:
            self.check_pending(term)

    def check_pending(self, term: CheckedTerm | None = None) -> None:
        """Read the invalid-weight flags kept on the device (one host read) and raise
        if any was set."""
        if not self._pending:
            return
        pending = list(self._pending)
        self._pending.clear()
        flags = torch.stack([flag for _, flag in pending])
        if bool(flags.any()):
            first = int(flags.to(torch.int64).argmax())
            description = pending[first][0]
            calls = (
                "the last call" if len(pending) == 1 else f"one of the last {len(pending)} calls"
            )
            raise ValueError(
                f"loss on {description}: {self.what} had negative, NaN or infinite values "
                f"in {calls}; weights must be finite and >= 0"
            )

    def _invalid(self, term: CheckedTerm, low: float, high: float) -> ValueError:
        return term.error(
            f"{self.what} has negative, NaN or infinite values (smallest {low!r}, largest "
            f"{high!r}); weights must be finite and >= 0"
        )


def _shapes(values: list[torch.Tensor]) -> tuple:
    return tuple((tuple(v.shape[1:]), v.dtype, v.device) for v in values)


def _is_one_value_per(tensor_map: TensorMap, names: list[str]) -> bool:
    if len(tensor_map) != 1:
        return False
    block = tensor_map.block_by_id(0)
    return block.values.dim() == 2 and block.values.shape[1] == 1 and block.samples.names == names


def _describe(tensor_map: TensorMap) -> str:
    if len(tensor_map) == 0:
        return "no blocks"
    block = tensor_map.block_by_id(0)
    return (
        f"{len(tensor_map)} block(s), samples {block.samples.names}, components "
        f"{[c.names for c in block.components]}, values of shape {tuple(block.values.shape)}, "
        f"gradients {block.gradients_list()}"
    )


def _check_entry_layout(
    term: CheckedTerm,
    target: TensorMap,
    blocks: list[TensorBlock],
    weight_map: TensorMap,
    weight_blocks: list[TensorBlock],
    what: str,
) -> None:
    # property names are not compared: weights read from a file name them otherwise
    check_same_layout(
        term, target, blocks, weight_map, weight_blocks, ("target", what), properties=False
    )
    for index, (block, weight_block) in enumerate(zip(blocks, weight_blocks, strict=True)):
        if block.samples != weight_block.samples:
            raise term.error(
                f"block {index}: the rows of {what} are not those of the target (same "
                f"samples in the same order are needed for one weight per entry)"
            )


def _batch_atoms(term: CheckedTerm, systems: list | None, what: str) -> BatchAtoms:
    if systems is None:
        raise term.error(
            f"{what} need the atomic types of the batch: call the loss with the systems, "
            f"loss(predictions, targets, extra_data, systems)"
        )
    return BatchAtoms.of(systems)


def _by_row(values: torch.Tensor, rows: torch.Tensor, size: int) -> torch.Tensor:
    """``result[rows[i]] = values[i]`` in a new ``(size,)`` tensor (zeros elsewhere)."""
    return values.new_zeros(size).index_copy_(0, rows.to(torch.long), values)


def _flat_atoms(atoms: BatchAtoms, samples) -> torch.Tensor:
    """Index in the batch's flat atom list of each row (columns ``system`` and ``atom``)."""
    system = samples.column("system")
    return atoms.first_atom.index_select(0, system) + samples.column("atom")


def _row_systems(
    term: CheckedTerm, target: TensorMap, index: int, block: TensorBlock
) -> torch.Tensor:
    """The ``system`` of each row of a value block or gradient block of ``target``."""
    samples = block.samples
    names = samples.names
    if "system" in names:
        return samples.column("system")
    if term.gradient is None or "sample" not in names:
        raise term.error(f"the target's rows (samples {names}) name no system")
    value_systems = target.block_by_id(index).samples.column("system")
    return value_systems.index_select(0, samples.column("sample"))


def _per_row(rows: torch.Tensor, values: torch.Tensor) -> torch.Tensor:
    """``(n_rows,)`` -> ``(n_rows, 1, ..., 1)`` broadcasting against ``values``."""
    return rows.view(-1, *([1] * (values.dim() - 1)))
