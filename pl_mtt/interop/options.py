"""A metatrain options file as pl_mtt's Hydra configuration.

.. code-block:: bash

    python -m pl_mtt.train options=options.yaml                      # as `mtt train options.yaml`
    python -m pl_mtt.train options=options.yaml trainer.max_epochs=3 # command line wins
    python -m pl_mtt.train options=options.yaml loss.energy.forces=mae dry_run=true

:func:`translate_options` checks the file as metatrain would (unknown keys and wrong
types are ``ValueError`` naming the key path, with a suggestion) and returns the config
that the app composes between its defaults and the command line (precedence: command
line > options file > pl_mtt's defaults), with metatrain's defaults for what the file
leaves out (e.g. the architecture's ``num_epochs`` and ``batch_size``), and the list of
the file's keys that pl_mtt does not act on, with the reason.

Where each key goes:

=======================================  =============================================
options file                             pl_mtt
=======================================  =============================================
``architecture.name``, ``.model``        ``model=<name>`` (``model.hypers``)
``architecture.atomic_types``            ``model.atomic_types``
``training_set`` (systems, targets, ...)  ``data.path``, ``data.targets``, ``data.extra_data``,
                                         ``data.indices``
``validation_set``, ``test_set``         ``data.val_fraction``/``data.val_set``, ``data.test_*``
``seed``                                 ``seed``, ``data.split_seed``
``base_precision``                       ``data.dtype`` (and the model's), ``trainer.precision``
``device``                               ``trainer.accelerator``, ``.devices``, ``.strategy``
``training.batch_size``                  ``data.batch_size`` (``data.drop_last: true``)
``training.num_epochs``                  ``trainer.max_epochs``
``training.learning_rate``,              ``optimizer`` (metatrain's trainer: Adam, AdamW
``warmup_fraction``, ``weight_decay``,   with weight decay, warmup + cosine per step,
``grad_clip_norm``                       gradient-norm clipping)
``training.loss``                        ``loss`` (every term spelt out)
``training.scale_targets``,              ``scaler.fixed_scales`` (1.0 when off),
``fixed_scaling_weights``,               ``scaler.fixed_baseline``,
``atomic_baseline``,                     ``scaler.per_structure_targets``
``per_structure_targets``
``training.num_workers``                 ``data.num_workers``
``training.max_atoms_per_batch``,        ``data.max_atoms_per_batch``,
``min_atoms_per_batch``                  ``data.min_atoms_per_batch``
=======================================  =============================================
"""

from __future__ import annotations

import copy
from collections.abc import Collection, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from pl_mtt.config import expand_loss_config, is_energy_like, to_plain
from pl_mtt.interop.options_schema import check_base_options
from pl_mtt.models.metatrain import (
    architecture_defaults,
    check_architecture_hypers,
    import_architecture,
    merge_hypers,
)

__all__ = [
    "BASE_NOT_ACTED_ON",
    "TRAINING_NOT_ACTED_ON",
    "OptionsTranslation",
    "format_not_acted_on",
    "read_options",
    "translate_options",
]

TRAINING_NOT_ACTED_ON = {
    "log_interval": "pl_mtt logs every epoch (metrics.csv)",
    "checkpoint_interval": "pl_mtt keeps the last checkpoint and the best one (val/loss)",
    "best_model_metric": "pl_mtt's best checkpoint is the one with the lowest val/loss",
    "log_mae": "pl_mtt logs the MAE and the RMSE of every target and gradient",
    "log_separate_blocks": "pl_mtt logs one metric per target and gradient",
    "distributed": "distributed runs are Lightning's: trainer.devices, trainer.strategy",
    "distributed_port": "distributed runs are Lightning's: trainer.devices, trainer.strategy",
    "finetune": "pl_mtt trains from scratch (fine-tuning is not supported)",
}
"""Training hypers of metatrain's trainers that pl_mtt does not act on, and why."""

BASE_NOT_ACTED_ON = {
    "print_stats": "pl_mtt prints no dataset statistics",
    "final_eval": "pl_mtt always evaluates the test set (or the validation set) at the end",
    "wandb": "use a Lightning logger instead",
}
"""Top-level keys that pl_mtt does not act on, and why."""

_PRECISIONS = {32: ("float32", "32-true"), 64: ("float64", "64-true")}
_DEVICES = {
    "cpu": {"accelerator": "cpu", "devices": 1},
    "cuda": {"accelerator": "gpu", "devices": 1},
    "gpu": {"accelerator": "gpu", "devices": 1},
    "mps": {"accelerator": "mps", "devices": 1},
    "multi-gpu": {"accelerator": "gpu", "devices": -1, "strategy": "ddp"},
}
_GRADIENTS = ("forces", "stress", "virial")


@dataclass
class OptionsTranslation:
    """A translated options file.

    Attributes:
        path: the options file.
        architecture: ``architecture.name``.
        config: the Hydra config (package ``_global_``, with its ``defaults`` list).
        not_acted_on: ``(key path, reason)`` of the file's keys that pl_mtt ignores.
    """

    path: str
    architecture: str
    config: dict[str, Any]
    not_acted_on: list[tuple[str, str]] = field(default_factory=list)


def read_options(path: str | Path) -> dict[str, Any]:
    """The options file as plain Python (OmegaConf's YAML reader, as metatrain)."""
    from omegaconf import OmegaConf

    path = Path(path)
    if not path.is_file():
        raise ValueError(f"options file '{path}' does not exist")
    try:
        options = OmegaConf.to_container(OmegaConf.load(path), resolve=True)
    except Exception as error:
        raise ValueError(f"options file '{path}' is not valid YAML: {error}") from error
    return options


def translate_options(path: str | Path, model_configs: Collection[str] = ()) -> OptionsTranslation:
    """Check and translate the options file ``path`` (see the module docstring).

    ``model_configs``: names of the app's ``conf/model`` configs; an architecture with
    one uses it (``model=pet``), any other the generic ``model=metatrain``.
    """
    options = read_options(path)
    try:
        return _translate(str(path), options, model_configs)
    except (ValueError, ImportError) as error:
        raise type(error)(f"{path}: {error}") from None


def _translate(
    path: str, options: dict[str, Any], model_configs: Collection[str]
) -> OptionsTranslation:
    check_base_options(options)
    architecture = options["architecture"]
    name = architecture["name"]
    module = import_architecture(name)
    model_hypers = architecture.get("model", {})
    user_training = architecture.get("training", {})
    check_architecture_hypers(name, "model", model_hypers, "architecture.model")
    check_architecture_hypers(name, "training", user_training, "architecture.training")
    training = merge_hypers(architecture_defaults(name)["training"], user_training)
    not_acted_on = [(k, BASE_NOT_ACTED_ON[k]) for k in options if k in BASE_NOT_ACTED_ON]
    for key in user_training:
        if key == "min_atoms_per_batch" and training.get("max_atoms_per_batch") is None:
            reason = "it bounds batches packed by atom count, which needs max_atoms_per_batch"
            not_acted_on.append((f"architecture.training.{key}", reason))
        elif key in TRAINING_NOT_ACTED_ON:
            not_acted_on.append((f"architecture.training.{key}", TRAINING_NOT_ACTED_ON[key]))
        elif key not in _TRAINING_ACTED_ON:
            reason = f"a hyper of {name}'s own trainer that pl_mtt does not implement"
            not_acted_on.append((f"architecture.training.{key}", reason))
    if (training.get("finetune") or {}).get("read_from"):
        raise ValueError(
            "architecture.training.finetune.read_from: fine-tuning from a checkpoint is not "
            "supported by pl_mtt"
        )

    data, loss_targets = _data_config(options, training)
    seed = options.get("seed", 0)
    data["split_seed"] = seed
    precision = options.get("base_precision", _default_precision(module))
    if precision not in _PRECISIONS:
        raise ValueError(
            f"base_precision: {precision} is not supported by pl_mtt (32 or 64; metatrain's "
            f"architectures train in float32 or float64)"
        )
    data["dtype"], trainer_precision = _PRECISIONS[precision]
    trainer = {"max_epochs": training["num_epochs"], "precision": trainer_precision}
    trainer.update(_DEVICES[options.get("device", "cpu")])
    model: dict[str, Any] = {"hypers": copy.deepcopy(model_hypers)}
    if "atomic_types" in architecture:
        model["atomic_types"] = list(architecture["atomic_types"])
    length_unit = _length_unit(options["training_set"])
    if length_unit:
        model["length_unit"] = length_unit
    group = name if name in model_configs else "metatrain"
    if group == "metatrain":
        model["architecture"] = name
    config = {
        # the file's data, loss and model replace the app's default groups (no merge)
        "defaults": [
            {"override /data": "file"},
            {"override /model": group},
            {"override /loss": "mse"},
        ],
        "model": model,
        "data": data,
        "trainer": trainer,
        "optimizer": _optimizer(training),
        "scaler": _scaler(training, list(loss_targets)),
        "loss": _loss(training["loss"], loss_targets),
        "seed": seed,
    }
    return OptionsTranslation(path, name, config, not_acted_on)


_TRAINING_ACTED_ON = (
    "batch_size",
    "num_epochs",
    "learning_rate",
    "warmup_fraction",
    "weight_decay",
    "grad_clip_norm",
    "loss",
    "scale_targets",
    "fixed_scaling_weights",
    "atomic_baseline",
    "per_structure_targets",
    "num_workers",
    "max_atoms_per_batch",
    "min_atoms_per_batch",
)


def _default_precision(module: Any) -> int:
    import torch

    dtypes = getattr(module.__model__, "__supported_dtypes__", [torch.float32])
    return 64 if dtypes and dtypes[0] == torch.float64 else 32


def _optimizer(training: Mapping[str, Any]) -> dict[str, Any]:
    """metatrain's trainers: Adam (AdamW when ``weight_decay`` is set), warmup + cosine
    per step, gradient-norm clipping where the trainer has ``grad_clip_norm``."""
    weight_decay = training.get("weight_decay")
    return {
        "name": "adam" if weight_decay is None else "adamw",
        "lr": training["learning_rate"],
        "weight_decay": 0.0 if weight_decay is None else weight_decay,
        "schedule": "warmup_cosine" if "warmup_fraction" in training else "constant",
        "lr_decay": 1.0,
        "warmup_fraction": training.get("warmup_fraction", 0.0),
        "grad_clip_norm": training.get("grad_clip_norm"),
    }


def _scaler(training: Mapping[str, Any], targets: list[str]) -> dict[str, Any]:
    fixed = _per_target_numbers(training, "fixed_scaling_weights", "the scales", targets)
    if not training.get("scale_targets", True):
        fixed = {**dict.fromkeys(targets, 1.0), **fixed}
    per_structure = list(training.get("per_structure_targets") or [])
    baseline = _per_target_numbers(training, "atomic_baseline", "the baseline", targets)
    return {
        "scale_targets": True,
        "composition": True,
        "fixed_scales": fixed,
        "fixed_baseline": baseline or None,
        "per_structure_targets": per_structure,
    }


def _per_target_numbers(
    training: Mapping[str, Any], key: str, what: str, targets: list[str]
) -> dict[str, Any]:
    """metatrain's ``fixed_scaling_weights`` or ``atomic_baseline``: target -> a number
    for every type, or ``{atomic type: number}`` (``{}`` when not given)."""
    values = training.get(key) or {}
    if isinstance(values, str):
        raise ValueError(
            f"architecture.training.{key}: a checkpoint path is not supported; "
            f"give {what} as numbers (target -> number or {{atomic type: number}})"
        )
    unknown = sorted(set(values) - set(targets))
    if unknown:
        raise ValueError(
            f"architecture.training.{key}: {unknown} are not training targets ({targets})"
        )
    return dict(values)


# -- datasets ------------------------------------------------------------------------
def _single(value: Any, path: str) -> Any:
    """The one dataset of a list (several datasets are not supported)."""
    if isinstance(value, list):
        if len(value) != 1:
            raise ValueError(
                f"{path}: {len(value)} datasets; pl_mtt trains on one dataset (give one "
                f"mapping, or merge the files)"
            )
        return value[0]
    return value


def _systems(dataset: Mapping[str, Any], path: str) -> dict[str, Any]:
    systems = dataset["systems"]
    systems = {"read_from": systems} if isinstance(systems, str) else dict(systems)
    if "read_from" not in systems:
        raise ValueError(f"{path}.systems.read_from: missing (the structure file)")
    if systems.get("reader") not in (None, "ase"):
        raise ValueError(
            f"{path}.systems.reader: only files that ase reads are supported (reader: ase)"
        )
    return systems


def _length_unit(training_set: Any) -> str | None:
    dataset = _single(training_set, "training_set")
    if isinstance(dataset, str):
        return None
    systems = dataset["systems"]
    return None if isinstance(systems, str) else systems.get("length_unit")


def _check_file(file: str, path: str) -> None:
    """A structure file ase reads, a DiskDataset ``.zip`` or a MemmapDataset directory."""
    if not Path(file).exists():
        raise ValueError(f"{path}: file '{file}' does not exist")


def _target(target: Any, file: str, path: str) -> dict[str, Any]:
    """One target of a dataset mapping in pl_mtt's data options."""
    if isinstance(target, str):
        target = {"read_from": target}
    result: dict[str, Any] = {}
    for key in ("quantity", "key", "unit", "description", "num_subtargets"):
        if key in target:
            result[key] = target[key]
    if target.get("read_from", file) != file:
        result["read_from"] = target["read_from"]
    if target.get("reader") not in (None, "ase"):
        raise ValueError(f"{path}.reader: only files that ase reads are supported (reader: ase)")
    kind = target.get("sample_kind", "atom" if target.get("per_atom") else "system")
    if kind == "atom_pair":
        raise ValueError(f"{path}.sample_kind: atom_pair targets are not supported by pl_mtt")
    if "sample_kind" in target or "per_atom" in target:
        result["per_atom"] = kind == "atom"
    if target.get("type", "scalar") != "scalar":
        raise ValueError(
            f"{path}.type: only scalar targets are supported by pl_mtt, got {target['type']!r}"
        )
    for gradient in _GRADIENTS:
        if gradient not in target:
            continue
        value = target[gradient]
        if isinstance(value, str):  # metatrain: a file to read it from
            value = {"read_from": value}
        if isinstance(value, Mapping):
            if value.get("reader") not in (None, "ase"):
                raise ValueError(f"{path}.{gradient}.reader: only files that ase reads")
            value = {k: v for k, v in value.items() if k != "reader"}
        result[gradient] = value
    return result


def _loss_target(name: str, options: Mapping[str, Any]) -> dict[str, Any]:
    """The target as the loss grammar sees it before the data is read: an energy has
    forces and stress unless its options say otherwise (metatrain's default)."""
    result = {"quantity": options.get("quantity", ""), "per_atom": options.get("per_atom", False)}
    energy = is_energy_like(name, options) and not result["per_atom"]
    virial = bool(options.get("virial"))
    result["forces"] = bool(options.get("forces", energy))
    result["stress"] = bool(options.get("stress", energy and not virial))
    result["virial"] = virial
    return result


def _dataset(dataset: Any, path: str) -> dict[str, Any]:
    """A dataset (mapping or file) as ``{path, targets, extra_data, indices}``."""
    if isinstance(dataset, str):  # metatrain: the systems and an `energy` target
        _check_file(dataset, path)
        return {"path": dataset, "targets": {"energy": {}}, "extra_data": {}}
    systems = _systems(dataset, path)
    file = systems["read_from"]
    _check_file(file, f"{path}.systems.read_from")
    targets = {
        name: _target(target, file, f"{path}.targets.{name}")
        for name, target in dataset["targets"].items()
    }
    extra_data = {}
    for name, entry in (dataset.get("extra_data") or {}).items():
        entry = {"read_from": entry} if isinstance(entry, str) else dict(entry)
        entry.setdefault("read_from", file)
        kind = entry.pop("sample_kind", None)
        if kind is not None:
            entry["per_atom"] = kind == "atom"
        extra_data[name] = entry
    result = {"path": file, "targets": targets, "extra_data": extra_data}
    if "indices" in dataset:
        result["indices"] = dataset["indices"]
    return result


def _data_config(
    options: Mapping[str, Any], training: Mapping[str, Any]
) -> tuple[dict[str, Any], dict[str, dict[str, Any]]]:
    train = _dataset(_single(options["training_set"], "training_set"), "training_set")
    data: dict[str, Any] = {
        "dataset": None,
        "path": train["path"],
        "n_structures": None,
        "targets": train["targets"],
        "extra_data": train["extra_data"],
        "indices": train.get("indices"),
        "batch_size": training["batch_size"],
        "drop_last": True,  # metatrain's training loaders drop the incomplete batch
        "num_workers": training.get("num_workers") or 0,
    }
    max_atoms = training.get("max_atoms_per_batch")
    if max_atoms is not None:  # batches packed by atom count (pl_mtt's AtomBatchSampler)
        data["max_atoms_per_batch"] = max_atoms
        data["min_atoms_per_batch"] = training.get("min_atoms_per_batch", 0)
    for key, stage in (("validation_set", "val"), ("test_set", "test")):
        value = _single(options.get(key, 0.0), key)
        if isinstance(value, (int, float)):
            data[f"{stage}_fraction"] = float(value)
            data[f"{stage}_set"] = None
        elif isinstance(value, Mapping) and set(value) == {"indices"}:
            data[f"{stage}_fraction"] = 0.0
            data[f"{stage}_set"] = {"indices": value["indices"]}
        else:
            other = _dataset(value, key)
            data[f"{stage}_fraction"] = 0.0
            data[f"{stage}_set"] = {k: v for k, v in other.items() if v or k == "path"}
    loss_targets = {name: _loss_target(name, t) for name, t in train["targets"].items()}
    return data, loss_targets


# -- loss ----------------------------------------------------------------------------
def _loss(loss: Any, targets: Mapping[str, Mapping[str, Any]]) -> dict[str, Any]:
    """Every term spelt out (so that ``loss.energy.forces=mae`` overrides one term),
    energy gradients under ``forces`` / ``stress`` (or ``virial``)."""
    try:
        internal = expand_loss_config(to_plain(loss), targets)
    except ValueError as error:
        raise ValueError(f"architecture.training.{error}") from None
    result = {}
    for name, entry in internal.items():
        entry = dict(entry)
        gradients = entry.pop("gradients")
        energy = is_energy_like(name, targets[name]) and not targets[name].get("per_atom")
        for gradient, term in gradients.items():
            if energy and gradient == "positions":
                entry["forces"] = term
            elif energy and gradient == "strain":
                entry["virial" if targets[name].get("virial") else "stress"] = term
            else:
                entry.setdefault("gradients", {})[gradient] = term
        result[name] = entry
    return result


def format_not_acted_on(path: str, entries: list[tuple[str, str]]) -> str:
    """The start-up list of the options file's keys that pl_mtt does not act on."""
    if not entries:
        return f"metatrain options '{path}': every key is used"
    lines = [f"metatrain options '{path}': keys pl_mtt does not act on:"]
    width = max(len(key) for key, _ in entries)
    lines += [f"  {key:<{width}}  {reason}" for key, reason in entries]
    return "\n".join(lines)
