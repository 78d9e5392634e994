"""LossModule: the composite loss a ``training_step`` calls.

.. code-block:: python

    loss = LossModule({"energy": {"type": "mse", "forces": "mae"}},
                      {"energy": {"quantity": "energy", "forces": True}})
    total = loss(predictions, targets, extra_data, systems)   # weighted sum, differentiable
    loss.last_values       # {"energy": tensor(...), "energy/forces": tensor(...)}
    loss.compute()         # epoch aggregates, exact under DDP; loss.reset() between epochs

.. code-block:: yaml

    loss:
      energy:
        type: mse
        forces: {type: mae, weight: 0.1}
"""

from __future__ import annotations

import warnings
from collections.abc import Mapping
from typing import Any

import torch
from metatensor.torch import TensorBlock, TensorMap
from torchmetrics import Metric

from pl_mtt.config import expand_loss_config, gradient_alias, to_plain
from pl_mtt.losses.base import LossTerm, ValueCache, create_loss
from pl_mtt.losses.functional.pointwise import positive_count, weighted_counts
from pl_mtt.scaling.prepared import FusedResiduals, prepared_pair
from pl_mtt.tensormaps.builders import TensorMaps, ensemble_output_name

__all__ = ["LossAggregate", "LossModule"]

# loss types whose targets never get per-property scales (DESIGN decision 4): shift-aligned
# profiles, where a per-point scale would move the alignment
NO_PROPERTY_SCALES = ("masked_dos", "shift_agnostic_mse")


class LossAggregate(Metric):
    """Epoch sums per term, reduced across DDP ranks by summation.

    ``mean`` terms: global sum of per-element losses / global element count (weighted
    terms: global weighted sum / global sum of the weights of the elements that count);
    ``sum`` terms: global sum / number of batches in which the term was present.
    The state is one ``(3, n_terms)`` float64 tensor (rows: sums, counts, batches).

    A LossModule step only :meth:`queue` s its results (a list append); they are added
    to the state by one :meth:`update` when the state is read (``compute``, the DDP
    sync, ``sums``/``counts``/``batches``, ``state_dict``, a device move) and every
    :attr:`QUEUE_LENGTH` steps. ``update`` adds at once.
    """

    full_state_update = False
    QUEUE_LENGTH = 64

    def __init__(self, reductions: list[str]) -> None:
        # no cached compute(): queued steps are only added when the state is read
        super().__init__(compute_with_cache=False)
        n_terms = len(reductions)
        self.register_buffer(
            "is_sum",
            torch.tensor([r == "sum" for r in reductions], dtype=torch.bool),
            persistent=False,
        )
        self.add_state("totals", torch.zeros(3, n_terms, dtype=torch.float64), dist_reduce_fx="sum")
        self._queue: list[tuple[torch.Tensor, torch.Tensor, torch.Tensor]] = []

    @property
    def sums(self) -> torch.Tensor:
        """Sum of the per-element losses (``mean`` terms) or of the losses (``sum``)."""
        self.flush()
        return self.totals[0]

    @property
    def counts(self) -> torch.Tensor:
        """Number of elements that counted (weighted terms: the sum of their weights)."""
        self.flush()
        return self.totals[1]

    @property
    def batches(self) -> torch.Tensor:
        """Number of steps in which each term was present."""
        self.flush()
        return self.totals[2]

    def update(self, index: torch.Tensor, sums: torch.Tensor, counts: torch.Tensor) -> None:
        """Add ``sums`` and ``counts`` to the terms at ``index`` (one step of each term
        per entry; an index may repeat)."""
        rows = torch.stack(
            [
                sums.to(torch.float64),
                counts.to(torch.float64),
                torch.ones_like(index, dtype=torch.float64),
            ]
        )
        self.totals.index_add_(1, index, rows)

    def queue(self, index: torch.Tensor, sums: torch.Tensor, counts: torch.Tensor) -> None:
        """:meth:`update` later (detached tensors; cheap enough for every step)."""
        self._queue.append((index, sums, counts))
        if len(self._queue) >= self.QUEUE_LENGTH:
            self.flush()

    def flush(self) -> None:
        """Add the queued steps to the state."""
        if self._queue:
            queued = list(self._queue)
            self._queue.clear()
            device = self.totals.device  # differs only if the module moved meanwhile
            self.update(*(torch.cat(parts).to(device) for parts in zip(*queued, strict=True)))

    def compute(self) -> torch.Tensor:
        self.flush()
        sums, counts, batches = self.totals.unbind()
        # counts of weighted terms are sums of weights: used as they are when positive
        return sums / positive_count(torch.where(self.is_sum, batches, counts))

    def sync(self, *args, **kwargs) -> None:
        self.flush()  # every rank adds its own queue before the states are reduced
        super().sync(*args, **kwargs)

    def reset(self) -> None:
        self._queue.clear()
        super().reset()

    def _apply(self, fn, *args, **kwargs):
        self.flush()
        return super()._apply(fn, *args, **kwargs)

    def _save_to_state_dict(self, *args, **kwargs) -> None:
        self.flush()
        super()._save_to_state_dict(*args, **kwargs)


class _Step:
    """What a LossModule step with a given set of present terms needs, built once:
    the groups of terms computed together (a fused group or one term) in evaluation
    order, and per dtype and device the constant tensors (term index, weights, ``sum``
    flags) in the order of the results."""

    def __init__(self, groups: list[list[tuple[int, LossTerm]]], scaled: frozenset[str]) -> None:
        self.groups = [
            (_scaled_sum_and_count, [term for _, term in group])
            if group[0][1].target in scaled
            else (type(group[0][1]).fused_sum_and_count, [term for _, term in group])
            if len(group) > 1
            else (_single_sum_and_count, [group[0][1]])
            for group in groups
        ]
        pairs = [pair for group in groups for pair in group]  # in order of the results
        self.order = [index for index, _ in pairs]
        self.weights = [term.weight for _, term in pairs]
        self.is_sum = [term.reduction == "sum" for _, term in pairs]
        self.tensors: dict[tuple, tuple] = {}

    def constants(self, like: torch.Tensor, aggregate: LossAggregate) -> tuple:
        """(term index, weights, ``sum`` flags or None when no term sums) on ``like``'s
        device, the weights in its dtype. The first time, ``aggregate`` is moved to
        that device (the epoch state lives where the losses are)."""
        key = (like.dtype, like.device)
        found = self.tensors.get(key)
        if found is None:
            device = like.device
            if aggregate.totals.device != device:
                aggregate.to(device)
            found = self.tensors[key] = (
                torch.tensor(self.order, dtype=torch.long, device=device),
                torch.tensor(self.weights, dtype=like.dtype, device=device),
                torch.tensor(self.is_sum, dtype=torch.bool, device=device)
                if any(self.is_sum)
                else None,
            )
        return found


def _single_sum_and_count(
    terms: list[LossTerm],
    predictions: TensorMaps,
    targets: TensorMaps,
    extra_data: TensorMaps | None,
    cache: ValueCache,
) -> tuple[torch.Tensor, torch.Tensor]:
    total, count = terms[0].call_sum_and_count(predictions, targets, extra_data, cache.systems)
    return total.reshape(1), count.reshape(1)


def _scaled_sum_and_count(
    terms: list[LossTerm],
    predictions: TensorMaps,
    targets: TensorMaps,
    extra_data: TensorMaps | None,
    cache: ValueCache,
) -> tuple[torch.Tensor, torch.Tensor]:
    """The terms of one target computed from the raw inputs behind ``predictions`` and
    ``targets`` (the mappings of :func:`pl_mtt.scaling.prepare_for_loss`); the residuals
    are recorded on their batch for the metrics."""
    batch = prepared_pair(predictions, targets)
    target = terms[0].target
    parts = [term.gradient or "" for term in terms]
    inputs = batch.fused_inputs(target, parts)
    weighted = any(term.weighting is not None for term in terms)
    if weighted:  # the weights of each part, from the target's rows (its metadata)
        layout = targets.layout(target)
        inputs.weights = [
            None
            if term.weighting is None
            else term.entry_weights(layout, [values], extra_data, cache.systems)[0]
            for term, values in zip(terms, inputs.targets, strict=True)
        ]
    sums, counts, differences, valid = type(terms[0]).scaled_sum_and_count(terms, inputs)
    # the metrics count entries; the loss of weighted terms divides by the weights
    batch.record(target, FusedResiduals(parts, differences, valid, counts, inputs.inverse_scale))
    if weighted:
        counts = weighted_counts(valid, inputs.weights, counts)
    return sums, counts


class _LastCall:
    """The per-term results of the last call (a plain holder: assigning attributes of
    an ``nn.Module`` costs several microseconds)."""

    __slots__ = ("value",)

    def __init__(self) -> None:
        self.value: tuple | None = None


class LossModule(torch.nn.Module):
    """One loss term per (target, gradient), weighted and summed.

    Terms are named ``<target>`` and ``<target>/<gradient>``, with ``forces``,
    ``stress`` or ``virial`` for the gradients of energy-like targets
    (``energy/forces``). The module does not own the scaler: it is not part of this
    module's ``state_dict`` (the LightningModule owns it, e.g. as ``pl_module.scaler``).

    A step reads each TensorMap once and computes terms that declare the same
    :attr:`~pl_mtt.losses.LossTerm.fusion_key` together (e.g. energy, force and stress
    ``mse``: one autograd node); the epoch state (:attr:`aggregate`) and
    :attr:`last_values` are bookkept without extra work per step.

    Args:
        loss: any loss-config form (see :func:`pl_mtt.expand_loss_config`).
        targets: training target name -> target options.
        scaler: a fitted scaler (``Scaler``); predictions of multi-property targets, and
            their ensemble outputs per member, are multiplied by its per-property scales.
        global_mean: make ``mean`` terms exact global means under DDP (one all_reduce
            of the element counts per step; the total is multiplied by the world size
            to undo DDP's gradient averaging).
    """

    def __init__(
        self,
        loss: Any,
        targets: Mapping[str, Any],
        scaler: torch.nn.Module | None = None,
        *,
        global_mean: bool = False,
    ) -> None:
        super().__init__()
        self.target_options: dict[str, dict] = {
            name: dict(options or {}) for name, options in (to_plain(targets) or {}).items()
        }
        self.config: dict[str, dict] = expand_loss_config(loss, self.target_options)
        self.global_mean = bool(global_mean)

        names, terms = [], []
        for target, entry in self.config.items():
            specs = [(target, None, entry)]
            for gradient, gradient_entry in entry["gradients"].items():
                alias = gradient_alias(target, self.target_options.get(target), gradient)
                specs.append((f"{target}/{alias}", gradient, gradient_entry))
            for name, gradient, spec in specs:
                if spec["reduction"] == "none":
                    path = f"loss.{target}" + (f".gradients.{gradient}" if gradient else "")
                    raise ValueError(
                        f"{path}.reduction: 'none' gives one loss per structure, but a "
                        f"LossModule needs scalar terms; use 'mean' or 'sum' (or call the "
                        f"term from pl_mtt.losses.create_loss directly)"
                    )
                params = {k: v for k, v in spec.items() if k not in ("type", "gradients")}
                names.append(name)
                terms.append(create_loss(spec["type"], name=target, gradient=gradient, **params))
        self.term_names: list[str] = names
        self.term_list = torch.nn.ModuleList(terms)
        # (target, prediction key) of each term, for the presence test
        self._reads = [(term.target, term.prediction_key) for term in terms]
        self._set_scaled_targets()
        self.aggregate = LossAggregate([term.reduction for term in terms])
        self._property_scaled: dict[str, tuple[bool, bool]] = {}
        self._steps: dict[tuple, _Step] = {}  # by present terms (and scaled targets)
        self._last = _LastCall()
        self._scaler: tuple[torch.nn.Module, ...] = ()
        if scaler is not None:
            self.set_scaler(scaler)

    def _set_scaled_targets(self) -> None:
        """The targets whose terms all run on raw inputs (the mappings of
        :func:`pl_mtt.scaling.prepare_for_loss`), with the parts they read in term
        order; no layout is taken as checked yet (the first call of each runs the general
        path)."""
        terms = list(self.term_list)
        self._scaled: dict[str, list[str]] = {}
        for target in dict.fromkeys(term.target for term in terms):
            own = [term for term in terms if term.target == target]
            if all(
                term.reads_scaled_inputs
                and term.prediction_key == target
                and type(term) is type(own[0])
                for term in own
            ):
                self._scaled[target] = [term.gradient or "" for term in own]
        self._scaled_layouts: set[tuple] = set()

    # -- configuration -----------------------------------------------------------------
    @property
    def scaler(self) -> torch.nn.Module | None:
        """The scaler whose per-property scales are applied to predictions, or None."""
        return self._scaler[0] if self._scaler else None

    def set_scaler(self, scaler: torch.nn.Module | None) -> None:
        """Use ``scaler`` (not registered as a submodule: its owner checkpoints it)."""
        self._scaler = () if scaler is None else (scaler,)

    def compile_cores(self, mode: str | None = "default") -> list[str]:
        """Compile the functional cores of the terms that have one (``masked_dos``)
        with ``torch.compile(fullgraph=True, mode=mode)``; ``None`` goes back to eager.
        Returns the names of those terms.

        .. code-block:: python

            loss = LossModule({"mtt::dos": {"type": "masked_dos", "extra_targets": 200}},
                              {"mtt::dos": {}})
            loss.compile_cores("reduce-overhead")  # GPU: CUDA graphs, fewest launches
        """
        return [name for name, term in self.terms.items() if term.compile_core(mode)]

    def reconfigure(self, loss: Any) -> list[str]:
        """Give the terms the weights, types and parameters of ``loss``: a full loss
        config in any form, expanded against this module's targets (unlisted fields take
        their defaults; merge a partial config first with
        :func:`pl_mtt.config.merge_loss_config`). The terms stay the same. New weights
        apply from the next call; a term whose type, reduction or parameters change is
        rebuilt and its epoch aggregate starts again from zero. Returns the names of the
        rebuilt terms.

        .. code-block:: python

            stage = {"energy": {"weight": 1000.0, "forces": {"weight": 10.0}}}
            loss.reconfigure(merge_loss_config(loss.config, stage, loss.target_options))
        """
        config = expand_loss_config(loss, self.target_options)
        changes = []  # (index, new spec, rebuild?) in term order
        for target, entry in config.items():
            specs = [(None, entry, self.config[target])]
            specs += [
                (g, spec, self.config[target]["gradients"][g])
                for g, spec in entry["gradients"].items()
            ]
            for gradient, spec, old in specs:
                index = len(changes)
                term = self.term_list[index]
                if (term.target, term.gradient) != (target, gradient):
                    raise ValueError(  # not reachable through the grammar: same targets
                        f"LossModule.reconfigure: the new loss has other terms than "
                        f"{self.term_names}"
                    )
                if spec["reduction"] == "none":
                    raise ValueError(
                        f"LossModule.reconfigure: term {self.term_names[index]} needs "
                        f"reduction 'mean' or 'sum', got 'none'"
                    )
                kept = ("weight", "gradients")
                rebuild = {k: v for k, v in spec.items() if k not in kept} != {
                    k: v for k, v in old.items() if k not in kept
                }
                changes.append((index, target, gradient, spec, rebuild))
        rebuilt = []
        self.aggregate.flush()
        for index, target, gradient, spec, rebuild in changes:
            old = self.term_list[index]
            if not rebuild:
                old.weight = float(spec["weight"])
                continue
            params = {k: v for k, v in spec.items() if k not in ("type", "gradients")}
            term = create_loss(spec["type"], name=target, gradient=gradient, **params)
            if old.compile_mode is not None:
                term.compile_core(old.compile_mode)
            self.term_list[index] = term
            self._reads[index] = (term.target, term.prediction_key)
            self.aggregate.totals[:, index] = 0.0
            self.aggregate.is_sum[index] = term.reduction == "sum"
            rebuilt.append(self.term_names[index])
        self.config = config
        self._steps.clear()  # they hold the weights and the groups of terms
        self._property_scaled.clear()
        self._set_scaled_targets()  # a rebuilt term may no longer run on raw inputs
        return rebuilt

    @property
    def terms(self) -> dict[str, LossTerm]:
        """Term name -> term (``energy``, ``energy/forces``, ...)."""
        return dict(zip(self.term_names, self.term_list, strict=True))

    # -- the loss ------------------------------------------------------------------------
    def forward(
        self,
        predictions: TensorMaps,
        targets: TensorMaps,
        extra_data: TensorMaps | None = None,
        systems: list | None = None,
    ) -> torch.Tensor:
        """The weighted sum of the terms (differentiable)."""
        scaled, new_layouts = self._scaled_targets(predictions, targets)
        if self._scaler:
            predictions = self._apply_property_scales(predictions, targets, systems)
        present = tuple(
            index
            for index, (target, output) in enumerate(self._reads)
            if target in targets or target in predictions or output in predictions
        )  # the others are absent from this batch: they contribute an exact zero
        distributed = self.global_mean and _world_size() > 1
        if not present:
            if distributed:  # every rank issues the same collective
                torch.distributed.all_reduce(self._zero_counts())
            self._last.value = None
            return _zero_like(predictions, self.aggregate.totals)

        key = (present, scaled) if scaled else present
        step = self._steps.get(key)
        if step is None:
            step = self._steps[key] = self._step(present, scaled)
        cache = ValueCache(systems)
        if len(step.groups) == 1:
            compute, terms = step.groups[0]
            sums, counts = compute(terms, predictions, targets, extra_data, cache)
        else:
            results = [
                compute(terms, predictions, targets, extra_data, cache)
                for compute, terms in step.groups
            ]
            sums = torch.cat([result[0] for result in results])
            counts = torch.cat([result[1] for result in results])

        index, weights, is_sum = step.constants(sums, self.aggregate)
        # mean terms divide by their element count, sum terms by 1 (no autograd here:
        # counts, weights and the all-reduced counts carry no gradient)
        if distributed:
            all_counts = self._zero_counts().index_copy_(0, index, counts.to(torch.float64))
            torch.distributed.all_reduce(all_counts)
            factors = weights * _world_size() / _denominators(all_counts[index], is_sum)
        else:
            factors = weights / _denominators(counts, is_sum)
        detached = sums.detach()
        self.aggregate.queue(index, detached, counts)
        self._last.value = (step.order, detached, counts, is_sum)
        self._scaled_layouts.update(new_layouts)
        if factors.dtype != sums.dtype:
            factors = factors.to(sums.dtype)
        return torch.dot(sums, factors)

    def _scaled_targets(
        self, predictions: TensorMaps, targets: TensorMaps
    ) -> tuple[frozenset[str], list[tuple]]:
        """Targets computed from raw inputs in this call, and the layouts seen for the
        first time. Only for the mappings of :func:`pl_mtt.scaling.prepare_for_loss`;
        the first call with a layout takes the general path (its full checks and error
        messages), later calls with that layout the fused one."""
        batch = prepared_pair(predictions, targets) if self._scaled else None
        if batch is None:
            return frozenset(), []
        scaled, new = [], []
        for target, parts in self._scaled.items():
            if not (predictions.is_lazy(target) and targets.is_lazy(target)):
                continue
            key = batch.fusion_key(target, parts)
            if key is None:
                continue
            if (target, key) in self._scaled_layouts:
                scaled.append(target)
            else:
                new.append((target, key))
        return frozenset(scaled), new

    def _step(self, present: tuple[int, ...], scaled: frozenset[str] = frozenset()) -> _Step:
        """Group the present terms: the terms of a target computed from raw inputs
        together; terms of one class with the same fusion key together (at the
        position of the first of them); the others alone."""
        groups: list[list[tuple[int, LossTerm]]] = []
        by_key: dict = {}
        for index in present:
            term = self.term_list[index]
            key = getattr(term, "fusion_key", None)
            if term.target in scaled:
                key = ("scaled", term.target)
            if key is None:
                groups.append([(index, term)])
            elif (type(term), key) in by_key:
                by_key[type(term), key].append((index, term))
            else:
                by_key[type(term), key] = [(index, term)]
                groups.append(by_key[type(term), key])
        return _Step(groups, scaled)

    def _zero_counts(self) -> torch.Tensor:
        return torch.zeros_like(self.aggregate.totals[1])

    # -- logging and epoch aggregates ---------------------------------------------------
    @property
    def last_values(self) -> dict[str, torch.Tensor]:
        """Unweighted, detached value of each term present in the last call.

        With ``global_mean`` these are this rank's own values (local counts).
        """
        if self._last.value is None:
            return {}
        order, sums, counts, is_sum = self._last.value
        values = sums / _denominators(counts, is_sum)
        return {
            self.term_names[i]: v
            for i, v in sorted(zip(order, values.unbind(), strict=True), key=lambda x: x[0])
        }

    def compute(self) -> dict[str, torch.Tensor]:
        """Epoch aggregate of every term, reduced across DDP ranks (see DESIGN.md).

        Also reads the invalid-weight flags weighted terms keep on an accelerator (see
        :mod:`pl_mtt.losses.weights`): a negative or NaN weight is an error here at the
        latest."""
        for term in self.term_list:
            if term.weighting is not None:
                term.weighting.check_pending(term)
        with warnings.catch_warnings():
            # a rank (or epoch) without updates is legitimate: its sums are zeros
            warnings.filterwarnings("ignore", message=".*was called before the ``update``")
            values = self.aggregate.compute().reshape(-1)  # torchmetrics squeezes 1 term
        return dict(zip(self.term_names, values.unbind(), strict=True))

    def reset(self) -> None:
        """Start a new epoch (and forget the last values)."""
        self.aggregate.reset()
        self._last.value = None

    # -- per-property scales ------------------------------------------------------------
    def _property_scaling(self, target: str, layout: TensorMap) -> tuple[bool, bool]:
        """(gets per-property scales, has per-atom samples), decided on the first layout."""
        decision = self._property_scaled.get(target)
        if decision is None:
            first = layout.block_by_id(0)
            multi = len(layout) > 1 or len(first.properties) > 1
            scaled = multi and self.config[target]["type"] not in NO_PROPERTY_SCALES
            per_atom = any(n in ("atom", "first_atom") for n in first.samples.names)
            decision = self._property_scaled[target] = (scaled, per_atom)
        return decision

    def _apply_property_scales(
        self,
        predictions: TensorMaps,
        targets: TensorMaps,
        systems: list | None,
    ) -> TensorMaps:
        """Predictions of multi-property targets (and their ensemble outputs, per
        member) times the scaler's per-property scales; a new dict.

        The scaler is applied once to a TensorMap of ones with the target's layout,
        which gives the scale of every entry; the prediction and the ensemble output
        (each member) are multiplied by it.
        """
        layouts, per_atom = {}, []
        for target in self.config:
            layout = _layout(targets, target)
            if layout is None:
                layout = _layout(predictions, target)
            if layout is None or len(layout) == 0:
                continue
            if target not in predictions and ensemble_output_name(target) not in predictions:
                continue
            scaled, atoms = self._property_scaling(target, layout)
            if scaled:
                layouts[target] = _ones_like(layout, list(self.config[target]["gradients"]))
                if atoms:
                    per_atom.append(target)
        if not layouts:
            return predictions
        if systems is None and per_atom:
            raise ValueError(
                f"LossModule: the per-property scales of the per-atom target(s) {per_atom} "
                f"depend on atomic types: call loss(predictions, targets, extra_data, systems)"
            )
        scales = self.scaler(
            [] if systems is None else systems,
            layouts,
            remove=False,
            use_per_target_scales=False,
            use_per_property_scales=True,
        )
        scaled = predictions.copy() if hasattr(predictions, "copy") else dict(predictions)
        for target in layouts:
            for name in (target, ensemble_output_name(target)):
                if name in predictions:
                    scaled[name] = _multiply(predictions[name], scales[target])
        return scaled


def _layout(tensors: TensorMaps, name: str) -> TensorMap | None:
    """Entry ``name`` for its metadata only: without computing it where the mapping can
    (the mappings of :func:`pl_mtt.scaling.prepare_for_loss`)."""
    layout = getattr(tensors, "layout", None)
    return layout(name) if layout is not None else tensors.get(name)


def _denominators(counts: torch.Tensor, is_sum: torch.Tensor | None) -> torch.Tensor:
    """Element counts (at least 1; sums of weights where positive, else 1) of ``mean``
    terms, 1 for ``sum`` terms."""
    denominators = positive_count(counts)
    return denominators if is_sum is None else denominators.masked_fill(is_sum, 1)


def _world_size() -> int:
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        return torch.distributed.get_world_size()
    return 1


def _zero_like(predictions: TensorMaps, fallback: torch.Tensor) -> torch.Tensor:
    """An exact zero connected to the predictions' autograd graph (when there is one)."""
    for tensor_map in predictions.values():
        for block in tensor_map.blocks():
            return block.values.reshape(-1)[:0].sum()
    return torch.zeros((), dtype=fallback.dtype, device=fallback.device)


def _block_like(block: TensorBlock, values: torch.Tensor) -> TensorBlock:
    return TensorBlock(values, block.samples, block.components, block.properties)


def _ones_like(layout: TensorMap, gradients: list[str]) -> TensorMap:
    """A TensorMap of ones with ``layout``'s metadata and its listed gradients."""
    blocks = []
    for block in layout.blocks():
        ones = _block_like(block, torch.ones_like(block.values))
        for gradient in gradients:
            if gradient in block.gradients_list():
                gradient_block = block.gradient(gradient)
                ones.add_gradient(
                    gradient, _block_like(gradient_block, torch.ones_like(gradient_block.values))
                )
        blocks.append(ones)
    return TensorMap(layout.keys, blocks)


def _times(values: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """``values`` times ``scale`` per property; an ensemble (``M x P`` properties) per
    member."""
    n_properties = scale.shape[-1]
    if values.shape[-1] == n_properties:
        return values * scale
    members = values.reshape(*values.shape[:-1], -1, n_properties)
    return (members * scale.unsqueeze(-2)).reshape(values.shape)


def _multiply(tensor_map: TensorMap, scales: TensorMap) -> TensorMap:
    """``tensor_map`` times per-entry ``scales`` (values and the gradients they have)."""
    blocks = []
    for block, scale in zip(tensor_map.blocks(), scales.blocks(), strict=True):
        new = _block_like(block, _times(block.values, scale.values))
        scaled_gradients = scale.gradients_list()
        for gradient, gradient_block in block.gradients():
            values = gradient_block.values
            if gradient in scaled_gradients:
                values = _times(values, scale.gradient(gradient).values)
            new.add_gradient(gradient, _block_like(gradient_block, values))
        blocks.append(new)
    return TensorMap(tensor_map.keys, blocks)
