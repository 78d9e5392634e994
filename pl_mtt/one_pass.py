"""What the Scaler and the CompositionModel share: fitted from sums kept in one pass.

Both keep float64 sums while :func:`pl_mtt.fit_pass.fit_pass` runs over the data, hand
them to ONE all_reduce as a single vector (:meth:`OnePassState.flat_sums` /
:meth:`OnePassState.load_flat_sums`), and store the arguments they were built with in
their ``state_dict`` (``_extra_state``) so that a checkpoint restores into a model
built the same way, or gives a clear error.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import torch
from metatensor.torch import TensorMap

__all__ = ["OnePassState", "check_mask", "known_names"]


class OnePassState:
    """Mixin for ``nn.Module``s fitted from one pass of accumulated sums.

    Subclasses implement :meth:`construction` (their arguments as plain values and
    tensors) and :meth:`sum_tensors` (the accumulators, in a fixed order).
    """

    def construction(self) -> dict[str, Any]:
        raise NotImplementedError

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
