"""Metadata checks of a loss term's inputs against its target, raising the term's errors.

Used by the term classes and by their sample weights; ``Labels`` are compared here, so
callers run these once per new layout (``LossTerm.check_once``), never per step.
"""

from __future__ import annotations

from collections.abc import Callable, Hashable
from typing import Protocol

from metatensor.torch import TensorBlock, TensorMap

__all__ = ["CheckedTerm", "block_name", "check_same_layout"]


class CheckedTerm(Protocol):
    """What the checks need of a loss term (:class:`pl_mtt.losses.base.LossTerm` has it;
    declared here so that the helpers of the term classes do not import them)."""

    gradient: str | None

    @property
    def description(self) -> str: ...

    def term_blocks(self, tensor_map: TensorMap, what: str) -> list[TensorBlock]: ...

    def error(self, message: str) -> ValueError: ...

    def check_once(self, signature: Hashable, full_check: Callable[[], None]) -> None: ...


def block_name(tensor_map: TensorMap, index: int) -> str:
    """``block 1 (key o3_lambda=2, o3_sigma=1)`` for error messages (reads ``Labels``)."""
    entry = tensor_map.keys.entry(index)
    key = ", ".join(f"{n}={v}" for n, v in zip(entry.names, entry.values.tolist(), strict=True))
    return f"block {index} (key {key})"


def _labels_text(labels) -> str:
    return f"{list(labels.names)} ({len(labels)} entries)"


def check_same_layout(
    term: CheckedTerm,
    reference: TensorMap,
    reference_blocks: list[TensorBlock],
    other: TensorMap,
    other_blocks: list[TensorBlock],
    names: tuple[str, str],
    *,
    properties: bool = True,
) -> None:
    """Full metadata check: same keys, and per block the same sample count and
    components (and properties unless ``properties=False``). Raises ``term.error``."""
    first, second = names
    if len(reference_blocks) != len(other_blocks) or reference.keys != other.keys:
        raise term.error(
            f"{second} keys {_labels_text(other.keys)} differ from the {first} keys "
            f"{_labels_text(reference.keys)}"
        )
    for index, (ref, oth) in enumerate(zip(reference_blocks, other_blocks, strict=True)):
        where = block_name(reference, index)
        if len(ref.samples) != len(oth.samples):
            raise term.error(
                f"{where}: the {second} has {len(oth.samples)} samples, the {first} "
                f"{len(ref.samples)}"
            )
        if len(ref.components) != len(oth.components) or any(
            a != b for a, b in zip(ref.components, oth.components, strict=True)
        ):
            raise term.error(
                f"{where}: {second} components {[_labels_text(c) for c in oth.components]} "
                f"differ from the {first} components "
                f"{[_labels_text(c) for c in ref.components]}"
            )
        if properties and ref.properties != oth.properties:
            raise term.error(
                f"{where}: {second} properties {_labels_text(oth.properties)} differ "
                f"from the {first} properties {_labels_text(ref.properties)}"
            )
        if properties and ref.values.shape != oth.values.shape:
            raise term.error(
                f"{where}: {second} values have shape {tuple(oth.values.shape)}, the "
                f"{first} values {tuple(ref.values.shape)}"
            )
