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

from pl_mtt.config import _to_plain, expand_loss_config, gradient_alias
from pl_mtt.losses.base import LossTerm, create_loss
from pl_mtt.tensormaps import ensemble_output_name

__all__ = ["LossAggregate", "LossModule"]

# loss types whose targets never get per-property scales (DESIGN decision 4)
NO_PROPERTY_SCALES = ("masked_dos",)


class LossAggregate(Metric):
    """Epoch sums per term, reduced across DDP ranks by summation.

    ``mean`` terms: global sum of per-element losses / global element count;
    ``sum`` terms: global sum / number of batches in which the term was present.
    """

    full_state_update = False

    def __init__(self, reductions: list[str]) -> None:
        super().__init__()
        n_terms = len(reductions)
        self.register_buffer(
            "is_sum",
            torch.tensor([r == "sum" for r in reductions], dtype=torch.bool),
            persistent=False,
        )
        self.add_state("sums", torch.zeros(n_terms, dtype=torch.float64), dist_reduce_fx="sum")
        self.add_state("counts", torch.zeros(n_terms, dtype=torch.float64), dist_reduce_fx="sum")
        self.add_state("batches", torch.zeros(n_terms, dtype=torch.float64), dist_reduce_fx="sum")

    def update(
        self, index: torch.Tensor, sums: torch.Tensor, counts: torch.Tensor, ones: torch.Tensor
    ) -> None:
        """Add one step's per-term ``sums`` and ``counts`` for the terms at ``index``
        (``ones``: a float64 vector of ones as long as ``index``)."""
        self.sums.index_add_(0, index, sums.to(torch.float64))
        self.counts.index_add_(0, index, counts.to(torch.float64))
        self.batches.index_add_(0, index, ones)

    def compute(self) -> torch.Tensor:
        denominators = torch.where(self.is_sum, self.batches, self.counts)
        return self.sums / denominators.clamp(min=1)


class LossModule(torch.nn.Module):
    """One loss term per (target, gradient), weighted and summed.

    Terms are named ``<target>`` and ``<target>/<gradient>``, with ``forces``,
    ``stress`` or ``virial`` for the gradients of energy-like targets
    (``energy/forces``). The module does not own the scaler: it is not part of this
    module's ``state_dict`` (the LightningModule owns it, e.g. as ``pl_module.scaler``).

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
            name: dict(options or {}) for name, options in (_to_plain(targets) or {}).items()
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
        self.aggregate = LossAggregate([term.reduction for term in terms])
        self._property_scaled: dict[str, tuple[bool, bool]] = {}
        self._patterns: dict[Any, tuple[torch.Tensor, ...]] = {}
        self._last: tuple[tuple[int, ...], torch.Tensor] | None = None
        self._scaler: tuple[torch.nn.Module, ...] = ()
        if scaler is not None:
            self.set_scaler(scaler)

    # -- configuration -----------------------------------------------------------------
    @property
    def scaler(self) -> torch.nn.Module | None:
        """The scaler whose per-property scales are applied to predictions, or None."""
        return self._scaler[0] if self._scaler else None

    def set_scaler(self, scaler: torch.nn.Module | None) -> None:
        """Use ``scaler`` (not registered as a submodule: its owner checkpoints it)."""
        self._scaler = () if scaler is None else (scaler,)

    @property
    def terms(self) -> dict[str, LossTerm]:
        """Term name -> term (``energy``, ``energy/forces``, ...)."""
        return dict(zip(self.term_names, self.term_list, strict=True))

    # -- the loss ------------------------------------------------------------------------
    def forward(
        self,
        predictions: dict[str, TensorMap],
        targets: dict[str, TensorMap],
        extra_data: dict[str, TensorMap] | None = None,
        systems: list | None = None,
    ) -> torch.Tensor:
        """The weighted sum of the terms (differentiable)."""
        if self._scaler:
            predictions = self._apply_property_scales(predictions, targets, systems)
        present, sums, counts = [], [], []
        for index, (term, (target, output)) in enumerate(
            zip(self.term_list, self._reads, strict=True)
        ):
            if target not in targets and target not in predictions and output not in predictions:
                continue  # absent from this batch: contributes an exact zero
            total, count = term.sum_and_count(predictions, targets, extra_data)
            present.append(index)
            sums.append(total)
            counts.append(count)
        distributed = self.global_mean and _world_size() > 1
        if not present:
            if distributed:  # every rank issues the same collective
                torch.distributed.all_reduce(self._zero_counts())
            self._last = ((), self.aggregate.sums[:0])
            return _zero_like(predictions, self.aggregate.sums)

        sums_t = torch.stack(sums)
        counts_t = torch.stack(counts)
        key = (tuple(present), sums_t.dtype, sums_t.device)
        pattern = self._patterns.get(key)
        if pattern is None:
            pattern = self._patterns[key] = self._pattern(present, sums_t)
        index, weights, is_sum, ones = pattern
        with torch.no_grad():
            # mean terms divide by their element count, sum terms by 1
            denominators = counts_t.clamp(min=1).masked_fill_(is_sum, 1)
            local = sums_t.detach() / denominators
            if distributed:
                all_counts = self._zero_counts().index_copy_(0, index, counts_t.to(torch.float64))
                torch.distributed.all_reduce(all_counts)
                denominators = all_counts[index].clamp(min=1).masked_fill_(is_sum, 1)
                factors = weights * _world_size() / denominators
            else:
                factors = weights / denominators
        total = torch.dot(sums_t, factors.to(sums_t.dtype))
        self._last = (tuple(present), local)
        self.aggregate.update(index, sums_t.detach(), counts_t, ones)
        return total

    def _pattern(self, present: list[int], like: torch.Tensor) -> tuple[torch.Tensor, ...]:
        terms = [self.term_list[i] for i in present]
        device = like.device
        if self.aggregate.sums.device != device:
            self.aggregate.to(device)  # the epoch state lives where the losses are
        return (
            torch.tensor(present, dtype=torch.long, device=device),
            torch.tensor([t.weight for t in terms], dtype=like.dtype, device=device),
            torch.tensor([t.reduction == "sum" for t in terms], dtype=torch.bool, device=device),
            torch.ones(len(terms), dtype=torch.float64, device=device),
        )

    def _zero_counts(self) -> torch.Tensor:
        return torch.zeros_like(self.aggregate.counts)

    # -- logging and epoch aggregates ---------------------------------------------------
    @property
    def last_values(self) -> dict[str, torch.Tensor]:
        """Unweighted, detached value of each term present in the last call.

        With ``global_mean`` these are this rank's own values (local counts).
        """
        if self._last is None:
            return {}
        present, values = self._last
        return {self.term_names[i]: v for i, v in zip(present, values.unbind(), strict=True)}

    def compute(self) -> dict[str, torch.Tensor]:
        """Epoch aggregate of every term, reduced across DDP ranks (see DESIGN.md)."""
        with warnings.catch_warnings():
            # a rank (or epoch) without updates is legitimate: its sums are zeros
            warnings.filterwarnings("ignore", message=".*was called before the ``update``")
            values = self.aggregate.compute().reshape(-1)  # torchmetrics squeezes 1 term
        return dict(zip(self.term_names, values.unbind(), strict=True))

    def reset(self) -> None:
        """Start a new epoch (and forget the last values)."""
        self.aggregate.reset()
        self._last = None

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
        predictions: dict[str, TensorMap],
        targets: dict[str, TensorMap],
        systems: list | None,
    ) -> dict[str, TensorMap]:
        """Predictions of multi-property targets (and their ensemble outputs, per
        member) times the scaler's per-property scales; a new dict.

        The scaler is applied once to a TensorMap of ones with the target's layout,
        which gives the scale of every entry; the prediction and the ensemble output
        (each member) are multiplied by it.
        """
        layouts, per_atom = {}, []
        for target in self.config:
            layout = targets.get(target, predictions.get(target))
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
        scaled = dict(predictions)
        for target in layouts:
            for name in (target, ensemble_output_name(target)):
                if name in predictions:
                    scaled[name] = _multiply(predictions[name], scales[target])
        return scaled


def _world_size() -> int:
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        return torch.distributed.get_world_size()
    return 1


def _zero_like(predictions: dict[str, TensorMap], fallback: torch.Tensor) -> torch.Tensor:
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
