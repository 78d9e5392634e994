"""metatrain's architectures (PET, SOAP-BPNN, ...) behind pl_mtt's model contract.

.. code-block:: yaml

    model:                                   # conf/model/pet.yaml, or model=pet
      _target_: pl_mtt.models.MetatrainModel
      architecture: pet                      # any name of metatrain's registry
      hypers: {d_pet: 64, num_gnn_layers: 1} # over the architecture's defaults
      dtype: float64

``MetatrainModel(systems) -> Dict[str, TensorMap]`` returns RAW outputs (scaled,
baseline-free units): pl_mtt's :class:`pl_mtt.Scaler` and
:class:`pl_mtt.CompositionModel` do the scales and the baseline, so the architecture's
own composition model is removed and its scaler stays the identity (metatrain applies
both only in eval mode; here training and eval outputs are the same). Energies get
forces and stress by autograd through a strain, as :class:`pl_mtt.models.RadialMLP`:
``positions`` gradient ``dE/dr`` (samples ``sample, system, atom``) and ``strain``
gradient ``dE/d(strain)``. The neighbour lists the architecture requests
(:meth:`requested_neighbor_lists`) are read from the systems, which carry them from the
data layer (computed once per structure); systems without them get them attached. Pair
vectors are rebuilt from the (strained) positions and cell, so the gradients flow
through them.

metatrain is an optional extra: ``pip install pl_mtt[metatrain]``. Its training hypers
(optimizer, learning-rate schedule, clipping) are not read here: see
:func:`training_defaults` and the ``optimizer``/``trainer`` keys of the app.
"""

from __future__ import annotations

import copy
import difflib
import importlib
from collections.abc import Mapping, Sequence
from types import ModuleType
from typing import Any

import torch
from metatensor.torch import Labels, TensorBlock, TensorMap
from metatomic.torch import ModelOutput, NeighborListOptions, System

from pl_mtt.config import is_energy_like, to_plain
from pl_mtt.models.geometry import (
    compiled_neighbor_pairs,
    pair_vectors,
    strained,
    system_of_atoms,
)
from pl_mtt.tensormaps.builders import atomistic_tensor_map, range_labels
from pl_mtt.tensormaps.neighbors import attach_neighbor_lists, requested_neighbor_lists
from pl_mtt.typecheck import check_value

__all__ = [
    "INSTALL_HINT",
    "MetatrainModel",
    "architecture_defaults",
    "check_architecture_hypers",
    "import_architecture",
    "merge_hypers",
    "training_defaults",
]

INSTALL_HINT = "pip install 'pl_mtt[metatrain]'"
_DTYPES = {"float64": torch.float64, "float32": torch.float32}
# hypers pl_mtt cannot honour: the value that works, and why
_UNSUPPORTED_MODEL_HYPERS = {
    "zbl": (
        False,
        "ZBL is an additive model in physical units, pl_mtt's model outputs are in "
        "scaled units (pl_mtt's CompositionModel is the only additive model)",
    ),
    "system_conditioning": (
        False,
        "charge and spin conditioning needs extra inputs that pl_mtt's data does not pass",
    ),
}


def _metatrain_architectures() -> ModuleType:
    try:
        return importlib.import_module("metatrain.utils.architectures")
    except ImportError as error:
        raise ImportError(
            f"metatrain's architectures need the optional extra: {INSTALL_HINT} ({error})"
        ) from error


def import_architecture(name: str) -> ModuleType:
    """metatrain's module of architecture ``name`` (with ``__model__``, ``__trainer__``).

    A missing metatrain, an unknown name or missing dependencies of the architecture
    are clear errors saying what to install or which names exist.
    """
    architectures = _metatrain_architectures()
    names = architectures.find_all_architectures()
    if name not in names:
        close = difflib.get_close_matches(str(name), names, n=1, cutoff=0.5)
        hint = f" Did you mean '{close[0]}'?" if close else ""
        raise ValueError(
            f"architecture {name!r} is not one of metatrain's architectures "
            f"({', '.join(sorted(names))}).{hint}"
        )
    try:
        return architectures.import_architecture(name)
    except ImportError as error:
        raise ImportError(f"architecture '{name}' cannot be imported: {error}") from error


def architecture_defaults(name: str) -> dict[str, Any]:
    """``{"model": {...}, "training": {...}}``: the architecture's default hypers."""
    import_architecture(name)
    defaults = _metatrain_architectures().get_default_hypers(name)
    return {"model": defaults["model"], "training": defaults["training"]}


def training_defaults(name: str) -> dict[str, Any]:
    """The default training hypers of architecture ``name`` (its trainer's)."""
    return architecture_defaults(name)["training"]


def check_architecture_hypers(
    name: str, section: str, hypers: Mapping[str, Any], path: str
) -> None:
    """Check ``hypers`` (a partial ``model`` or ``training`` section) against the
    architecture's own schema: unknown keys (with a suggestion) and wrong types are
    ``ValueError`` naming ``<path>.<key>``."""
    import_architecture(name)
    classes = _metatrain_architectures().get_hypers_classes(name)
    cls = classes["model" if section == "model" else "trainer"]
    check_value(dict(hypers), cls, path)


def merge_hypers(defaults: Mapping[str, Any], overrides: Mapping[str, Any]) -> dict[str, Any]:
    """``defaults`` updated by ``overrides``, mappings merged recursively (as
    ``OmegaConf.merge``); other values are replaced."""
    merged = copy.deepcopy(dict(defaults))
    for key, value in overrides.items():
        if isinstance(value, Mapping) and isinstance(merged.get(key), Mapping):
            merged[key] = merge_hypers(merged[key], value)
        else:
            merged[key] = copy.deepcopy(value)
    return merged


def _target_info(name: str, options: Mapping[str, Any]) -> Any:
    """metatrain's ``TargetInfo`` of a pl_mtt target (resolved options)."""
    target_info = importlib.import_module("metatrain.utils.data.target_info")
    unit = str(options.get("unit") or "")
    per_atom = bool(options.get("per_atom"))
    if is_energy_like(name, options) and not per_atom:
        return target_info.get_energy_target_info(
            name,
            {"unit": unit, "description": str(options.get("description") or "")},
            add_position_gradients=bool(options.get("forces")),
            add_strain_gradients=bool(options.get("stress") or options.get("virial")),
        )
    return target_info.get_generic_target_info(
        name,
        {
            "type": "scalar",
            "sample_kind": "atom" if per_atom else "system",
            "num_subtargets": int(options.get("num_subtargets") or 1),
            "quantity": str(options.get("quantity") or ""),
            "unit": unit,
            "description": str(options.get("description") or ""),
        },
    )


class _Target:
    """What the adapter publishes for one target."""

    def __init__(self, name: str, options: Mapping[str, Any]) -> None:
        self.name = name
        self.per_atom = bool(options.get("per_atom"))
        self.energy_like = is_energy_like(name, options)
        self.num_properties = int(options.get("num_subtargets") or 1)
        gradient_capable = self.energy_like and not self.per_atom and self.num_properties == 1
        self.forces = gradient_capable and bool(options.get("forces"))
        self.stress = gradient_capable and bool(options.get("stress") or options.get("virial"))
        self.output = ModelOutput(
            unit=str(options.get("unit") or ""), sample_kind="atom" if self.per_atom else "system"
        )


class MetatrainModel(torch.nn.Module):
    """A metatrain architecture with the ``model(systems) -> Dict[str, TensorMap]``
    signature, publishing raw outputs and, for energies, their gradients.

    Args:
        architecture: a name of metatrain's registry (``pet``, ``soap_bpnn``, ...).
        hypers: the architecture's ``model`` hypers (over its defaults; checked
            against its schema).
        targets: resolved target options (``AtomisticDataModule.target_options``):
            which outputs, per atom or not, number of properties, forces/stress/virial.
        atomic_types: atomic numbers the model knows (the data's).
        length_unit: length unit of the systems (metadata for the architecture).
        dtype: ``"float64"`` or ``"float32"``; systems must have the same dtype.
    """

    def __init__(
        self,
        architecture: str,
        hypers: Mapping[str, Any] | None = None,
        *,
        targets: Mapping[str, Mapping[str, Any]] | None = None,
        atomic_types: Sequence[int] | None = None,
        length_unit: str = "angstrom",
        dtype: str = "float64",
    ) -> None:
        super().__init__()
        hypers = dict(to_plain(hypers) or {})
        targets = {n: dict(o or {}) for n, o in (to_plain(targets) or {}).items()}
        atomic_types = [int(t) for t in (to_plain(atomic_types) or [])]
        if dtype not in _DTYPES:
            raise ValueError(f"model.dtype must be one of {sorted(_DTYPES)}, got {dtype!r}")
        if not targets or not atomic_types:
            raise ValueError(
                f"MetatrainModel('{architecture}') needs `targets` (resolved target options) "
                "and `atomic_types`; the app passes those of the data "
                "(AtomisticDataModule.target_options and .atomic_types)"
            )
        module = import_architecture(architecture)
        check_architecture_hypers(architecture, "model", hypers, "model.hypers")
        full = merge_hypers(architecture_defaults(architecture)["model"], hypers)
        for key, (value, reason) in _UNSUPPORTED_MODEL_HYPERS.items():
            if key in full and full[key] != value:
                raise ValueError(f"model.hypers.{key}: only {value} is supported: {reason}")
        self._arguments = {
            "architecture": architecture,
            "hypers": hypers,
            "targets": targets,
            "atomic_types": atomic_types,
            "length_unit": length_unit,
            "dtype": dtype,
        }
        dataset_info = importlib.import_module("metatrain.utils.data").DatasetInfo
        try:
            info = dataset_info(
                length_unit=length_unit,
                atomic_types=atomic_types,
                targets={name: _target_info(name, options) for name, options in targets.items()},
            )
        except (ValueError, RuntimeError) as error:
            raise ValueError(
                f"model: targets {sorted(targets)} cannot be described to metatrain (target "
                f"names must be standard outputs such as 'energy' or start with 'mtt::'; "
                f"units must be known to metatomic): {error}"
            ) from error
        self.architecture = architecture
        self.hypers = full
        self.module = module.__model__(full, info)
        # pl_mtt's CompositionModel is the baseline: drop the architecture's own
        additive = getattr(self.module, "additive_models", None)
        if additive is not None:
            kept = [m for m in additive if type(m).__name__ != "CompositionModel"]
            self.module.additive_models = torch.nn.ModuleList(kept)
        self.module.to(_DTYPES[dtype])
        self.targets = [_Target(name, options) for name, options in targets.items()]
        self._outputs = {target.name: target.output for target in self.targets}
        self._neighbor_lists = requested_neighbor_lists(self.module)

    # -- what the model needs and publishes -------------------------------------------
    @torch.jit.export
    def requested_neighbor_lists(self) -> list[NeighborListOptions]:
        """The neighbour lists the architecture reads (metatomic's convention)."""
        return list(self._neighbor_lists)

    @property
    @torch.jit.unused
    def output_names(self) -> list[str]:
        return [target.name for target in self.targets]

    @property
    @torch.jit.unused
    def cutoff(self) -> float:
        """The largest cutoff of the requested neighbour lists."""
        return max((options.cutoff for options in self._neighbor_lists), default=0.0)

    # -- pickling: rebuilt from its arguments (metatrain modules hold TorchScript
    # functions, which pickle refuses), then its weights restored ----------------------
    def __reduce__(self) -> tuple:
        state = {
            k: v.detach().cpu() if isinstance(v, torch.Tensor) else v
            for k, v in self.state_dict().items()
        }
        return (_rebuild, (self._arguments, state, self.training))

    # -- raw outputs for simulation engines (TorchScript; pl_mtt.interop.export) --------
    def raw_outputs(
        self,
        systems: list[System],
        outputs: dict[str, ModelOutput],
        selected_atoms: Labels | None = None,
    ) -> dict[str, TensorMap]:
        """The requested targets in raw units (metatomic's signature, no gradients: the
        engine differentiates the energy through the neighbour lists it supplies)."""
        requests: dict[str, ModelOutput] = {}
        for name, request in outputs.items():
            if name in self._outputs:
                requests[name] = request
        if len(requests) == 0:
            return {}
        return self.module(systems, requests, selected_atoms)

    # -- forward ----------------------------------------------------------------------
    @torch.jit.unused
    def forward(self, systems: list[System]) -> dict[str, TensorMap]:
        """Raw predictions of every target (and gradients of energies) for a batch."""
        if len(systems) == 0:
            raise ValueError("the model needs at least one system")
        dtype = next(self.module.parameters()).dtype
        if systems[0].positions.dtype != dtype:
            raise ValueError(
                f"the model is {dtype} but the systems are {systems[0].positions.dtype}; "
                f"use the same dtype for data and model"
            )
        forces = any(t.forces for t in self.targets)
        stress = any(t.stress for t in self.targets)
        needs_grad = forces or stress
        if needs_grad and torch.is_inference_mode_enabled():
            raise ValueError(
                "forces/stress are autograd gradients, which inference mode forbids: use "
                "Trainer(inference_mode=False) (or torch.no_grad instead of inference_mode)"
            )
        create_graph = self.training
        outer_grad = torch.is_grad_enabled()
        with torch.set_grad_enabled(outer_grad or needs_grad):
            batch = _StrainedBatch(systems, self._neighbor_lists, forces, stress)
            raw = self.module(batch.systems, self._outputs)
            outputs = {}
            for target in self.targets:
                values = raw[target.name].block().values
                gradients = {}
                inputs = [(n, x) for n, x, on in batch.inputs(target) if on]
                if inputs:
                    grads = torch.autograd.grad(
                        values.sum(),
                        [x for _, x in inputs],
                        create_graph=create_graph,
                        retain_graph=create_graph or outer_grad or target is not self.targets[-1],
                    )
                    gradients = {n: g for (n, _), g in zip(inputs, grads, strict=True)}
                if not outer_grad:
                    values = values.detach()
                    gradients = {n: g.detach() for n, g in gradients.items()}
                outputs[target.name] = self._tensor_map(target, values, gradients, batch)
        return outputs

    def _tensor_map(
        self,
        target: _Target,
        values: torch.Tensor,
        gradients: dict[str, torch.Tensor],
        batch: _StrainedBatch,
    ) -> TensorMap:
        device = values.device
        name = "energy" if target.energy_like else "properties"
        return atomistic_tensor_map(
            values,
            range_labels(name, values.shape[-1], device),
            per_atom=target.per_atom,
            atom_system=batch.atom_system,
            atom_index=batch.atom_index,
            positions_gradient=None
            if "positions" not in gradients
            else gradients["positions"][..., None],
            strain_gradient=None if "strain" not in gradients else gradients["strain"][..., None],
        )

    def extra_repr(self) -> str:
        return f"architecture={self.architecture!r}, outputs={self.output_names}"


def _rebuild(
    arguments: dict[str, Any], state: dict[str, torch.Tensor], training: bool
) -> MetatrainModel:
    model = MetatrainModel(**arguments)
    model.load_state_dict(state)
    return model.train(training)


class _StrainedBatch:
    """The batch as the architecture sees it: systems whose positions and cells go
    through a zero strain ``ε`` (``x' = x (1 + ε)``, ``h' = h (1 + ε)``) and whose
    neighbour-list vectors are rebuilt from them, so that ``dE/dx`` and ``dE/dε`` are
    autograd gradients."""

    def __init__(
        self,
        systems: list[System],
        requests: list[NeighborListOptions],
        forces: bool,
        stress: bool,
    ) -> None:
        dtype = systems[0].positions.dtype
        self.atom_system, self.atom_index = system_of_atoms(systems)
        positions = torch.cat([system.positions.detach() for system in systems])
        cells = torch.stack([system.cell.detach() for system in systems])
        self.positions = positions.requires_grad_(forces)
        self.strain = torch.zeros(
            (len(systems), 3, 3), dtype=dtype, device=positions.device, requires_grad=stress
        )
        displaced, strained_cells = self.positions, cells
        if stress:
            displaced, strained_cells = strained(
                self.positions, cells, self.strain, self.atom_system
            )
        per_system = displaced.split([len(system) for system in systems])
        self.systems = [
            System(types=s.types, positions=p, cell=c, pbc=s.pbc)
            for s, p, c in zip(systems, per_system, strained_cells, strict=True)
        ]
        attach_neighbor_lists(systems, requests)  # only those missing (the data layer's)
        for options in requests:
            blocks = _rebuilt_vectors(systems, options, displaced, strained_cells)
            for system, block in zip(self.systems, blocks, strict=True):
                system.add_neighbor_list(options, block)

    def inputs(self, target: _Target) -> list[tuple[str, torch.Tensor, bool]]:
        return [
            ("positions", self.positions, target.forces),
            ("strain", self.strain, target.stress),
        ]


def _rebuilt_vectors(
    systems: list[System],
    options: NeighborListOptions,
    positions: torch.Tensor,
    cells: torch.Tensor,
) -> list[TensorBlock]:
    """Pair vectors ``x_j - x_i + S h`` of the list ``options`` of every system, from
    (strained) positions and cells, in one batched computation (the pairs gathered by
    one TorchScript call); one block per system with the list's metadata."""
    centers, neighbors, shifts, pair_system, _ = compiled_neighbor_pairs(systems, options)
    vectors = pair_vectors(positions, cells, centers, neighbors, shifts, pair_system)
    lists = [system.get_neighbor_list(options) for system in systems]
    sizes = [len(block.samples) for block in lists]
    return [
        TensorBlock(values[:, :, None], block.samples, block.components, block.properties)
        for values, block in zip(vectors.split(sizes), lists, strict=True)
    ]
