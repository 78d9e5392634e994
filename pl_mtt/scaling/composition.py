"""CompositionModel: the additive per-type baseline of invariant targets (DESIGN decision 5).

Every invariant block (no components, or spherical ``o3_lambda = 0``) of a per-structure
or per-atom target gets a baseline, unless the target is excluded:

- per-structure targets: ``y_A ~ x_A . w`` by least squares over structures ``A``,
  ``x_A`` the atom-type counts of ``A`` (for targets that are not divided by the number
  of atoms, the intensive ones in ``per_structure_targets``, the type fractions
  ``counts / n_atoms``); types without samples get ``w = 0`` (a unit ridge on their empty
  rows of the normal equations), the others the exact least-squares solution (SVD,
  singular values below ``rcond`` x the largest dropped, so collinear types get the
  minimum-norm correction to the shift);
- per-atom targets: ``w_Z`` is the mean of the entries of atoms of type ``Z``.

NaN entries and entries masked out by ``extra_data["<target>_mask"]`` do not count (per
property, so every property has its own normal equations). The baseline is removed
before the scale statistics and added back at inference (:mod:`pl_mtt.scaling`, which
fuses the shift tables of :meth:`CompositionModel.baselines` with the division by atoms
and the scales into one :func:`pl_mtt.tensormaps.block_ops.transform_map` call per TensorMap).

One pass for baseline and scales
--------------------------------
The scales need second moments of the *residuals* ``r = s_A (y_A - x_A . w)`` (``s_A =
1/n_atoms`` for targets divided by atoms, else 1), but ``w`` is only known at the end.
Residual moments are quadratic in ``w``, so they follow algebraically from sums kept in
the same pass. To stay accurate when ``|y/n_atoms| ~ 10^3`` while residuals are
``~ 10^-2`` (expanded moments around zero cancel catastrophically: a relative error of
``10^-16 (10^3 / 10^-2)^2 = 10^-6``), every sum is taken around a *shift* ``w0``, an
estimate of the baseline. With ``y~ = y - x . w0`` the pass keeps, per block and
property, in float64:

- ``G = sum x x^T`` and ``c = sum x y~`` (normal equations of ``delta = w - w0``);
- ``H = sum f f^T`` and ``d = sum f (s y~)`` with ``f = s x = counts / n_atoms``;
- the scaler's ``S = sum (s y~)^2`` (it accumulates the shifted, divided targets).

After the pass, ``G delta = c`` gives ``w = w0 + delta`` and the residual sum of squares
is ``S - 2 delta . d + delta^T H delta`` exactly, every term of the size of the (small)
shifted residuals. For per-atom targets the sums are ``sum y~`` and the count per type,
the baseline ``w0 + sum y~ / n`` and the residual sum of squares ``S - (sum y~)^2 / n``.
:meth:`CompositionModel.sum_corrections` returns these corrections for
:meth:`pl_mtt.Scaler.add_to_sums`; :func:`pl_mtt.scaling.fit.fit_pass` runs the whole pass.

The shift of a type is set from the first batch in which the type has entries (a small
ridge fit of the new types with the others fixed; per-atom: the batch's per-type mean).
Earlier sums have no contribution from that type, so they stay valid, and every type gets
a good shift even when it is missing from the first batch. Under DDP rank 0's shift is
broadcast at the end and every rank moves its sums to it (:meth:`recenter`: exact
algebra with the small difference of two good shifts) before the one all_reduce.
"""

from __future__ import annotations

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
from pl_mtt.tensormaps.block_ops import grouped_sums, rebuild_block, transform_map

__all__ = ["CompositionModel"]

SHIFT_RIDGE = 1e-6  # relative ridge of the shift fit of new types (a shift only needs to be close)


class _TargetWeights(torch.nn.Module):
    """Buffers ``weights_<b>`` ``[n_types, P_b]`` of the baselined blocks of one target."""

    def __init__(self, n_rows: int, blocks: dict[int, int]) -> None:
        super().__init__()
        for index, n_properties in blocks.items():
            self.register_buffer(
                f"weights_{index}", torch.zeros(n_rows, n_properties, dtype=torch.float64)
            )
        self.block_indices = list(blocks)

    def weights(self, index: int) -> torch.Tensor:
        return getattr(self, f"weights_{index}")


class CompositionModel(OnePassState, torch.nn.Module):
    """Per-type linear baseline of invariant targets (see the module docstring).

    Args:
        atomic_types: atomic types of the weights' rows (``None``: discovered, internal
            rows are atomic numbers 0..118).
        layouts: target name -> zero-sample TensorMap describing the target.
        exclude: targets without baseline (DOS targets, or when it is not wanted).
        per_structure_targets: per-structure targets NOT divided by the number of atoms
            (their baseline is linear in the type fractions).
        rcond: relative cut-off of small singular values in the least-squares solve.

    .. code-block:: python

        composition = CompositionModel([1, 8], {"energy": layout})
        for systems, targets, extra_data in batches:
            composition.accumulate(systems, targets, extra_data)
        composition.fit()
        baseline_free = composition(systems, targets, remove=True)
    """

    def __init__(
        self,
        atomic_types: Sequence[int] | None,
        layouts: Mapping[str, TensorMap],
        *,
        exclude: Sequence[str] = (),
        per_structure_targets: Sequence[str] = (),
        rcond: float = 1e-12,
    ) -> None:
        super().__init__()
        self._set_targets(atomic_types, layouts, per_structure_targets)
        self.exclude = known_names(exclude, self.targets, "exclude")
        self.rcond = float(rcond)
        self.blocks: dict[str, list[int]] = {
            name: [
                index
                for index, block in enumerate(info.blocks)
                if block.invariant and not info.atom_pair and name not in self.exclude
            ]
            for name, info in self.targets.items()
        }
        n_rows = self.type_table.n_rows
        self.target_weights = torch.nn.ModuleList(
            [
                _TargetWeights(n_rows, {b: info.blocks[b].n_properties for b in self.blocks[name]})
                for name, info in self.targets.items()
            ]
        )
        self.reset()

    # -- what it was built for (saved in the state_dict) -----------------------------
    def options(self) -> dict[str, Any]:
        return {"exclude": sorted(self.exclude), "rcond": self.rcond}

    # -- bookkeeping ---------------------------------------------------------------
    def _divided(self, name: str) -> bool:
        return self.targets[name].per_structure and name not in self.per_structure_targets

    def reset(self) -> None:
        """Forget the accumulated sums and the shift (fitted weights are kept)."""
        n = self.type_table.n_rows
        self._shift: dict[str, dict[int, torch.Tensor]] = {}
        self._sums: dict[str, dict[int, dict[str, torch.Tensor]]] = {}
        for name, info in self.targets.items():
            self._sums[name] = {}
            self._shift[name] = {}
            for b in self.blocks[name]:
                p = info.blocks[b].n_properties
                self._shift[name][b] = torch.zeros(n, p, dtype=torch.float64)
                if info.per_structure:
                    shapes = {"G": (p, n, n), "c": (p, n), "d": (p, n)}
                    if self._divided(name):
                        shapes["H"] = (p, n, n)
                else:
                    shapes = {"sum": (n, p), "count": (n, p)}
                self._sums[name][b] = {
                    key: torch.zeros(shape, dtype=torch.float64) for key, shape in shapes.items()
                }
        self._type_count = torch.zeros(n, dtype=torch.float64)

    def sum_tensors(self) -> list[torch.Tensor]:
        out = [self._type_count]
        for name in self.targets:
            for b in self.blocks[name]:
                sums = self._sums[name][b]
                out.extend(sums[key] for key in sorted(sums))
        return out

    def _move(self, device: torch.device) -> None:
        if self._type_count.device == device:
            return
        self._type_count = self._type_count.to(device)
        for blocks in self._sums.values():
            for sums in blocks.values():
                for key in sums:
                    sums[key] = sums[key].to(device)
        for blocks in self._shift.values():
            for b in blocks:
                blocks[b] = blocks[b].to(device)

    # -- the shift -------------------------------------------------------------------
    def _known(self, name: str, b: int) -> torch.Tensor:
        """``[n_types, P]`` whether a (type, property) already has entries in the sums."""
        sums = self._sums[name][b]
        if "G" in sums:
            return torch.diagonal(sums["G"], dim1=1, dim2=2).T > 0
        return sums["count"] > 0

    def _new_structure_shift(
        self, name: str, b: int, x: torch.Tensor, y: torch.Tensor, valid: torch.Tensor
    ) -> None:
        """Shift of the (type, property) pairs seen for the first time in this batch: a
        ridge fit of the batch residuals on the new types (toward their mean per unit
        feature), the shifts of the known types fixed."""
        shift, known = self._shift[name][b], self._known(name, b)
        v = valid.to(torch.float64)
        present = (v.T @ (x > 0).to(torch.float64)).T > 0  # [n_types, P]
        new = present & ~known
        if not bool(new.any()):
            return
        residual = torch.where(valid, y - x @ torch.where(known, shift, 0.0), 0.0)
        features = x.T[None, :, :] * new.T[:, :, None].to(x.dtype)  # [P, n_types, rows]
        per_unit = features.sum(1)  # [P, rows]: new atoms (or fractions) per row
        mean = (residual.T).sum(1) / (v.T * per_unit).sum(1).clamp(min=1e-300)  # [P]
        target = (residual.T - per_unit * mean[:, None]) * v.T  # [P, rows]
        gram = torch.einsum("pr,pur,pwr->puw", v.T, features, features)
        diagonal = torch.diagonal(gram, dim1=1, dim2=2)
        ridge = SHIFT_RIDGE * diagonal.sum(-1, keepdim=True) / new.T.sum(-1, keepdim=True)
        regular = torch.where(new.T, ridge.clamp(min=1e-300), torch.ones_like(diagonal))
        rhs = torch.einsum("pr,pur->pu", target, features)
        delta = torch.linalg.solve(gram + torch.diag_embed(regular), rhs)  # [P, n_types]
        shift.copy_(torch.where(new, mean[None, :] + delta.T, shift))

    def _new_atom_shift(
        self, name: str, b: int, rows: torch.Tensor, y: torch.Tensor, valid: torch.Tensor
    ) -> None:
        """Shift of the (type, property) pairs seen for the first time: the batch mean."""
        shift, known = self._shift[name][b], self._known(name, b)
        total = torch.zeros_like(shift).index_add_(0, rows, torch.where(valid, y, 0.0))
        count = torch.zeros_like(shift).index_add_(0, rows, valid.to(torch.float64))
        new = (count > 0) & ~known
        shift.copy_(torch.where(new, total / count.clamp(min=1), shift))

    def flat_shift(self) -> torch.Tensor:
        """The shift of the sums as one float64 vector (to broadcast from rank 0)."""
        shifts = [self._shift[name][b] for name in self.targets for b in self.blocks[name]]
        if not shifts:
            return torch.zeros(0, dtype=torch.float64)
        return torch.cat([t.reshape(-1) for t in shifts])

    @torch.no_grad()
    def recenter(self, flat_shift: torch.Tensor) -> dict[str, dict[int, torch.Tensor]]:
        """Move the sums to the shift ``flat_shift`` (from :meth:`flat_shift`, e.g. rank
        0's, broadcast). Exact algebra; returns the matching corrections of the scaler's
        sums of squares for :meth:`pl_mtt.Scaler.add_to_sums`."""
        shifts = [self._shift[name][b] for name in self.targets for b in self.blocks[name]]
        expected = sum(t.numel() for t in shifts)
        if flat_shift.numel() != expected:
            raise ValueError(f"flat shift: expected {expected} values, got {flat_shift.numel()}")
        flat_shift = flat_shift.to(device=self._type_count.device, dtype=torch.float64)
        corrections: dict[str, dict[int, torch.Tensor]] = {}
        start = 0
        for name, info in self.targets.items():
            for b in self.blocks[name]:
                old = self._shift[name][b]
                new = flat_shift[start : start + old.numel()].view_as(old)
                start += old.numel()
                corrections.setdefault(name, {})[b] = self._move_sums(name, b, info, new - old)
                old.copy_(new)
        return corrections

    def _move_sums(self, name: str, b: int, info: TargetInfo, delta: torch.Tensor) -> torch.Tensor:
        """Shift ``w0 -> w0 + delta``: update the sums, return the scaler's correction."""
        sums = self._sums[name][b]
        correction = _correction(sums, info.per_structure, delta)
        if info.per_structure:
            d = delta.T  # [P, n_types]
            sums["c"] -= torch.einsum("puw,pw->pu", sums["G"], d)
            sums["d"] -= torch.einsum("puw,pw->pu", sums.get("H", sums["G"]), d)
        else:
            sums["sum"] -= sums["count"] * delta
        return correction

    # -- accumulation --------------------------------------------------------------
    def _validate(
        self, targets: Mapping[str, TensorMap], extra_data: Mapping[str, TensorMap]
    ) -> None:
        for name, tensor in targets.items():
            self._target_info(name).check(tensor, "target")
            mask = extra_data.get(name + "_mask")
            if mask is not None:
                check_mask(mask, tensor, name)

    @torch.no_grad()
    def accumulate(
        self,
        systems: list[System],
        targets: Mapping[str, TensorMap],
        extra_data: Mapping[str, TensorMap] | None = None,
    ) -> None:
        """Add one batch (targets in physical, total units) to the sums.

        Types seen for the first time also get their shift from this batch. Targets the
        model does not know raise a ``ValueError``; inputs are never modified.
        """
        self.accumulate_and_shift(systems, targets, extra_data)

    @torch.no_grad()
    def accumulate_and_shift(
        self,
        systems: list[System],
        targets: Mapping[str, TensorMap],
        extra_data: Mapping[str, TensorMap] | None = None,
    ) -> dict[str, TensorMap]:
        """:meth:`accumulate`, returning the targets minus the shift baseline.

        The returned targets (same metadata, gradients shared with the inputs) are what
        the scaler accumulates in the one-pass fit (after division by atoms).
        """
        extra_data = extra_data or {}
        self._validate(targets, extra_data)
        atoms = BatchAtoms.of(systems)
        atoms.type_rows(self.type_table, check=True)
        self._move(atoms.device)
        self._type_count += atoms.type_totals(self.type_table)
        shifted: dict[str, TensorMap] = {}
        for name, tensor in targets.items():
            info = self.targets[name]
            if not self.blocks[name]:
                shifted[name] = tensor
                continue
            blocks = []
            for b, block in enumerate(tensor.blocks()):
                if b not in self._sums[name]:
                    blocks.append(rebuild_block(block, block.values))
                    continue
                mask = _mask_values(extra_data, name, b)
                y = block.values.detach()
                y = y.reshape(y.shape[0], y.shape[-1]).to(torch.float64)
                if info.per_structure:
                    values = self._add_structure_block(name, b, block.samples, y, mask, atoms)
                else:
                    values = self._add_atom_block(info, b, block.samples, y, mask, atoms)
                values = values.to(block.values.dtype).reshape(block.values.shape)
                blocks.append(rebuild_block(block, values))
            shifted[name] = TensorMap(tensor.keys, blocks)
        return shifted

    def _features(
        self, name: str, samples: Labels, atoms: BatchAtoms
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Per sample row: features ``x``, fractions ``f`` and the residual weight ``s``."""
        systems = BatchAtoms.systems_of(samples)
        counts = atoms.counts(self.type_table)[systems]
        n_atoms = atoms.n_atoms[systems].to(torch.float64).clamp(min=1)[:, None]
        fractions = counts / n_atoms
        if self._divided(name):
            return counts, fractions, 1.0 / n_atoms
        return fractions, fractions, torch.ones_like(n_atoms)

    def _add_structure_block(
        self,
        name: str,
        b: int,
        samples: Labels,
        y: torch.Tensor,
        mask: torch.Tensor | None,
        atoms: BatchAtoms,
    ) -> torch.Tensor:
        """Add a per-structure block to the sums; returns ``y - x . w0`` (``[rows, P]``)."""
        sums = self._sums[name][b]
        x, f, s = self._features(name, samples, atoms)
        present = (x > 0).any(0)  # [n_types]
        if not bool(self._known(name, b)[present].all()):
            self._new_structure_shift(name, b, x, y, _valid(y, mask))
        shifted = y - x @ self._shift[name][b]
        if mask is None and not bool(torch.isnan(shifted).any()):
            sums["G"] += (x.T @ x)[None]
            sums["c"] += shifted.T @ x
            sums["d"] += (shifted * s).T @ f
            if "H" in sums:
                sums["H"] += (f.T @ f)[None]
            return shifted
        valid = _valid(y, mask)
        v = valid.T.to(torch.float64)[:, None, :]  # [P, 1, rows]
        clean = torch.where(valid, shifted, torch.zeros_like(shifted))
        sums["G"] += (x.T[None] * v) @ x
        sums["c"] += clean.T @ x
        sums["d"] += (clean * s).T @ f
        if "H" in sums:
            sums["H"] += (f.T[None] * v) @ f
        return shifted

    def _atom_rows(
        self, info: TargetInfo, b: int, samples: Labels, atoms: BatchAtoms, n_rows: int
    ) -> torch.Tensor:
        block_type = info.blocks[b].atom_type
        if block_type is None:
            return atoms.types_of(samples, self.type_table)
        row = self.type_table.row_of(block_type)
        if row >= self.type_table.n_rows:
            raise ValueError(
                f"target '{info.name}', block {b}: key atom_type={block_type} is not among "
                f"atomic_types {self.type_table.types}"
            )
        return torch.full((n_rows,), row, dtype=torch.long, device=atoms.device)

    def _add_atom_block(
        self,
        info: TargetInfo,
        b: int,
        samples: Labels,
        y: torch.Tensor,
        mask: torch.Tensor | None,
        atoms: BatchAtoms,
    ) -> torch.Tensor:
        """Add a per-atom block to the sums; returns ``y - w0[type]`` (``[rows, P]``)."""
        sums = self._sums[info.name][b]
        n_rows = self.type_table.n_rows
        rows = self._atom_rows(info, b, samples, atoms, y.shape[0])
        present = torch.bincount(rows, minlength=n_rows)[:n_rows] > 0
        if not bool(self._known(info.name, b)[present].all()):
            self._new_atom_shift(info.name, b, rows, y, _valid(y, mask))
        shifted = y - self._shift[info.name][b][rows]
        total, count = grouped_sums(shifted, rows, n_rows, mask)
        sums["sum"] += total
        sums["count"] += count
        return shifted

    # -- fitting -------------------------------------------------------------------
    @torch.no_grad()
    def fit(self, fixed_weights: Mapping[str, Any] | None = None) -> None:
        """Solve for the weights from the accumulated sums (weights of unseen types: 0).

        Args:
            fixed_weights: target -> baseline weights used instead of fitted ones
                (metatrain's ``atomic_baseline``): one number (every type and property),
                a mapping atomic type -> number or list (one per property) fixing those
                types while the others are fitted with them held, or a list of such
                mappings, one per baselined block. The scales' residual sums follow the
                baseline in effect (:meth:`sum_corrections`), fixed or fitted.

        .. code-block:: yaml

            fixed_weights:
              energy: {1: -13.6, 8: -432.1}   # eV per atom of each type
              mtt::charge: 0.0                 # no baseline
        """
        tables = self.fixed_weight_tables(fixed_weights)
        for name, info in self.targets.items():
            state = self.target_weights[self._index[name]]
            for b in self.blocks[name]:
                sums, shift = self._sums[name][b], self._shift[name][b]
                fixed = tables.get(name, {}).get(b)
                if info.per_structure:
                    weights = self._solve(sums["G"], sums["c"], shift, fixed)
                else:
                    seen = sums["count"] > 0
                    mean = sums["sum"] / sums["count"].clamp(min=1)
                    weights = torch.where(seen, shift + mean, torch.zeros_like(shift))
                    if fixed is not None:
                        mask, values = (t.to(weights.device) for t in fixed)
                        weights = torch.where(mask[:, None], values, weights)
                state.weights(b).copy_(weights)
        self.type_seen.copy_(self._type_count > 0)
        self.fitted.fill_(True)

    def fixed_weight_tables(
        self, fixed_weights: Mapping[str, Any] | None
    ) -> dict[str, dict[int, tuple[torch.Tensor, torch.Tensor]]]:
        """``fixed_weights`` (see :meth:`fit`) as ``{target: {block: (mask [n_rows],
        values [n_rows, P])}}``; every mistake is a ValueError naming its path."""
        result: dict[str, dict[int, tuple[torch.Tensor, torch.Tensor]]] = {}
        for name, value in dict(fixed_weights or {}).items():
            path = f"fixed_weights.{name}"
            info = self._target_info(name)
            blocks = self.blocks[name]
            if not blocks:
                raise ValueError(
                    f"{path}: target '{name}' has no baseline (excluded or not invariant)"
                )
            if isinstance(value, (list, tuple)):
                if len(value) != len(blocks):
                    raise ValueError(
                        f"{path}: a list gives one mapping per baselined block ({len(blocks)}), "
                        f"got {len(value)}"
                    )
                per_block = list(value)
            else:
                per_block = [value] * len(blocks)
            result[name] = {}
            for b, entry in zip(blocks, per_block, strict=True):
                n_properties = info.blocks[b].n_properties
                result[name][b] = self._fixed_table(entry, n_properties, f"{path}")
        return result

    def _fixed_table(
        self, entry: Any, n_properties: int, path: str
    ) -> tuple[torch.Tensor, torch.Tensor]:
        n_rows = self.type_table.n_rows
        mask = torch.zeros(n_rows, dtype=torch.bool)
        values = torch.zeros(n_rows, n_properties, dtype=torch.float64)
        if isinstance(entry, Mapping):
            items = list(entry.items())
        else:
            items = [(t, entry) for t in self.type_table.types]
        for atomic_type, weight in items:
            try:
                row = self.type_table.row_of(int(atomic_type))
            except (TypeError, ValueError):
                raise ValueError(f"{path}: {atomic_type!r} is not an atomic type") from None
            if row >= n_rows:
                raise ValueError(
                    f"{path}: atomic type {atomic_type} is not among {self.type_table.types}"
                )
            numbers = weight if isinstance(weight, (list, tuple)) else [weight] * n_properties
            if len(numbers) != n_properties:
                raise ValueError(
                    f"{path}.{atomic_type}: expected {n_properties} values (one per property), "
                    f"got {len(numbers)}"
                )
            try:
                values[row] = torch.tensor([float(v) for v in numbers], dtype=torch.float64)
            except (TypeError, ValueError):
                raise ValueError(
                    f"{path}.{atomic_type}: expected numbers, got {weight!r}"
                ) from None
            if not bool(torch.isfinite(values[row]).all()):
                raise ValueError(f"{path}.{atomic_type}: expected finite numbers, got {weight!r}")
            mask[row] = True
        return mask, values

    def weight_tables(self, name: str) -> dict[int, torch.Tensor]:
        """The fitted weights ``[n_rows, P]`` of each baselined block of ``name``."""
        state = self.target_weights[self._index[self._target_info(name).name]]
        return {b: state.weights(b) for b in self.blocks[name]}

    def set_weights(
        self, weights: Mapping[str, Mapping[int, torch.Tensor]], types_seen: torch.Tensor
    ) -> None:
        """Load fitted weights without a pass (e.g. from a statistics file): ``weights
        [target][block]`` is ``[n_rows, P]`` for every baselined block, ``types_seen``
        ``[n_rows]`` the types the weights are for."""
        for name in self.targets:
            state = self.target_weights[self._index[name]]
            for b in self.blocks[name]:
                if b not in weights.get(name, {}):
                    raise ValueError(f"set_weights: no weights for target '{name}', block {b}")
                state.weights(b).copy_(weights[name][b])
        self.type_seen.copy_(types_seen)
        self.fitted.fill_(True)

    def _solve(
        self,
        gram: torch.Tensor,
        rhs: torch.Tensor,
        shift: torch.Tensor,
        fixed: tuple[torch.Tensor, torch.Tensor] | None = None,
    ) -> torch.Tensor:
        """Least squares in ``w = shift + delta``: ``[n_types, P]``, 0 for unseen types;
        ``fixed`` rows (mask, values) are held at their values and the others fitted
        with them (their contribution moved to the right-hand side)."""
        diagonal = torch.diagonal(gram, dim1=1, dim2=2)  # [P, n]
        seen = diagonal > 0
        if fixed is not None:
            mask, values = (t.to(gram.device) for t in fixed)
            known = torch.where(mask[:, None], values - shift, torch.zeros_like(shift)).T
            rhs = rhs - torch.einsum("puw,pw->pu", gram, known)
            free = (~mask).to(gram.dtype)
            gram = gram * free[None, :, None] * free[None, None, :]
            seen = seen & ~mask[None, :]
        system = gram + torch.diag_embed((~seen).to(gram.dtype))  # unit ridge: unseen types
        right = torch.where(seen, rhs, torch.zeros_like(rhs))
        delta = torch.linalg.lstsq(
            system.cpu(), right.cpu()[:, :, None], rcond=self.rcond, driver="gelsd"
        ).solution[:, :, 0]
        delta = delta.to(shift.device)
        weights = torch.where(seen.T, shift + delta.T, torch.zeros_like(shift))
        if fixed is not None:
            weights = torch.where(mask[:, None], values, weights)
        return weights

    @torch.no_grad()
    def sum_corrections(self) -> dict[str, dict[int, torch.Tensor]]:
        """Corrections that turn the scaler's sums of squares of the shifted targets into
        sums of squares of the residuals of the fitted baseline (call after :meth:`fit`).

        Returns ``{target: {block: [rows, P]}}`` for :meth:`pl_mtt.Scaler.add_to_sums`.
        """
        corrections: dict[str, dict[int, torch.Tensor]] = {}
        for name, info in self.targets.items():
            state = self.target_weights[self._index[name]]
            for b in self.blocks[name]:
                shift = self._shift[name][b]
                delta = state.weights(b).to(device=shift.device, dtype=torch.float64) - shift
                corrections.setdefault(name, {})[b] = _correction(
                    self._sums[name][b], info.per_structure, delta
                )
        return corrections

    # -- results -------------------------------------------------------------------
    @property
    def weights(self) -> dict[str, TensorMap]:
        """Per baselined target: its invariant blocks' keys, samples ``atomic_type`` (one
        row per atomic type, in order), the target's properties."""
        result = {}
        for name, info in self.targets.items():
            if not self.blocks[name]:
                continue
            state = self.target_weights[self._index[name]]
            device = state.weights(self.blocks[name][0]).device
            samples, rows = self._type_samples(device)
            blocks = [
                TensorBlock(
                    values=state.weights(b)[rows].clone(),
                    samples=samples,
                    components=[],
                    properties=info.blocks[b].properties.to(device),
                )
                for b in self.blocks[name]
            ]
            keys = Labels(info.keys.names, info.keys.values[torch.tensor(self.blocks[name])]).to(
                device
            )
            result[name] = TensorMap(keys, blocks)
        return result

    # -- applying ------------------------------------------------------------------
    def baselines(
        self, systems: list[System], name: str, tensor: TensorMap
    ) -> list[torch.Tensor | None] | None:
        """The baseline of output ``name`` as shift tables for
        :func:`pl_mtt.tensormaps.block_ops.transform_map`: per block ``None`` (no
        baseline) or one row per system (``x_A . w``, total units) or per atom of the
        batch (``w`` of its type, 0 for unknown types); ``None`` when the output has no
        baseline. Checks the layout."""
        target = name if name in self.targets else self._ensembles.get(name)
        if target is None or not self.blocks[target]:
            return None
        info = self.targets[target]
        members = info.check(tensor, "output", ensemble=target != name)
        atoms = BatchAtoms.of(systems)
        state = self.target_weights[self._index[target]]
        result: list[torch.Tensor | None] = []
        for b, block_info in enumerate(info.blocks):
            if b not in self._sums[target]:
                result.append(None)
                continue
            weights = state.weights(b)
            if info.per_structure:
                counts = atoms.counts(self.type_table)
                if not self._divided(target):  # type fractions
                    counts = atoms.cached(
                        ("type fractions", self.type_table.key),
                        lambda counts=counts: (
                            counts / atoms.n_atoms_as(torch.float64).clamp(min=1)[:, None]
                        ),
                    )
                baseline = counts.to(weights.device) @ weights
            else:
                padded = pad(weights, (0, 0, 0, 1))  # unknown types: 0
                if block_info.atom_type is None:
                    baseline = padded.index_select(0, atoms.type_rows(self.type_table))
                else:
                    row = self.type_table.row_of(block_info.atom_type)
                    baseline = padded[row : row + 1]
            if members > 1:
                baseline = baseline.repeat(1, members)
            result.append(baseline)
        return result

    def structure_baseline(
        self, atoms: BatchAtoms, name: str, dtype: torch.dtype
    ) -> torch.Tensor | None:
        """``[n_systems, P]`` baseline of block 0 of the per-structure target ``name`` per
        system, in system order (total units; type fractions for targets not divided by
        atoms), or ``None`` when that block has no baseline.

        One ``embedding_bag`` over the atoms of the batch: the weights of each atom's
        type summed (averaged) per system, from a table rebuilt only when the weights
        change. Equal to the values :meth:`baselines` gives per row.
        """
        info = self.targets.get(name)
        if info is None or not info.per_structure or 0 not in self._sums[name]:
            return None
        weights = self.target_weights[self._index[name]].weights(0)
        device = atoms.device
        table, shift, last = self.derived(
            ("structure baseline", name, dtype, device),
            [weights],
            lambda: self._bag_table(weights, dtype, device),
        )
        types = atoms.types
        index = (types if shift == 0 else types - shift).clamp(0, last)
        return torch.nn.functional.embedding_bag(
            index, table, atoms.bag_offsets(), mode="sum" if self._divided(name) else "mean"
        )

    def _bag_table(
        self, weights: torch.Tensor, dtype: torch.dtype, device: torch.device
    ) -> tuple[torch.Tensor, int, int]:
        """(table, shift, last): row ``clamp(type - shift, 0, last)`` of ``table`` holds
        the weights of ``type``, zeros for types the model does not know."""
        padded = pad(weights, (0, 0, 0, 1))  # row n_rows: unknown types
        lookup = self.type_table.lookup.to(padded.device)  # entry i: row of type offset + i
        rows = padded.index_select(0, lookup)
        shift = self.type_table.offset
        if shift > 0:  # index the table by the atomic type itself: one clamp per step
            rows = pad(rows, (0, 0, shift, 0))
            shift = 0
        return rows.to(device=device, dtype=dtype).contiguous(), shift, rows.shape[0] - 1

    def forward(
        self,
        systems: list[System],
        outputs: Mapping[str, TensorMap],
        remove: bool = False,
    ) -> dict[str, TensorMap]:
        """Add (``remove=False``) or subtract (``remove=True``) the baseline.

        Per-structure blocks get ``x_A . w`` (total units: counts, or fractions for
        targets not divided by atoms), per-atom blocks ``w`` of each atom's type (0 for
        types the model does not know); ensemble outputs get it on every member;
        gradient blocks are unchanged (the baseline does not depend on positions or
        strain); outputs of unknown names pass through. Returns a new dict.
        """
        result: dict[str, TensorMap] = {}
        for name, tensor in outputs.items():
            shifts = self.baselines(systems, name, tensor)
            if shifts is None:
                result[name] = tensor
                continue
            first_atom = BatchAtoms.of(systems).first_atom
            new = transform_map(tensor, remove, shifts, None, None, first_atom)
            result[name] = tensor if new is None else new
        return result


def _correction(
    sums: dict[str, torch.Tensor], per_structure: bool, delta: torch.Tensor
) -> torch.Tensor:
    """Change of the scaler's sum of squares when the baseline moves by ``delta``.

    Per-structure (per property): ``-2 delta . d + delta^T H delta``, ``[1, P]``;
    per-atom (per type and property): ``delta (n delta - 2 sum)``, ``[n_types, P]``.
    """
    if per_structure:
        d = delta.T  # [P, n_types]
        h = sums.get("H", sums["G"])
        quadratic = torch.einsum("pu,puw,pw->p", d, h, d)
        return (quadratic - 2 * (d * sums["d"]).sum(-1))[None, :]
    return delta * (sums["count"] * delta - 2 * sums["sum"])


def _valid(y: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
    """``[rows, P]`` whether each entry counts (not NaN, not masked out)."""
    valid = ~torch.isnan(y)
    if mask is not None:
        valid &= mask.detach().reshape(y.shape) != 0
    return valid


def _mask_values(extra_data: Mapping[str, TensorMap], name: str, b: int) -> torch.Tensor | None:
    mask = extra_data.get(name + "_mask")
    return None if mask is None else mask.block_by_id(b).values
