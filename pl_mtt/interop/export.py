"""Export a trained model as a metatomic ``AtomisticModel`` (TorchScript).

.. code-block:: bash

    python -m pl_mtt.export outputs/<run>/checkpoints/last.ckpt -o model.pt

.. code-block:: python

    from pl_mtt.interop import export_model
    export_model(task_or_checkpoint, "model.pt")      # any engine: ASE, LAMMPS, i-PI...

The exported model predicts in physical units: the composition baseline and the full
scales are inside (:class:`pl_mtt.interop.physical_outputs.PhysicalOutputs`), so its
energies, forces and stress equal those of ``AtomisticTask.forward``. The engine supplies
the neighbour lists the model requests and differentiates the energy for forces and
stress.

What a model needs to be exported: it is TorchScript-able, declares the neighbour lists
it reads with ``requested_neighbor_lists()`` (on itself or a submodule), and has a method
``raw_outputs(systems, outputs, selected_atoms) -> Dict[str, TensorMap]`` (metatomic's
signature) returning its raw outputs (those of training: scaled, baseline-free, total
units, one block without components) under the names it has in training (targets, and
``ensemble_output_name(target)`` for ensembles); ``forward`` may stay Python
(``@torch.jit.unused``). Its outputs are ``output_names`` when it has that attribute,
else the training targets.

Exported outputs (metatomic names):

- a target under its name when it is ``energy`` or has a domain (``mtt::dos``), else
  under ``mtt::<name>`` (``charges`` -> ``mtt::charges``); with ``sample_kind="atom"`` when the
  model gives per-atom contributions (per-atom energies), except for targets not divided
  by atoms (intensive);
- an ensemble of ``energy``: ``energy_ensemble`` (properties ``energy = 0..M-1``) and
  ``energy_uncertainty`` (standard deviation of the members); of another target ``t``:
  ``mtt::aux::<t>_ensemble`` and ``mtt::aux::<t>_uncertainty``.

Capabilities: the atomic types of the fitted scales/baseline, the interaction range (the
largest requested neighbour-list cutoff, or the model's ``interaction_range``), Å and the
targets' units (``eV`` for energies), the model's dtype, devices ``cpu`` and ``cuda``.
Metadata (name, description, authors, references) come from the ``export`` section of
the app's configuration, or the arguments.
"""

from __future__ import annotations

import copy
import inspect
import warnings
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import torch
from metatensor.torch import TensorMap
from metatomic.torch import (
    AtomisticModel,
    ModelCapabilities,
    ModelMetadata,
    ModelOutput,
    System,
)

from pl_mtt.config import target_unit, to_plain
from pl_mtt.interop.physical_outputs import N_ATOMIC_NUMBERS, PhysicalOutputs, RawOutput
from pl_mtt.tensormaps.builders import ensemble_output_name
from pl_mtt.tensormaps.neighbors import attach_neighbor_lists, requested_neighbor_lists

__all__ = [
    "DEFAULT_FILE",
    "atomistic_model",
    "export_model",
    "export_run_model",
    "exported_output_names",
    "load_task",
    "main",
    "model_metadata",
    "run_config_metadata",
]

DEFAULT_FILE = "model.pt"
LENGTH_UNIT = "angstrom"
SUPPORTED_DEVICES = ["cpu", "cuda"]
_DTYPES = {torch.float64: "float64", torch.float32: "float32"}
_REFERENCE_KINDS = ("implementation", "architecture", "model")


# -- sources: a task (model + scaler + composition + targets) or a checkpoint -----------
def load_task(checkpoint: str | Path) -> Any:
    """The ``AtomisticTask`` of a Lightning checkpoint (on the CPU), with its scales."""
    from pl_mtt.training.task import AtomisticTask  # interop sits on top of training

    path = Path(checkpoint)
    if not path.is_file():
        raise ValueError(f"checkpoint '{path}' does not exist")
    try:
        options: dict[str, Any] = {"map_location": "cpu"}
        if "weights_only" in inspect.signature(AtomisticTask.load_from_checkpoint).parameters:
            options["weights_only"] = False  # pl_mtt's own hyperparameters (as Lightning's default)
        return AtomisticTask.load_from_checkpoint(path, **options)
    except Exception as error:  # Lightning and torch raise many kinds for a bad file
        raise ValueError(
            f"could not load '{path}' as a checkpoint of pl_mtt's AtomisticTask: "
            f"{type(error).__name__}: {error}"
        ) from error


def _task(source: Any) -> Any:
    if isinstance(source, (str, Path)):
        return load_task(source)
    if not isinstance(getattr(source, "model", None), torch.nn.Module):
        raise ValueError(
            f"export: expected an AtomisticTask (or any module with the trained `model` and "
            f"the `scaler`/`composition` of ScalerCallback) or a checkpoint path, got "
            f"{type(source).__name__}"
        )
    return source


def _target_options(task: Any, targets: Mapping[str, Any] | None) -> dict[str, dict]:
    """Options of the training targets: given, the task's ``target_options``, or the
    names the fitted scales know (units: ``eV`` for energies, else none)."""
    if targets is None:
        targets = getattr(task, "target_options", None)
    if targets is None:
        fitted = getattr(task, "scaler", None) or getattr(task, "composition", None)
        if fitted is None:
            raise ValueError(
                "export: the training targets are unknown (no target_options, no fitted "
                "scales); pass targets={name: options}"
            )
        targets = {name: {"per_atom": info.per_atom} for name, info in fitted.targets.items()}
    result = {}
    for name, options in (to_plain(targets) or {}).items():
        options = dict(options or {})
        unit = target_unit(name, options)  # eV for an energy without a unit
        if unit:
            options["unit"] = unit
        result[name] = options
    return result


# -- names and metadata ------------------------------------------------------------------
def _valid_output_name(name: str) -> bool:
    try:
        ModelCapabilities(outputs={name: ModelOutput()})
    except Exception:  # metatomic raises RuntimeError/ValueError for a bad name
        return False
    return True


def _target_output_name(target: str) -> str:
    """``energy`` and names with a domain (``mtt::dos``) stay; any other name gets the
    ``mtt::`` domain (metatomic's standard names have fixed meanings and layouts, which a
    pl_mtt target of the same name need not follow)."""
    name = target if (target == "energy" or "::" in target) else "mtt::" + target
    if not _valid_output_name(name):
        raise ValueError(
            f"export: target '{target}' has no valid metatomic output name ('{name}' is "
            f"rejected); rename the target ('<domain>::<name>')"
        )
    return name


def exported_output_names(target: str) -> dict[str, str]:
    """``{"value", "ensemble", "uncertainty"}`` -> the exported names of ``target``.

    >>> exported_output_names("energy")["uncertainty"]
    'energy_uncertainty'
    >>> exported_output_names("mtt::dos")["ensemble"]
    'mtt::aux::dos_ensemble'
    """
    if target == "energy":
        return {
            "value": "energy",
            "ensemble": "energy_ensemble",
            "uncertainty": "energy_uncertainty",
        }
    value = _target_output_name(target)
    base = value.removeprefix("mtt::")
    return {
        "value": value,
        "ensemble": f"mtt::aux::{base}_ensemble",
        "uncertainty": f"mtt::aux::{base}_uncertainty",
    }


def model_metadata(
    config: Mapping[str, Any] | None = None,
    *,
    model: torch.nn.Module | None = None,
    targets: Sequence[str] = (),
) -> ModelMetadata:
    """metatomic metadata from an ``export`` config section.

    .. code-block:: yaml

        export:
          name: Cu/Au EMT potential          # default: "pl_mtt <model class> (<targets>)"
          description: RadialMLP trained ... # default: what was trained
          authors: [A. Author]
          references: {model: ["https://doi.org/..."]}   # implementation, architecture, model
    """
    config = dict(to_plain(config) or {})
    kind = type(model).__name__ if model is not None else "model"
    name = config.get("name") or f"pl_mtt {kind} ({', '.join(targets)})"
    description = config.get("description") or (
        f"{kind} trained with pl_mtt (PyTorch Lightning, metatrain's losses and target "
        f"scaling) on {', '.join(targets) or 'its targets'}; composition baseline and "
        f"target scales included"
    )
    authors = [str(a) for a in (config.get("authors") or [])]
    references = dict(config.get("references") or {})
    unknown = sorted(set(references) - set(_REFERENCE_KINDS))
    if unknown:
        raise ValueError(
            f"export.references: unknown kind(s) {unknown}; expected {list(_REFERENCE_KINDS)}"
        )
    references = {
        kind: [str(r) for r in ([value] if isinstance(value, str) else value)]
        for kind, value in references.items()
        if value
    }
    return ModelMetadata(
        name=str(name), description=str(description), authors=authors, references=references
    )


# -- the tables of scales and baseline ------------------------------------------------------
def _probe_systems(types: Sequence[int], dtype: torch.dtype, model: torch.nn.Module) -> list:
    """One isolated atom of each type: every table row comes from the pipeline's own
    scale and baseline functions applied to these systems."""
    systems = [
        System(
            types=torch.tensor([int(z)], dtype=torch.int32),
            positions=torch.zeros((1, 3), dtype=dtype),
            cell=torch.zeros((3, 3), dtype=dtype),
            pbc=torch.zeros(3, dtype=torch.bool),
        )
        for z in types
    ]
    attach_neighbor_lists(systems, requested_neighbor_lists(model))
    return systems


def _raw_block(model: torch.nn.Module, systems: list, name: str, kind: str) -> TensorMap | None:
    try:
        with torch.no_grad():
            outputs = model.raw_outputs(systems, {name: ModelOutput(sample_kind=kind)}, None)
    except Exception as error:
        if kind == "atom":  # only asking whether per-atom contributions exist
            return None
        raise ValueError(
            f"export: the model's raw_outputs failed for output '{name}': "
            f"{type(error).__name__}: {error}"
        ) from error
    return outputs.get(name)


def _describe(tensor: TensorMap | None, name: str) -> int:
    """Width of a raw output the export can describe (one block, no components)."""
    if tensor is None:
        raise ValueError(f"export: the model's raw_outputs did not return '{name}'")
    if len(tensor) != 1 or len(tensor.block_by_id(0).components) != 0:
        raise ValueError(
            f"export: output '{name}' has {len(tensor)} block(s) and components "
            f"{[c.names for c in tensor.block_by_id(0).components]}; the export describes "
            f"outputs of one block without components (scalars per structure or per atom)"
        )
    names = tensor.block_by_id(0).samples.names
    if names not in (["system"], ["system", "atom"]):
        raise ValueError(
            f"export: output '{name}' has samples {names}; the export describes outputs "
            f"per structure (['system']) or per atom (['system', 'atom'])"
        )
    return int(tensor.block_by_id(0).values.shape[1])


def _table(rows: torch.Tensor | None, types: Sequence[int], width: int, fill: float):
    """``(119, width)`` table with ``rows`` (one per entry of ``types``, or one shared
    row) at their atomic numbers, ``fill`` elsewhere."""
    table = torch.full((N_ATOMIC_NUMBERS, width), fill, dtype=torch.float64)
    if rows is None:
        return table
    rows = rows.detach().to(torch.float64).cpu()
    rows = rows.expand(len(types) if rows.shape[0] == 1 else rows.shape[0], width)
    table[torch.tensor(list(types), dtype=torch.long)] = rows
    return table


def _raw_output(
    name: str,
    model: torch.nn.Module,
    probe: list,
    types: Sequence[int],
    scaler: Any,
    composition: Any,
    per_atom_target: bool,
    intensive: bool,
) -> tuple[RawOutput, bool]:
    """Tables of one raw output, and whether the model gives it per atom."""
    kind = "atom" if per_atom_target else "system"
    tensor = _raw_block(model, probe, name, kind)
    width = _describe(tensor, name)
    scale_rows = baseline_rows = None
    if scaler is not None:
        tables = scaler.factor_tables(probe, name, tensor)
        scale_rows = None if tables is None else tables[0]
    if composition is not None:
        shifts = composition.baselines(probe, name, tensor)
        baseline_rows = None if shifts is None else shifts[0]
    if scale_rows is not None and scale_rows.shape[-1] == 1:
        scale_rows = scale_rows.expand(scale_rows.shape[0], width)  # one pooled scale (DOS)
    if per_atom_target:
        atom_scales = _table(scale_rows, types, width, 1.0)
        structure_scale = torch.ones(width, dtype=torch.float64)
        per_atom = True
    else:
        structure_scale = (
            torch.ones(width, dtype=torch.float64)
            if scale_rows is None
            else scale_rows[0].detach().to(torch.float64).cpu()
        )
        atom_scales = structure_scale.expand(N_ATOMIC_NUMBERS, width).clone()
        per_atom = not intensive and _gives_per_atom(model, probe, name)
    raw = RawOutput(
        name=name,
        width=width,
        per_atom_target=per_atom_target,
        intensive=intensive,
        atom_scales=atom_scales,
        structure_scale=structure_scale,
        baselines=_table(baseline_rows, types, width, 0.0),
    )
    return raw, per_atom


def _gives_per_atom(model: torch.nn.Module, probe: list, name: str) -> bool:
    tensor = _raw_block(model, probe, name, "atom")
    return tensor is not None and tensor.block_by_id(0).samples.names == ["system", "atom"]


# -- the exported model ------------------------------------------------------------------
def _check_scales(task: Any, unscaled: bool) -> tuple[Any, Any]:
    scaler = getattr(task, "scaler", None)
    composition = getattr(task, "composition", None)
    if unscaled:
        return None, None
    if scaler is None and composition is None:
        raise ValueError(
            "export: this model has no fitted scales or composition baseline (trained "
            "without ScalerCallback, or with scaler.scale_targets=false?); its raw outputs "
            "are not in physical units. Export the raw outputs as they are with "
            "unscaled=True (--unscaled) if the model was trained without scaling"
        )
    for what, module in (("scales", scaler), ("composition baseline", composition)):
        if module is not None and not bool(module.fitted):
            raise ValueError(
                f"export: the {what} of this model are not fitted (the checkpoint was saved "
                f"before ScalerCallback's fit, e.g. with max_steps=0); train at least one "
                f"step with ScalerCallback before exporting"
            )
    return scaler, composition


def _model_dtype(model: torch.nn.Module) -> torch.dtype:
    for tensor in [*model.parameters(), *model.buffers()]:
        if tensor.is_floating_point():
            return tensor.dtype
    raise ValueError(
        "export: the model has no floating-point parameter or buffer; its dtype is unknown"
    )


def _private_copy(model: torch.nn.Module) -> torch.nn.Module:
    """A copy that AtomisticModel may change (it freezes parameters and sets the
    neighbour lists' length unit); the model itself if it cannot be copied."""
    try:
        return copy.deepcopy(model)
    except Exception:  # e.g. modules holding TorchScript functions
        return model


def atomistic_model(
    source: Any,
    *,
    metadata: Mapping[str, Any] | ModelMetadata | None = None,
    unscaled: bool = False,
    atomic_types: Sequence[int] | None = None,
    targets: Mapping[str, Any] | None = None,
) -> AtomisticModel:
    """The metatomic ``AtomisticModel`` of a trained task (in memory, not scripted).

    Args:
        source: an ``AtomisticTask`` (model, fitted ``scaler``/``composition``,
            ``target_options``), any LightningModule trained the same way (``model``,
            ``scaler``, ``composition``), or the path of an ``AtomisticTask`` checkpoint.
        metadata: an ``export`` config section (name, description, authors,
            references) or a ``ModelMetadata``.
        unscaled: export the raw outputs as physical (a model trained without scales).
        atomic_types: the supported atomic types (default: those of the fitted scales
            and baseline; required with ``unscaled``).
        targets: the training targets' options (default: the task's
            ``target_options``, else the targets of the fitted scales).
    """
    task = _task(source)
    scaler, composition = _check_scales(task, unscaled)
    model = _private_copy(task.model).eval()
    if not callable(getattr(model, "raw_outputs", None)):
        raise ValueError(
            f"export: {type(model).__name__} has no raw_outputs(systems, outputs, "
            f"selected_atoms) method; an exported model needs this TorchScript path (see "
            f"pl_mtt.interop.export)"
        )
    targets = _target_options(task, targets)
    types = _atomic_types(atomic_types, scaler, composition)
    dtype = _model_dtype(model)
    probe = _probe_systems(types, dtype, model)
    per_structure = set(getattr(scaler or composition, "per_structure_targets", ()) or ())
    names = list(getattr(model, "output_names", targets))
    ensembles = {ensemble_output_name(t): t for t in targets}

    raw: list[RawOutput] = []
    exported: dict[str, tuple[str, str, int]] = {}
    outputs: dict[str, ModelOutput] = {}
    standard: list[str] = []
    widths: dict[str, int] = {}
    for name in names:
        target = name if name in targets else ensembles.get(name)
        if target is None:
            raise ValueError(
                f"export: output '{name}' of the model is neither a training target "
                f"{sorted(targets)} nor a target's ensemble output; the export cannot "
                f"describe it"
            )
        options = targets[target]
        info = getattr(scaler or composition, "targets", {}).get(target)
        per_atom_target = (
            info.per_atom
            if info is not None
            else bool(options.get("per_atom")) or options.get("sample_kind") == "atom"
        )
        item, per_atom = _raw_output(
            name,
            model,
            probe,
            types,
            scaler,
            composition,
            per_atom_target,
            intensive=target in per_structure,
        )
        raw.append(item)
        widths[name] = item.width
        data_unit = str(options.get("unit") or "")
        unit = _metatomic_unit(data_unit, target)
        about = f"{target} (pl_mtt target{f', in {data_unit}' if data_unit else ''})"
        kind = "atom" if per_atom else "system"
        exported_names = exported_output_names(target)
        if name == target:
            exported[exported_names["value"]] = (name, "value", 1)
            outputs[exported_names["value"]] = ModelOutput(
                unit=unit, sample_kind=kind, description=about
            )
            continue
        target_width = widths.get(target) or _target_width(scaler, target)
        members = item.width // target_width if target_width else 0
        if members < 2 or members * target_width != item.width:
            raise ValueError(
                f"export: ensemble output '{name}' has {item.width} properties, not a "
                f"multiple (>= 2) of the {target_width} of target '{target}'"
            )
        for role in ("ensemble", "uncertainty"):
            exported[exported_names[role]] = (name, role, members)
            outputs[exported_names[role]] = ModelOutput(
                unit=unit,
                sample_kind=kind,
                description=f"{role} of {about}, {members} members",
            )
        if target == "energy":
            standard.append(exported_names["ensemble"])
    capabilities = ModelCapabilities(
        outputs=outputs,
        atomic_types=list(types),
        interaction_range=_interaction_range(model),
        length_unit=LENGTH_UNIT,
        supported_devices=SUPPORTED_DEVICES,
        dtype=_DTYPES[dtype],
    )
    if not isinstance(metadata, torch.ScriptObject):
        metadata = model_metadata(metadata, model=task.model, targets=list(targets))
    module = PhysicalOutputs(model, raw, exported, standard).to(dtype).eval()
    flags = {id(p): p.requires_grad for p in task.model.parameters()}
    atomistic = AtomisticModel(module, metadata, capabilities)
    if model is task.model:  # not copied: AtomisticModel froze the task's own parameters
        for parameter in task.model.parameters():
            parameter.requires_grad_(flags[id(parameter)])
    return atomistic


def _metatomic_unit(unit: str, target: str) -> str:
    """``unit`` when metatomic knows it, else ``""`` (no unit conversion) with a warning:
    the values are exported as they are, in the data's unit."""
    try:
        ModelCapabilities(outputs={"mtt::unit_check": ModelOutput(unit=unit)})
    except Exception as error:  # metatomic raises RuntimeError/ValueError
        warnings.warn(
            f"export: unit {unit!r} of target '{target}' is not a metatomic unit ({error}); "
            f"its outputs are exported without a unit (values in {unit})",
            stacklevel=3,
        )
        return ""
    return unit


def _target_width(scaler: Any, target: str) -> int:
    if scaler is None or target not in getattr(scaler, "targets", {}):
        return 0
    return scaler.targets[target].blocks[0].n_properties


def _atomic_types(atomic_types: Sequence[int] | None, scaler: Any, composition: Any) -> list[int]:
    if atomic_types is not None:
        types = sorted({int(t) for t in atomic_types})
    else:
        fitted = scaler if scaler is not None else composition
        if fitted is None:
            raise ValueError(
                "export: give atomic_types (--atomic-types) for a model without fitted scales"
            )
        types = sorted(int(t) for t in fitted.atomic_types)
    if not types or types[0] < 1 or types[-1] >= N_ATOMIC_NUMBERS:
        raise ValueError(f"export: atomic types must be atomic numbers 1..118, got {types}")
    return types


def _interaction_range(model: torch.nn.Module) -> float:
    declared = getattr(model, "interaction_range", None)
    if declared is not None:
        return float(declared)
    cutoffs = [options.cutoff for options in requested_neighbor_lists(model)]
    return float(max(cutoffs, default=0.0))


def export_model(
    source: Any,
    path: str | Path = DEFAULT_FILE,
    *,
    metadata: Mapping[str, Any] | ModelMetadata | None = None,
    extensions_directory: str | Path | None = None,
    unscaled: bool = False,
    atomic_types: Sequence[int] | None = None,
    targets: Mapping[str, Any] | None = None,
) -> Path:
    """Write the metatomic model of ``source`` (an ``AtomisticTask`` or its checkpoint)
    to ``path``; the TorchScript extensions loaded in this process (e.g. sphericart's for
    SOAP-BPNN; metatomic records them all) are collected into ``extensions_directory``
    (default: ``extensions/`` next to ``path``, replaced if it exists), from which
    :func:`pl_mtt.calculator` and ``load_atomistic_model`` load them. Returns ``path``."""
    path = Path(path)
    if path.is_dir():
        raise ValueError(f"export: '{path}' is a directory; give the path of the model file")
    if not path.parent.is_dir():
        raise ValueError(f"export: cannot write '{path}': directory '{path.parent}' does not exist")
    atomistic = atomistic_model(
        source, metadata=metadata, unscaled=unscaled, atomic_types=atomic_types, targets=targets
    )
    extensions = Path(extensions_directory) if extensions_directory else path.parent / "extensions"
    # metatomic records every TorchScript extension loaded in this process, and replaces
    # the directory it collects them into: only collect when there is one
    collect = str(extensions) if _loaded_extensions() else None
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", DeprecationWarning)  # torch.jit.script
            atomistic.save(str(path), collect_extensions=collect)
    except OSError as error:
        raise ValueError(f"export: cannot write '{path}': {error}") from error
    except RuntimeError as error:
        cause = error.__cause__ or error
        raise ValueError(
            f"export: the model could not be compiled with TorchScript (every method "
            f"raw_outputs calls must be TorchScript code): {cause}"
        ) from error
    return path


def _loaded_extensions() -> list[str]:
    """TorchScript extension libraries loaded in this process, beyond metatensor's and
    metatomic's own (which every engine provides)."""
    core = ("metatensor_torch", "metatomic_torch")
    return [
        library
        for library in torch.ops.loaded_libraries
        if not any(name in Path(library).name for name in core)
    ]


def export_run_model(
    task: Any, run_dir: str | Path, config: Mapping[str, Any] | None, *, unscaled: bool = False
) -> Path | None:
    """The app's export at the end of a run: ``run_dir / config["path"]`` (nothing when
    ``path`` is null), metadata from the same ``export`` section. A model that cannot be
    exported does not fail the finished run: the reason is printed as a warning.

    .. code-block:: yaml

        export:
          path: model-metatomic.pt    # null: not written
          name: null                  # metadata, see model_metadata
          description: null
          authors: []
          references: {}
    """
    config = dict(to_plain(config) or {})
    relative = config.pop("path", None)
    if not relative:
        return None
    try:
        return export_model(task, Path(run_dir) / relative, metadata=config, unscaled=unscaled)
    except ValueError as error:
        warnings.warn(f"the metatomic model was not written: {error}", stacklevel=2)
        return None


# -- the command line ----------------------------------------------------------------------
def run_config_metadata(checkpoint: str | Path) -> dict[str, Any]:
    """The ``export`` section of the Hydra config of the run that wrote ``checkpoint``
    (``<run>/.hydra/config.yaml`` for ``<run>/checkpoints/x.ckpt``), or ``{}``."""
    from omegaconf import OmegaConf

    config = Path(checkpoint).resolve().parent.parent / ".hydra" / "config.yaml"
    if not config.is_file():
        return {}
    section = OmegaConf.load(config).get("export")
    return dict(OmegaConf.to_container(section, resolve=True)) if section else {}


def main(argv: Sequence[str] | None = None) -> Path:
    """``python -m pl_mtt.export CHECKPOINT [-o model.pt]``."""
    import argparse

    parser = argparse.ArgumentParser(
        prog="python -m pl_mtt.export",
        description="Export a pl_mtt checkpoint as a metatomic model (TorchScript) with its "
        "scales and composition baseline, for ASE, LAMMPS, i-PI, torch-sim and mtt eval.",
    )
    parser.add_argument("checkpoint", help="Lightning checkpoint of a pl_mtt training run")
    parser.add_argument("-o", "--output", default=DEFAULT_FILE, help="exported file (model.pt)")
    parser.add_argument(
        "-e", "--extensions", default=None, help="directory for TorchScript extensions"
    )
    parser.add_argument("--name", default=None, help="model name (metadata)")
    parser.add_argument("--description", default=None, help="model description (metadata)")
    parser.add_argument("--author", action="append", default=None, help="an author (repeat)")
    parser.add_argument(
        "--unscaled", action="store_true", help="a model trained without scales: raw outputs"
    )
    parser.add_argument(
        "--atomic-types", type=int, nargs="+", default=None, help="supported atomic numbers"
    )
    args = parser.parse_args(argv)
    metadata = run_config_metadata(args.checkpoint)
    for key, value in (("name", args.name), ("description", args.description)):
        if value is not None:
            metadata[key] = value
    if args.author is not None:
        metadata["authors"] = args.author
    path = export_model(
        args.checkpoint,
        args.output,
        metadata=metadata,
        extensions_directory=args.extensions,
        unscaled=args.unscaled,
        atomic_types=args.atomic_types,
    )
    print(f"exported {args.checkpoint} to {path}")
    return path
