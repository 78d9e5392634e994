"""The base of every loss term and ``create_loss``.

A term is an ``nn.Module`` called as ``term(predictions, targets, extra_data=None)`` on
``Dict[str, TensorMap]``. It returns the UNWEIGHTED loss of one target (or of one of
its gradients); the weight is stored on the term and applied by ``LossModule``.

Subclasses implement :meth:`LossTerm.sum_and_count`, which returns the sum of the
per-element losses and the number of elements that counted (both tensors, so that no
host-device synchronisation is needed); :meth:`LossTerm.forward` applies the reduction.
``LossModule`` uses the same pair for exact epoch means and exact global means under DDP.
"""

from __future__ import annotations

import warnings
from collections.abc import Callable, Hashable, Sequence
from functools import cache

import torch
from metatensor.torch import TensorBlock, TensorMap

from pl_mtt.losses.functional.pointwise import reduce_total
from pl_mtt.losses.layout_checks import block_name, check_same_layout
from pl_mtt.losses.weights import EntryWeights
from pl_mtt.registry import PARAM_KINDS, REQUIRED, WEIGHTING_KEYS, get_loss_type, loss_type_names
from pl_mtt.tensormaps.builders import TensorMaps

__all__ = [
    "COMPILE_MODES",
    "LossTerm",
    "ValueCache",
    "block_name",
    "check_same_layout",
    "create_loss",
    "flatten_values",
    "flatten_weights",
    "read_values",
    "reduce_loss",
    "values_signature",
]


def reduce_loss(total: torch.Tensor, count: torch.Tensor, reduction: str) -> torch.Tensor:
    """``sum`` -> ``total``; ``mean`` -> ``total / count``, an exact 0 when ``count == 0``.

    The zero keeps ``total``'s autograd path (``total`` is then a sum of zeros).
    """
    return reduce_total(total, count, reduction)


def values_signature(*groups: Sequence[torch.Tensor] | None) -> Hashable:
    """Cheap layout key of lists of block values: shapes without the sample dimension,
    dtypes and devices. Read from tensors already in hand (about a microsecond, no
    ``Labels`` access), it selects when :meth:`LossTerm.check_once` runs a full check.
    """
    return tuple(
        None if group is None else tuple((tuple(v.shape[1:]), v.dtype, v.device) for v in group)
        for group in groups
    )


def flatten_values(values: Sequence[torch.Tensor]) -> torch.Tensor:
    """One tensor holding every entry of ``values``: the tensor itself for one block,
    else the concatenation of the flattened blocks."""
    if len(values) == 1:
        return values[0]
    return torch.cat([v.reshape(-1) for v in values])


def _read_values(
    tensor_maps: list[TensorMap],
) -> list[tuple[list[torch.Tensor], dict[str, list[torch.Tensor]]]]:
    result: list[tuple[list[torch.Tensor], dict[str, list[torch.Tensor]]]] = []
    for tensor_map in tensor_maps:
        values: list[torch.Tensor] = []
        gradients: dict[str, list[torch.Tensor]] = {}
        for block in tensor_map.blocks():
            values.append(block.values)
            for name, gradient in block.gradients():
                if name not in gradients:
                    gradients[name] = []
                gradients[name].append(gradient.values)
        result.append((values, gradients))
    return result


def flatten_weights(
    weights: Sequence[torch.Tensor], values: Sequence[torch.Tensor]
) -> torch.Tensor:
    """The weights of :func:`flatten_values` ``(values)``: for one block the block's
    weights as they are (they broadcast against its values), else each block's weights
    expanded to its values, flattened and concatenated."""
    if len(values) == 1:
        return weights[0]
    return torch.cat([w.expand_as(v).reshape(-1) for w, v in zip(weights, values, strict=True)])


@cache
def _scripted_read_values() -> Callable:
    """:func:`_read_values` compiled by TorchScript, or the Python function if that fails.

    Every call on a metatensor object from Python costs several microseconds; inside
    TorchScript the same calls are direct, so reading all values of a few TensorMaps
    costs about as much as two of them.
    """
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", DeprecationWarning)  # torch.jit.script
            return torch.jit.script(_read_values)
    except Exception:
        return _read_values


def read_values(
    tensor_map: TensorMap,
) -> tuple[list[torch.Tensor], dict[str, list[torch.Tensor]]]:
    """The values of every block of ``tensor_map`` in key order, and gradient name ->
    the values of that gradient in every block that has it (one TorchScript call)."""
    return _scripted_read_values()([tensor_map])[0]


class ValueCache:
    """Block values of TensorMaps, read once per map during one LossModule call and
    shared by the terms that read the same map (the target and its gradients); also
    the call's ``systems`` (for weighted terms)."""

    def __init__(self, systems: list | None = None) -> None:
        self._maps: dict[int, tuple] = {}
        self.systems = systems

    def prefetch(self, tensor_maps: Sequence[TensorMap]) -> None:
        """Read the maps not yet read, all in one call."""
        missing = {id(m): m for m in tensor_maps if id(m) not in self._maps}
        if missing:
            maps = list(missing.values())
            for tensor_map, (values, gradients) in zip(
                maps, _scripted_read_values()(maps), strict=True
            ):
                self._maps[id(tensor_map)] = (tensor_map, values, gradients)

    def get(self, tensor_map: TensorMap) -> tuple[list[torch.Tensor], dict]:
        """:func:`read_values` of ``tensor_map``, read on the first request."""
        entry = self._maps.get(id(tensor_map))
        if entry is None or entry[0] is not tensor_map:
            entry = self._maps[id(tensor_map)] = (tensor_map, *read_values(tensor_map))
        return entry[1], entry[2]


COMPILE_MODES = ("default", "reduce-overhead", "max-autotune", "max-autotune-no-cudagraphs")
"""The ``torch.compile`` modes :meth:`LossTerm.compile_core` accepts."""


@cache
def _compiled(core: Callable[..., torch.Tensor], mode: str) -> Callable[..., torch.Tensor]:
    """``torch.compile(core, fullgraph=True, mode=mode)``, made once per (core, mode)."""
    return torch.compile(core, fullgraph=True, mode=mode)


class LossTerm(torch.nn.Module):
    """One loss term on one target (``gradient=None``) or one of its gradients.

    Subclasses that read another output than the target's own (ensembles) override
    :attr:`prediction_key`. Subclasses whose computation is one functional core on
    plain tensors name it in :attr:`core`; :meth:`compile_core` can then compile it.
    """

    core: Callable[..., torch.Tensor] | None = None
    """The functional core (plain tensors in, tensor out), or None."""

    def __init__(
        self,
        *,
        name: str,
        gradient: str | None = None,
        weight: float = 1.0,
        reduction: str = "mean",
        sample_weights: str | None = None,
        type_weights: dict[int, float] | None = None,
    ) -> None:
        super().__init__()
        self.target = name
        self.gradient = gradient
        self.weight = float(weight)
        self.reduction = reduction
        self.compile_mode: str | None = None
        self._checked_layouts: set[Hashable] = set()
        self.weighting: EntryWeights | None = None
        """How the entries are weighted (``sample_weights``/``type_weights``), or None."""
        if sample_weights is not None or type_weights:
            self.weighting = EntryWeights(sample_weights, type_weights)

    # -- compilation ------------------------------------------------------------------
    def compile_core(self, mode: str | None = "default") -> bool:
        """Compute this term's :attr:`core` through ``torch.compile(fullgraph=True,
        mode=mode)`` (``None``: eager again). Returns whether the term has a core.

        The TensorMap adapter stays eager; only the core is compiled, on its first call
        (and again for each new input shape). Worth it on GPUs, where the core's many
        small kernels are launch-bound.
        """
        if mode is not None and mode not in COMPILE_MODES:
            raise ValueError(
                f"compile mode must be one of {list(COMPILE_MODES)} or None, got {mode!r}"
            )
        if self.core is None:
            return False
        self.compile_mode = mode
        return True

    def core_function(self) -> Callable[..., torch.Tensor]:
        """:attr:`core`, compiled if :meth:`compile_core` asked for it."""
        if self.compile_mode is None:
            return type(self).core
        return _compiled(type(self).core, self.compile_mode)

    # -- what the term reads -------------------------------------------------------
    @property
    def prediction_key(self) -> str:
        """Key of the predictions dict this term reads (the target's name by default)."""
        return self.target

    @property
    def description(self) -> str:
        """Human-readable ``target`` or ``target (gradient 'g')`` for error messages."""
        if self.gradient is None:
            return f"target '{self.target}'"
        return f"gradient '{self.gradient}' of target '{self.target}'"

    def lookup(
        self,
        tensors: TensorMaps | None,
        key: str,
        what: str,
    ) -> TensorMap:
        """``tensors[key]`` or a ``ValueError`` naming the missing key and where."""
        if tensors is None or key not in tensors:
            available = sorted(tensors) if tensors else []
            raise ValueError(
                f"loss on {self.description}: '{key}' is missing from {what} "
                f"(available: {available})"
            )
        return tensors[key]

    def term_blocks(self, tensor_map: TensorMap, what: str) -> list[TensorBlock]:
        """The blocks of ``tensor_map``, or their :attr:`gradient` blocks, in key order.

        Iterates ``blocks()`` (no ``Labels`` lookup). A missing gradient is a
        ``ValueError`` naming it and the gradients that are there.
        """
        blocks = tensor_map.blocks()
        if self.gradient is None:
            return blocks
        try:
            return [block.gradient(self.gradient) for block in blocks]
        except RuntimeError:
            for index, block in enumerate(blocks):
                if self.gradient not in block.gradients_list():
                    raise self.error(
                        f"{what} has no gradient '{self.gradient}' in "
                        f"{block_name(tensor_map, index)} (it has: {block.gradients_list()})"
                    ) from None
            raise

    def term_values(
        self, tensor_map: TensorMap, what: str, cache: ValueCache | None = None
    ) -> list[torch.Tensor]:
        """The values of :meth:`term_blocks`, read without creating block objects
        (through ``cache`` when given). Errors as :meth:`term_blocks`."""
        values, gradients = read_values(tensor_map) if cache is None else cache.get(tensor_map)
        if self.gradient is None:
            return values
        found = gradients.get(self.gradient)
        if found is None or len(found) != len(values):
            return [block.values for block in self.term_blocks(tensor_map, what)]  # raises
        return found

    def error(self, message: str) -> ValueError:
        """A ``ValueError`` prefixed with what this term computes."""
        return ValueError(f"loss on {self.description}: {message}")

    # -- layout checks -------------------------------------------------------------
    def check_once(self, signature: Hashable, full_check: Callable[[], None]) -> None:
        """Run ``full_check`` (which may compare ``Labels``) once per layout signature."""
        if signature not in self._checked_layouts:
            full_check()
            self._checked_layouts.add(signature)

    def check_dtype_device(
        self, first: torch.Tensor, first_name: str, second: torch.Tensor, second_name: str
    ) -> None:
        """``first`` and ``second`` (named in the error) must share dtype and device."""
        if first.dtype != second.dtype or first.device != second.device:
            raise self.error(
                f"{first_name} ({first.dtype}, {first.device}) and {second_name} "
                f"({second.dtype}, {second.device}) differ in dtype or device"
            )

    # -- weights -----------------------------------------------------------------------
    def entry_weights(
        self,
        target: TensorMap,
        values: list[torch.Tensor],
        extra_data: TensorMaps | None,
        systems: list | None,
    ) -> list[torch.Tensor] | None:
        """Per block of this term in ``target`` (``values``: the blocks' values), the
        weights of its entries (broadcasting against the values), or None when the term
        is not weighted (see :mod:`pl_mtt.losses.weights`)."""
        if self.weighting is None:
            return None
        return self.weighting.block_weights(self, target, values, extra_data, systems)

    # -- computation -----------------------------------------------------------------
    def sum_and_count(
        self,
        predictions: TensorMaps,
        targets: TensorMaps,
        extra_data: TensorMaps | None = None,
        systems: list | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Sum of per-element losses and the number of elements that counted; for a
        weighted term (:attr:`weighting`) the weighted sum and the sum of the weights
        of the elements that counted. ``systems`` are needed by type weights and
        per-atom sample weights only."""
        raise NotImplementedError

    def call_sum_and_count(
        self,
        predictions: TensorMaps,
        targets: TensorMaps,
        extra_data: TensorMaps | None,
        systems: list | None,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """:meth:`sum_and_count`, given ``systems`` only when the term is weighted (a loss
        type that takes no weights may define :meth:`sum_and_count` with three
        parameters, as before weights existed)."""
        if self.weighting is None:
            return self.sum_and_count(predictions, targets, extra_data)
        return self.sum_and_count(predictions, targets, extra_data, systems)

    @property
    def reads_scaled_inputs(self) -> bool:
        """Whether :meth:`scaled_sum_and_count` can compute this term from raw model
        outputs and targets in the units of the data (see
        :class:`pl_mtt.scaling.prepared.PreparedBatch`); ``False`` by default."""
        return False

    @classmethod
    def scaled_sum_and_count(
        cls, terms: Sequence[LossTerm], inputs
    ) -> tuple[torch.Tensor, torch.Tensor, list[torch.Tensor], list[torch.Tensor]]:
        """The sums and counts of ``terms`` (the value and gradient terms of one target,
        in the order of ``inputs.parts``) from a
        :class:`pl_mtt.scaling.prepared.FusedInputs`, with the loss-unit residuals and
        the masks of the entries that count. Only for terms that
        :attr:`reads_scaled_inputs`."""
        raise NotImplementedError

    @property
    def fusion_key(self) -> Hashable | None:
        """Terms of one class with the same non-``None`` key are computed together by
        :meth:`fused_sum_and_count` inside a ``LossModule`` (``None``: never fused)."""
        return None

    @classmethod
    def fused_sum_and_count(
        cls,
        terms: Sequence[LossTerm],
        predictions: TensorMaps,
        targets: TensorMaps,
        extra_data: TensorMaps | None,
        cache: ValueCache,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """The :meth:`sum_and_count` of each of ``terms`` (same :attr:`fusion_key`) as
        two ``(K,)`` tensors; ``cache`` shares the TensorMap values between terms.
        Subclasses with a fusion key override this with one computation for all."""
        pairs = [
            term.call_sum_and_count(predictions, targets, extra_data, cache.systems)
            for term in terms
        ]
        return torch.stack([p[0] for p in pairs]), torch.stack([p[1] for p in pairs])

    def forward(
        self,
        predictions: TensorMaps,
        targets: TensorMaps,
        extra_data: TensorMaps | None = None,
        systems: list | None = None,
    ) -> torch.Tensor:
        total, count = self.call_sum_and_count(predictions, targets, extra_data, systems)
        return reduce_loss(total, count, self.reduction)

    def extra_repr(self) -> str:
        gradient = f", gradient={self.gradient!r}" if self.gradient else ""
        weighting = f", {self.weighting!r}" if self.weighting is not None else ""
        return (
            f"name={self.target!r}{gradient}, weight={self.weight}, "
            f"reduction={self.reduction!r}{weighting}"
        )


class PerStructureLoss(LossTerm):
    """A term with one value per structure (profiles: ``masked_dos``,
    ``shift_agnostic_mse``): ``mean``/``sum`` over structures, ``none`` per structure.

    Subclasses implement :meth:`per_structure`; :meth:`sum_and_count` returns (sum of
    per-structure losses, number of structures). With per-structure ``sample_weights``
    (one value per structure; per-entry weights do not apply to a loss of one value per
    structure) it returns the weighted sum and the sum of the weights, and ``none``
    gives the weighted per-structure losses.
    """

    def per_structure(
        self, predictions: TensorMaps, targets: TensorMaps, extra_data: TensorMaps | None = None
    ) -> torch.Tensor:
        """One loss value per structure, ``(B,)``."""
        raise NotImplementedError

    def _structure_weights(
        self, targets: TensorMaps, extra_data: TensorMaps | None
    ) -> torch.Tensor | None:
        if self.weighting is None:
            return None
        target = self.lookup(targets, self.target, "targets")
        return self.weighting.structure_weights(self, target, extra_data)

    def sum_and_count(
        self,
        predictions: TensorMaps,
        targets: TensorMaps,
        extra_data: TensorMaps | None = None,
        systems: list | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        losses = self.per_structure(predictions, targets, extra_data)
        weights = self._structure_weights(targets, extra_data)
        if weights is None:
            return losses.sum(), losses.new_full((), losses.shape[0])
        return (losses * weights).sum(), weights.sum()

    def forward(
        self,
        predictions: TensorMaps,
        targets: TensorMaps,
        extra_data: TensorMaps | None = None,
        systems: list | None = None,
    ) -> torch.Tensor:
        if self.reduction == "none":
            losses = self.per_structure(predictions, targets, extra_data)
            weights = self._structure_weights(targets, extra_data)
            return losses if weights is None else losses * weights
        return super().forward(predictions, targets, extra_data, systems)


def create_loss(
    type: str,
    *,
    name: str,
    gradient: str | None = None,
    weight: float = 1.0,
    reduction: str = "mean",
    **params,
) -> torch.nn.Module:
    """Build the registered loss term ``type`` for target ``name`` (or its ``gradient``).

    Missing type-specific parameters take their registered defaults. Parameters are
    converted like config values (numeric strings are accepted). ``sample_weights`` and
    ``type_weights`` (see :mod:`pl_mtt.losses.weights`) are taken by the types that
    declare them.

    >>> term = create_loss("huber", name="energy", gradient="positions", delta=0.5)
    >>> term = create_loss("mse", name="energy", gradient="positions",
    ...                    sample_weights="config_weight", type_weights={29: 1.0, 79: 2.0})
    """
    try:
        loss_type = get_loss_type(type)
    except KeyError:
        raise ValueError(
            f"unknown loss type {type!r}; valid types: {', '.join(loss_type_names())}"
        ) from None
    if reduction not in loss_type.reductions:
        raise ValueError(
            f"loss type '{type}': invalid reduction {reduction!r}; expected one of "
            f"{', '.join(loss_type.reductions)}"
        )
    if gradient is not None and not loss_type.supports_gradients:
        raise ValueError(f"loss type '{type}' cannot be used on a gradient ('{gradient}')")
    full = {}
    for key in WEIGHTING_KEYS:
        value = params.pop(key, None)
        if value is None:
            continue
        if key not in loss_type.weighting:
            raise ValueError(f"loss type '{type}' does not take '{key}'")
        try:
            full[key] = PARAM_KINDS[WEIGHTING_KEYS[key]](value)
        except ValueError as error:
            raise ValueError(
                f"loss type '{type}': '{key}' must be {error}, got {value!r}"
            ) from None
    unknown = sorted(set(params) - set(loss_type.params))
    if unknown:
        raise ValueError(
            f"loss type '{type}': unknown parameter(s) {unknown}; valid: {sorted(loss_type.params)}"
        )
    for param_name, param in loss_type.params.items():
        if param_name in params:
            try:
                full[param_name] = param.convert(params[param_name])
            except ValueError as error:
                raise ValueError(
                    f"loss type '{type}': parameter '{param_name}' must be {error}, "
                    f"got {params[param_name]!r}"
                ) from None
        elif param.default is REQUIRED:
            raise ValueError(f"loss type '{type}' requires parameter '{param_name}'")
        else:
            full[param_name] = param.default
    return loss_type.factory(
        name=name, gradient=gradient, weight=weight, reduction=reduction, **full
    )
