"""What the Scaler and the CompositionModel share: fitted from sums kept in one pass.

Both keep float64 sums while :func:`pl_mtt.scaling.fit.fit_pass` runs over the data, hand
them to ONE all_reduce as a single vector (:meth:`OnePassState.flat_sums` /
:meth:`OnePassState.load_flat_sums`), and store the arguments they were built with in
their ``state_dict`` (``_extra_state``) so that a checkpoint restores into a model
built the same way, or gives a clear error.
"""

from __future__ import annotations

from collections.abc import Callable, Hashable, Mapping, Sequence
from typing import Any

import torch
from metatensor.torch import Labels, TensorMap

from pl_mtt.scaling.target_info import (
    TargetInfo,
    layout_buffers,
    layouts_from_buffers,
    zero_sample_layout,
)
from pl_mtt.tensormaps.batch_atoms import TypeTable

__all__ = ["OnePassState", "check_mask", "known_names"]


class OnePassState:
    """Mixin for ``nn.Module``s fitted from one pass of accumulated sums.

    Subclasses call :meth:`_set_targets` when built and implement :meth:`options`
    (their other keyword arguments as plain values) and :meth:`sum_tensors` (the
    accumulators, in a fixed order).
    """

    def _set_targets(
        self,
        atomic_types: Sequence[int] | None,
        layouts: Mapping[str, TensorMap],
        per_structure_targets: Sequence[str],
    ) -> None:
        """What both models keep of their targets: the type table, each target's
        :class:`TargetInfo` and zero-sample layout, the per-structure targets not divided
        by atoms, and the ``fitted``/``type_seen`` buffers (``self`` is an nn.Module)."""
        if not isinstance(layouts, Mapping):
            raise ValueError(
                f"layouts: expected a mapping of target name -> TensorMap, got "
                f"{type(layouts).__name__}"
            )
        self.type_table = TypeTable(atomic_types)
        self.targets: dict[str, TargetInfo] = {
            name: TargetInfo(name, layout) for name, layout in layouts.items()
        }
        self.layouts = {name: zero_sample_layout(t) for name, t in layouts.items()}
        self.per_structure_targets = known_names(
            per_structure_targets, self.targets, "per_structure_targets"
        )
        self._ensembles = {info.ensemble_name: name for name, info in self.targets.items()}
        self._index = {name: index for index, name in enumerate(self.targets)}
        self.register_buffer("fitted", torch.tensor(False))
        self.register_buffer("type_seen", torch.zeros(self.type_table.n_rows, dtype=torch.bool))

    def derived(
        self, key: Hashable, sources: Sequence[torch.Tensor], compute: Callable[[], Any]
    ) -> Any:
        """``compute()``, cached until one of the ``sources`` (fitted buffers) changes:
        is replaced (a device move, a new module state) or modified in place (a fit,
        ``load_state_dict``). For small tensors derived from the fit that every training
        step would otherwise recompute; checking costs no tensor operation."""
        cache = self.__dict__.setdefault("_derived", {})
        stamp = tuple(source._version for source in sources)
        entry = cache.get(key)
        if (
            entry is not None
            and entry[1] == stamp
            and all(a is b for a, b in zip(entry[0], sources, strict=True))
        ):
            return entry[2]
        value = compute()
        cache[key] = (tuple(sources), stamp, value)
        return value

    def __getstate__(self) -> dict[str, Any]:
        state = super().__getstate__()
        state = dict(state)
        state.pop("_derived", None)  # a cache: rebuilt on first use, never saved
        return state

    def _target_info(self, name: str) -> TargetInfo:
        """The info of target ``name``; an unknown name is a ValueError."""
        info = self.targets.get(name)
        if info is None:
            raise ValueError(
                f"{type(self).__name__}: unknown target '{name}'; it was built for "
                f"{sorted(self.targets)}"
            )
        return info

    @property
    def atomic_types(self) -> list[int]:
        """The types of the per-type rows: as given, or those seen while fitting."""
        if not self.type_table.discover:
            return list(self.type_table.types)
        return [
            t
            for t, seen in zip(self.type_table.types, self.type_seen.tolist(), strict=True)
            if seen
        ]

    def _type_samples(self, device: torch.device) -> tuple[Labels, torch.Tensor]:
        """Samples ``atomic_type`` of :attr:`atomic_types` and their rows in the tables."""
        types = self.atomic_types
        rows = torch.tensor([self.type_table.row_of(t) for t in types], dtype=torch.long)
        samples = Labels(["atomic_type"], torch.tensor(types, dtype=torch.int32).reshape(-1, 1))
        return samples.to(device), rows.to(device)

    def options(self) -> dict[str, Any]:
        """The keyword arguments (beyond ``per_structure_targets``) it was built with."""
        raise NotImplementedError

    def construction(self) -> dict[str, Any]:
        """The arguments it was built with, as plain values and tensors."""
        return {
            "atomic_types": None if self.type_table.discover else list(self.type_table.types),
            "layouts": layout_buffers(self.layouts),
            "per_structure_targets": sorted(self.per_structure_targets),
            **self.options(),
        }

    @classmethod
    def from_construction(cls, construction: Mapping[str, Any]) -> Any:
        """An unfitted model built like the one that saved ``construction``."""
        options = dict(construction)
        atomic_types, layouts = options.pop("atomic_types"), options.pop("layouts")
        return cls(atomic_types, layouts_from_buffers(layouts), **options)

    def sum_tensors(self) -> list[torch.Tensor]:
        raise NotImplementedError

    def flat_sums(self) -> torch.Tensor:
        """All accumulated sums as one float64 vector (for one all_reduce)."""
        return torch.cat([s.reshape(-1) for s in self.sum_tensors()])

    def load_flat_sums(self, flat: torch.Tensor) -> None:
        """Replace the accumulated sums by ``flat`` (e.g. after an all_reduce)."""
        sums = self.sum_tensors()
        expected = sum(s.numel() for s in sums)
        if flat.numel() != expected:
            raise ValueError(
                f"{type(self).__name__}: expected {expected} flat sums, got {flat.numel()}"
            )
        start = 0
        for s in sums:
            s.copy_(flat[start : start + s.numel()].view_as(s).to(device=s.device, dtype=s.dtype))
            start += s.numel()

    def get_extra_state(self) -> dict[str, Any]:
        return {"version": 1, "construction": self.construction()}

    def set_extra_state(self, state: Any) -> None:
        """Loading a state_dict saved by a model built differently is a clear error."""
        what = type(self).__name__
        if not isinstance(state, Mapping) or "construction" not in state:
            raise ValueError(f"{what}.load_state_dict: unrecognised extra state {type(state)}")
        other = state["construction"]
        for key, value in self.construction().items():
            theirs = other.get(key)
            if key == "layouts":
                same = set(value) == set(theirs or {}) and all(
                    torch.equal(value[name], theirs[name].to(value[name].device)) for name in value
                )
                if not same:
                    raise ValueError(
                        f"{what}.load_state_dict: the saved {what} was built for targets "
                        f"{sorted(theirs or {})} (or other layouts), this one for {sorted(value)}"
                    )
            elif value != theirs:
                raise ValueError(
                    f"{what}.load_state_dict: the saved {what} has {key}={theirs!r}, this one "
                    f"{value!r}; build it with {what}.from_construction(...)"
                )


def check_mask(mask: TensorMap, tensor: TensorMap, name: str) -> None:
    """``extra_data["<name>_mask"]`` must have the target's blocks and shapes."""
    if len(mask) != len(tensor):
        raise ValueError(
            f"mask '{name}_mask': {len(mask)} block(s), target '{name}' has {len(tensor)}"
        )
    for index, (m, t) in enumerate(zip(mask.blocks(), tensor.blocks(), strict=True)):
        if m.values.shape != t.values.shape:
            raise ValueError(
                f"mask '{name}_mask', block {index}: shape {list(m.values.shape)}, "
                f"target has {list(t.values.shape)}"
            )


def known_names(names: Sequence[str], known: Mapping[str, object], what: str) -> frozenset[str]:
    """``names`` as a set, each of which must be a key of ``known`` (else ValueError)."""
    if isinstance(names, str):
        names = [names]
    unknown = [n for n in names if n not in known]
    if unknown:
        raise ValueError(f"{what}: unknown target(s) {unknown}; targets: {sorted(known)}")
    return frozenset(names)
