"""The Hydra entry point: ``python -m pl_mtt.train [overrides]``.

.. code-block:: bash

    python -m pl_mtt.train                                   # the default job
    python -m pl_mtt.train loss.energy.forces=mae            # one loss term changed
    python -m pl_mtt.train loss.energy.forces=mae loss.energy.forces.weight=0.1
    python -m pl_mtt.train loss=mse dry_run=true             # print the expanded loss
    python -m pl_mtt.train -m loss.energy.forces=mse,mae     # a sweep
    python -m pl_mtt.train options=options.yaml              # a metatrain options file
    python -m pl_mtt.train options=options.yaml trainer.max_epochs=3 dry_run=true

The loss config is validated with :func:`pl_mtt.expand_loss_config` before anything
else runs, so a bad loss fails in a second with the key path of the problem. Then the
data is read, its targets resolved (an energy gets forces and stress when the file has
them) and a summary printed; entries of the configured loss for data the file does not
provide are left out (and listed), unless the command line names them: then they are
an error. Config and data mistakes print their message without a traceback
(``HYDRA_FULL_ERROR=1`` shows it). The ``loss_schedule`` stages are checked with the loss,
against the same targets.

``options=<file>``: the metatrain options file is checked and translated
(:func:`pl_mtt.interop.translate_options`) before Hydra composes the config; the
translation enters the defaults list after the app's own config (``metatrain_options``
group), so command-line overrides still apply last. Its keys that pl_mtt does not act
on are listed once at start-up.
"""

from __future__ import annotations

import contextlib
import inspect
import os
import re
import sys
import warnings
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import hydra
import lightning.pytorch as L  # noqa: N812
import torch
from hydra.core.config_store import ConfigStore
from hydra.core.hydra_config import HydraConfig
from hydra.core.override_parser.overrides_parser import OverridesParser
from lightning.pytorch.callbacks import ModelCheckpoint
from lightning.pytorch.loggers import CSVLogger
from lightning.pytorch.utilities import rank_zero_only
from omegaconf import DictConfig, OmegaConf

from pl_mtt.config import (
    expand_loss_config,
    is_energy_like,
    loss_terms,
    restrict_loss_to_targets,
)
from pl_mtt.data import (
    AtomisticDataModule,
    DataReport,
    DataWarning,
    collate,
    open_dataset,
    write_indices,
)
from pl_mtt.interop import OptionsTranslation, format_not_acted_on, translate_options
from pl_mtt.interop.export import export_run_model
from pl_mtt.registry import loss_type_names
from pl_mtt.training.callbacks import ScalerCallback
from pl_mtt.training.epoch_log import EpochLog
from pl_mtt.training.evaluation import collect
from pl_mtt.training.loss_schedule import LossSchedule, LossScheduleCallback
from pl_mtt.training.plots import dos_overlays, learning_curves, parity_plots, write_metrics_table
from pl_mtt.training.schema import register_configs
from pl_mtt.training.task import AtomisticTask

__all__ = [
    "UserInputError",
    "assumed_targets",
    "checkpoint_callbacks",
    "config_dir",
    "configured_targets",
    "evaluate",
    "explicit_loss_paths",
    "main",
    "merge_loss_shorthand_overrides",
    "model_config_for_data",
    "optimizer_arguments",
    "options_argument",
    "register_options_config",
    "run",
    "run_cli",
    "train",
    "write_split",
]


class UserInputError(ValueError):
    """A mistake in the config or the data (a ``ValueError`` or a missing file raised
    while they are read): the app prints its message without a traceback."""


@contextlib.contextmanager
def user_input() -> Iterator[None]:
    """Turn ``ValueError``/``FileNotFoundError`` raised inside into :class:`UserInputError`
    (config and data stages only: errors while training keep their traceback)."""
    try:
        yield
    except UserInputError:
        raise
    except (ValueError, FileNotFoundError) as error:
        raise UserInputError(str(error)) from error


def config_dir() -> str:
    """The Hydra config tree: ``conf/`` of a source checkout or the installed copy."""
    package = Path(__file__).resolve().parent.parent
    for candidate in (package / "conf", package.parent / "conf"):
        if (candidate / "config.yaml").is_file():
            return str(candidate)
    raise FileNotFoundError(f"no Hydra config tree (conf/config.yaml) found near {package}")


_OVERRIDE = re.compile(r"^(?P<plus>\+{0,2})(?P<key>loss(?:\.[^=]+)?)=(?P<value>.*)$")


def merge_loss_shorthand_overrides(args: list[str]) -> list[str]:
    """Let a loss shorthand and a field of the same term be overridden together.

    ``loss.energy.forces=mae loss.energy.forces.weight=0.1`` would fail in Hydra (the
    first turns the node into the string ``"mae"``, which has no ``weight``); it is
    rewritten to the equivalent ``++loss.energy.forces={type:mae,weight:0.1}``. All
    other arguments pass through unchanged.
    """
    types = set(loss_type_names())
    parsed = [(i, _OVERRIDE.match(arg)) for i, arg in enumerate(args)]
    shorthands = {
        m["key"]: i for i, m in parsed if m and m["key"] != "loss" and m["value"] in types
    }
    if not shorthands:
        return list(args)
    fields: dict[str, list[tuple[str, str]]] = {key: [] for key in shorthands}
    dropped = set()
    for i, m in parsed:
        if not m:
            continue
        parent, _, leaf = m["key"].rpartition(".")
        if parent in shorthands and "." not in leaf:
            fields[parent].append((leaf, m["value"]))
            dropped.add(i)
    result = []
    for i, arg in enumerate(args):
        if i in dropped:
            continue
        m = _OVERRIDE.match(arg)
        if m and m["key"] in shorthands and fields[m["key"]]:
            items = [f"type:{m['value']}"] + [f"{k}:{v}" for k, v in fields[m["key"]]]
            arg = f"++{m['key']}={{{','.join(items)}}}"
        result.append(arg)
    return result


def configured_targets(cfg: DictConfig) -> dict[str, Any]:
    """Target options as configured in ``data.targets`` (before the data is read)."""
    return OmegaConf.to_container(cfg.data.targets, resolve=True) or {}


def assumed_targets(cfg: DictConfig) -> dict[str, Any]:
    """``data.targets`` with what the data may provide turned on: an energy-like,
    per-structure target whose ``forces``/``stress``/``virial`` are not set is assumed
    to have forces and stress (the file decides at start-up). The loss config is
    checked against these before any data is read, so a typo fails in a second."""
    targets = {}
    for name, options in configured_targets(cfg).items():
        options = dict(options or {})
        if is_energy_like(name, options) and not options.get("per_atom"):
            if options.get("forces") is None:
                options["forces"] = True
            if options.get("stress") is None and options.get("virial") is None:
                options["stress"] = True
        targets[name] = options
    return targets


# -- metatrain options files ---------------------------------------------------------
_OPTIONS_ARGUMENT = re.compile(r"^\+{0,2}options=(?P<path>.+)$")


def options_argument(args: list[str]) -> str | None:
    """The path of the last ``options=<file>`` command-line argument, if any."""
    paths = [m["path"] for m in map(_OPTIONS_ARGUMENT.match, args) if m]
    return paths[-1].strip("'\"") if paths else None


def model_config_names() -> list[str]:
    """Names of the app's ``conf/model`` configs."""
    return sorted(path.stem for path in (Path(config_dir()) / "model").glob("*.yaml"))


def register_options_config(args: list[str]) -> OptionsTranslation | None:
    """Translate the ``options=<file>`` of ``args`` and store it in Hydra's ConfigStore
    as ``metatrain_options/file`` (the defaults list of ``conf/config.yaml`` picks it up
    after the app's config, before the command-line overrides)."""
    path = options_argument(args)
    ConfigStore.instance().repo.get("metatrain_options", {}).pop("file.yaml", None)
    if path is None or path in ("null", "None"):
        return None
    translation = translate_options(path, model_config_names())
    ConfigStore.instance().store(
        group="metatrain_options", name="file", node=translation.config, package="_global_"
    )
    return translation


def options_translation(cfg: DictConfig) -> OptionsTranslation | None:
    """The translation of ``cfg.options`` (None without an options file)."""
    if not cfg.get("options"):
        return None
    return translate_options(cfg.options, model_config_names())


def model_config_for_data(cfg: DictConfig, datamodule: AtomisticDataModule) -> dict[str, Any]:
    """``cfg.model`` as a plain dict, completed with what the data says when the model
    class takes it and the config leaves it out: ``targets`` (resolved target options)
    and ``atomic_types`` (e.g. :class:`pl_mtt.models.MetatrainModel`)."""
    config = OmegaConf.to_container(cfg.model, resolve=True)
    parameters = inspect.signature(hydra.utils.get_class(config["_target_"])).parameters
    if "targets" in parameters and not config.get("targets"):
        config["targets"] = datamodule.target_options
    if "atomic_types" in parameters and not config.get("atomic_types"):
        config["atomic_types"] = datamodule.atomic_types
    return config


def optimizer_arguments(cfg: DictConfig) -> dict[str, Any]:
    """``AtomisticTask``'s optimizer keyword arguments from ``cfg.optimizer``."""
    optimizer = OmegaConf.to_container(cfg.optimizer, resolve=True)
    return {
        "optimizer": optimizer["name"],
        "lr": optimizer["lr"],
        "weight_decay": optimizer["weight_decay"],
        "lr_decay": optimizer["lr_decay"],
        "schedule": optimizer["schedule"],
        "warmup_fraction": optimizer["warmup_fraction"],
        "grad_clip_norm": optimizer["grad_clip_norm"],
    }


def write_split(datamodule: AtomisticDataModule, run_dir: Path) -> None:
    """``indices/training.txt``, ``validation.txt``, ``test.txt`` (metatrain's format):
    the structures of each set, as indices into their file."""
    names = {"train": "training", "val": "validation", "test": "test"}
    for stage, indices in datamodule.split.items():
        write_indices(run_dir / "indices" / f"{names[stage]}.txt", indices)


def command_line_overrides() -> list[str]:
    """This job's overrides from the command line (Hydra's), none outside Hydra."""
    if HydraConfig.initialized():
        return list(HydraConfig.get().overrides.task)
    return []


def _leaf_paths(path: tuple[str, ...], value: Any) -> list[tuple[str, ...]]:
    if isinstance(value, dict) and value:
        return [leaf for k, v in value.items() for leaf in _leaf_paths((*path, str(k)), v)]
    return [path]


def explicit_loss_paths(overrides: Sequence[str]) -> list[tuple[str, ...]]:
    """Key paths under ``loss`` that command-line overrides write.

    ``loss.energy.stress=huber`` -> ``("energy", "stress")``; a mapping value names each
    of its keys (``loss.energy={type:mae}`` -> ``("energy", "type")``: Hydra merges it
    into the group's entry). Choosing a group (``loss=mse``) and deletions (``~loss.x``)
    name nothing. Entries named here are never dropped for missing data.
    """
    paths: list[tuple[str, ...]] = []
    for override in OverridesParser.create().parse_overrides(list(overrides)):
        key = override.key_or_group
        if override.is_delete() or not key.startswith("loss."):
            continue
        value = override.value() if not override.is_sweep_override() else None
        paths += _leaf_paths(tuple(key.split(".")[1:]), value)
    return paths


def output_dir() -> Path:
    """This run's directory (Hydra's), or the working directory outside Hydra."""
    if HydraConfig.initialized():
        return Path(HydraConfig.get().runtime.output_dir)
    return Path.cwd()


def _datamodule(cfg: DictConfig) -> AtomisticDataModule:
    data = OmegaConf.to_container(cfg.data, resolve=True)
    return AtomisticDataModule(**data)


def _scaler_callback(cfg: DictConfig, dos_targets: list[str], run_dir: Path) -> ScalerCallback:
    scaler = OmegaConf.to_container(cfg.scaler, resolve=True)
    return ScalerCallback(
        per_structure_targets=scaler["per_structure_targets"],
        composition=scaler["composition"],
        no_composition=dos_targets,
        fixed_scales=scaler["fixed_scales"] or None,
        fixed_baseline=scaler["fixed_baseline"] or None,
        statistics=scaler["statistics"],
        save_statistics=run_dir / "statistics.yaml" if scaler["save_statistics"] else None,
        refit=scaler["refit_on_resume"],
    )


def checkpoint_callbacks(run_dir: Path, monitor: str = "val/loss") -> list[ModelCheckpoint]:
    """``checkpoints/last.ckpt``, rewritten at the end of every epoch (resume from it),
    and the checkpoint with the lowest ``monitor`` (``epoch=...-step=....ckpt``).

    (Lightning's ``save_last=True`` on a monitoring checkpoint only rewrites
    ``last.ckpt`` when a new best is saved, so it can hold an earlier epoch.)
    """
    directory = str(run_dir / "checkpoints")
    best = ModelCheckpoint(dirpath=directory, monitor=monitor)
    last = ModelCheckpoint(
        dirpath=directory, filename="last", monitor=None, enable_version_counter=False
    )
    return [best, last]


def _trainer(cfg: DictConfig, run_dir: Path, callbacks: list) -> L.Trainer:
    options = OmegaConf.to_container(cfg.trainer, resolve=True)
    options["default_root_dir"] = options.get("default_root_dir") or str(run_dir)
    options["inference_mode"] = False  # forces and stress are autograd gradients
    logger = CSVLogger(str(run_dir), name="", version="")
    return L.Trainer(**options, logger=logger, callbacks=callbacks)


def write_report(
    task: AtomisticTask, loader: Any | None, run_dir: Path, metrics_csv: Path | None
) -> None:
    """Plots (learning curves; parity and DOS on ``loader``) and a metrics table under
    ``run_dir`` (no parity plots or table without a loader, e.g. no test split)."""
    plots = run_dir / "plots"
    if metrics_csv is not None and metrics_csv.is_file():
        learning_curves(metrics_csv, plots)
    if loader is None:
        return
    collected = collect(task, loader)
    parity_plots(collected, plots)
    dos_overlays(collected, plots)
    write_metrics_table(collected, run_dir / "test_metrics.md")


@rank_zero_only
def _print(text: str) -> None:
    print(text, flush=True)


def read_data(cfg: DictConfig) -> tuple[AtomisticDataModule, list[str]]:
    """The datamodule of ``cfg.data``, set up, and the ``DataWarning`` messages raised
    while reading it (shown in the start-up summary; other warnings pass through)."""
    datamodule = _datamodule(cfg)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        datamodule.setup()
    messages = []
    for warning in caught:
        if issubclass(warning.category, DataWarning):
            messages.append(str(warning.message))
        else:
            warnings.warn_explicit(
                warning.message, warning.category, warning.filename, warning.lineno
            )
    return datamodule, messages


def loss_for_data(
    cfg: DictConfig, targets: dict[str, Any], explicit: Sequence[tuple[str, ...]] = ()
) -> tuple[Any, dict[str, dict], list[str]]:
    """``(loss, expanded, dropped)``: the configured loss restricted to what the data
    provides (entries named on the command line stay, and fail if unprovided), its
    internal form, and the key paths of the entries left out."""
    loss, dropped = restrict_loss_to_targets(cfg.loss, targets, keep=explicit)
    return loss, expand_loss_config(loss, targets), dropped


def _loss_terms(
    expanded: dict[str, dict], targets: dict[str, Any]
) -> Iterator[tuple[str, str, dict]]:
    """``(key path, term name, term)`` of every term of an expanded loss, e.g.
    ``("loss.energy.forces", "energy/forces", {...})``; a gradient without a readable
    name is ``loss.<target>.gradients.<gradient>``, ``<target>/<gradient>``."""
    for name, target, gradient, term in loss_terms(expanded, targets):
        if gradient is None:
            yield f"loss.{name}", name, term
        else:
            alias = name.rsplit("/", 1)[1]
            key = alias if alias != gradient else f"gradients.{gradient}"
            yield f"loss.{target}.{key}", name, term


def check_sample_weights(
    expanded: dict[str, dict], targets: dict[str, Any], extra_data_names: Sequence[str]
) -> None:
    """Every ``sample_weights`` of the loss names an entry of the data's ``extra_data``
    (checked once after reading the data, rather than at the first step)."""
    for path, _, term in _loss_terms(expanded, targets):
        key = term.get("sample_weights")
        if key is not None and key not in extra_data_names:
            raise ValueError(
                f"{path}.sample_weights: '{key}' is not an entry of data.extra_data "
                f"(entries: {list(extra_data_names)}); read it with e.g. "
                f"data.extra_data.{key}={{key: {key}}} (an info or arrays key of the "
                f"structure file) or {{read_from: <file.mts>}}"
            )


def _term_text(term: dict) -> str:
    """``mse``, or ``mse, weights config_weight x type weights {29: 1.0, 79: 2.0}``."""
    weights = []
    if term.get("sample_weights") is not None:
        weights.append(str(term["sample_weights"]))
    if term.get("type_weights"):
        weights.append(f"type weights {term['type_weights']}")
    return term["type"] + (f", weights {' x '.join(weights)}" if weights else "")


def loss_summary(expanded: dict[str, dict], targets: dict[str, Any], dropped: list[str]) -> str:
    """One line of loss terms, and the configured entries left out for missing data."""
    terms = [f"{name} ({_term_text(term)})" for _, name, term in _loss_terms(expanded, targets)]
    lines = [f"loss terms: {', '.join(terms)}"]
    if dropped:
        lines.append(
            f"  left out of the configured loss, the data does not provide them: "
            f"{', '.join(dropped)}"
        )
    return "\n".join(lines)


def start_up_summary(data_summary: str, loss: str, data_warnings: Sequence[str] = ()) -> str:
    """The block printed before training: data, loss terms, warnings."""
    lines = [data_summary, loss]
    lines += [f"warning: {message}" for message in data_warnings]
    return "\n".join(lines)


def check_loss_config(cfg: DictConfig, explicit: Sequence[tuple[str, ...]] = ()) -> None:
    """The loss grammar (and the ``loss_schedule`` stages merged over the loss) against
    :func:`assumed_targets`, before any data is read."""
    targets = assumed_targets(cfg)
    if targets:
        _, expanded, _ = loss_for_data(cfg, targets, explicit)
        LossSchedule(expanded, cfg.loss_schedule, targets)


def train(cfg: DictConfig, explicit_loss: Sequence[tuple[str, ...]] = ()) -> dict[str, Any]:
    """The training job: data (summary printed), model, task, Trainer with
    ScalerCallback; plots at the end. ``dry_run``: stop after the summary and print the
    config and the expanded loss."""
    run_dir = output_dir()
    L.seed_everything(cfg.seed, workers=True)
    with user_input():
        datamodule, data_warnings = read_data(cfg)
        targets = datamodule.target_options
        loss, expanded, dropped = loss_for_data(cfg, targets, explicit_loss)
        check_sample_weights(expanded, targets, datamodule.extra_data_names)
        LossSchedule(expanded, cfg.loss_schedule, targets)  # the stages, on the data's terms
    _print(
        start_up_summary(
            datamodule.summary(), loss_summary(expanded, targets, dropped), data_warnings
        )
    )
    if cfg.dry_run:
        _print(OmegaConf.to_yaml(cfg, resolve=True))
        _print("# expanded loss config")
        _print(OmegaConf.to_yaml(OmegaConf.create({"loss": expanded})))
        return {"loss": expanded}
    with user_input():
        model_config = model_config_for_data(cfg, datamodule)
        model = hydra.utils.instantiate(model_config)
        task = AtomisticTask(
            model,
            loss,
            targets,
            **optimizer_arguments(cfg),
            per_structure_targets=list(cfg.scaler.per_structure_targets),
            global_mean=cfg.global_mean,
            model_config=model_config,
        )
    monitor = "val/loss" if len(datamodule.val_dataset) else "train/loss"
    best, last = checkpoint_callbacks(run_dir, monitor)
    callbacks: list = [best, last, EpochLog()]
    if cfg.scaler.scale_targets:
        callbacks.append(_scaler_callback(cfg, list(task.dos_targets), run_dir))
    if cfg.loss_schedule:
        callbacks.append(LossScheduleCallback(cfg.loss_schedule))
    trainer = _trainer(cfg, run_dir, callbacks)
    if trainer.is_global_zero:
        write_split(datamodule, run_dir)
    trainer.fit(task, datamodule, ckpt_path=cfg.ckpt_path)
    has_test = len(datamodule.test_dataset) > 0
    results = trainer.test(task, datamodule, verbose=False) if has_test else []
    if trainer.is_global_zero:
        torch.save(task.inference_model(), run_dir / "model.pt")
        export_run_model(task, run_dir, cfg.export, unscaled=not cfg.scaler.scale_targets)
        loader = datamodule.test_dataloader() if has_test else None
        write_report(task, loader, run_dir, run_dir / "metrics.csv")
        print(f"outputs written to {run_dir}")
    return {"test": results[0] if results else {}, "best": best.best_model_path}


def evaluate(cfg: DictConfig) -> dict[str, Any]:
    """Evaluate ``ckpt_path`` on every structure of ``data.path`` (or the embedded
    dataset): metrics table, parity plots, DOS overlays under the run directory."""
    run_dir = output_dir()
    with user_input():
        if not cfg.ckpt_path:
            raise ValueError("mode=evaluate needs ckpt_path=<checkpoint of a training run>")
        task = AtomisticTask.load_from_checkpoint(cfg.ckpt_path, map_location="cpu")
        data = _datamodule(cfg)
        path, _, extra = data._sources()
        targets = configured_targets(cfg) or task.target_options
        # the structures in the dtype of the checkpoint's model (float32 for metatrain's)
        dtype = next(task.model.parameters(), torch.empty(0, dtype=data.dtype)).dtype
        dataset = open_dataset(path, targets, extra, dtype=dtype)
    report = DataReport.from_dataset(
        dataset, {"test": range(len(dataset))}, files=[path], configured_targets=targets
    )
    _print(start_up_summary(report.text(), f"checkpoint: {cfg.ckpt_path}", report.warnings()))
    loader = torch.utils.data.DataLoader(
        dataset, batch_size=cfg.data.batch_size, collate_fn=collate, shuffle=False
    )
    trainer = _trainer(cfg, run_dir, [])
    results = trainer.test(task, dataloaders=loader, verbose=False)
    write_report(task, loader, run_dir, None)
    print(f"evaluation written to {run_dir}")
    return {"test": results[0] if results else {}}


def run(cfg: DictConfig) -> dict[str, Any]:
    """Check the loss config (before any data is read), then train (``dry_run``: print
    the data summary, the config and the expanded loss, and stop) or evaluate.

    Config and data mistakes raise :class:`UserInputError` (a ``ValueError``).
    """
    explicit = explicit_loss_paths(command_line_overrides())
    with user_input():
        translation = options_translation(cfg)
        if translation is not None:
            _print(format_not_acted_on(translation.path, translation.not_acted_on))
        check_loss_config(cfg, explicit)
        if cfg.mode not in ("train", "evaluate"):
            raise ValueError(f"mode: expected 'train' or 'evaluate', got {cfg.mode!r}")
    if cfg.mode == "evaluate" and not cfg.dry_run:
        return evaluate(cfg)
    return train(cfg, explicit)


def report_user_error(error: BaseException, run_dir: Path | None = None) -> None:
    """Print a config/data mistake as Hydra prints its own: the message, no traceback."""
    print(f"Error: {error}", file=sys.stderr)
    where = f"The config and log of this run are in {run_dir}. " if run_dir else ""
    print(
        f"{where}Set the environment variable HYDRA_FULL_ERROR=1 for the full traceback.",
        file=sys.stderr,
    )


def run_cli(cfg: DictConfig) -> dict[str, Any]:
    """Hydra's task function: :func:`run`, with user errors reported without traceback."""
    try:
        return run(cfg)
    except UserInputError as error:
        if os.environ.get("HYDRA_FULL_ERROR") == "1":
            raise
        report_user_error(error, output_dir() if HydraConfig.initialized() else None)
        sys.exit(1)


def main() -> None:
    """Console entry point (also ``python -m pl_mtt.train``)."""
    register_configs()
    args = merge_loss_shorthand_overrides(sys.argv[1:])
    try:
        register_options_config(args)
    except (ValueError, ImportError) as error:  # a bad options file: a user error
        if os.environ.get("HYDRA_FULL_ERROR") == "1":
            raise
        report_user_error(error)
        sys.exit(1)
    sys.argv = [sys.argv[0], *args]
    app = hydra.main(config_path=config_dir(), config_name="config", version_base="1.3")(run_cli)
    app()


if __name__ == "__main__":
    main()
