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
else runs, so a bad loss fails in a second with the key path of the problem.

``options=<file>``: the metatrain options file is checked and translated
(:func:`pl_mtt.interop.translate_options`) before Hydra composes the config; the
translation enters the defaults list after the app's own config (``metatrain_options``
group), so command-line overrides still apply last. Its keys that pl_mtt does not act
on are listed once at start-up.
"""

from __future__ import annotations

import inspect
import re
import sys
from pathlib import Path
from typing import Any

import hydra
import lightning.pytorch as L  # noqa: N812
import torch
from hydra.core.config_store import ConfigStore
from hydra.core.hydra_config import HydraConfig
from lightning.pytorch.callbacks import ModelCheckpoint
from lightning.pytorch.loggers import CSVLogger
from lightning.pytorch.utilities import rank_zero_only
from omegaconf import DictConfig, OmegaConf

from pl_mtt.config import expand_loss_config
from pl_mtt.data import AtomisticDataModule, AtomisticDataset, collate, write_indices
from pl_mtt.interop import (
    OptionsTranslation,
    format_not_acted_on,
    loss_for_data,
    translate_options,
)
from pl_mtt.registry import loss_type_names
from pl_mtt.training.callbacks import ScalerCallback
from pl_mtt.training.epoch_log import EpochLog
from pl_mtt.training.evaluation import collect
from pl_mtt.training.plots import dos_overlays, learning_curves, parity_plots, write_metrics_table
from pl_mtt.training.schema import register_configs
from pl_mtt.training.task import AtomisticTask

__all__ = [
    "config_dir",
    "evaluate",
    "main",
    "merge_loss_shorthand_overrides",
    "model_config_for_data",
    "optimizer_arguments",
    "options_argument",
    "register_options_config",
    "run",
    "train",
]


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


def training_targets(cfg: DictConfig) -> dict[str, Any]:
    """Target options as configured in ``data.targets`` (before the data is read)."""
    return OmegaConf.to_container(cfg.data.targets, resolve=True) or {}


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


def loss_targets(cfg: DictConfig, translation: OptionsTranslation | None) -> dict[str, Any]:
    """The targets the loss config is checked against before the data is read."""
    if translation is not None:
        return translation.loss_targets
    return training_targets(cfg)


@rank_zero_only
def _announce(text: str) -> None:
    print(text)


def output_dir() -> Path:
    """This run's directory (Hydra's), or the working directory outside Hydra."""
    if HydraConfig.initialized():
        return Path(HydraConfig.get().runtime.output_dir)
    return Path.cwd()


def _datamodule(cfg: DictConfig) -> AtomisticDataModule:
    data = OmegaConf.to_container(cfg.data, resolve=True)
    return AtomisticDataModule(**data)


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


def _scaler_callback(cfg: DictConfig, dos_targets: list[str]) -> ScalerCallback:
    scaler = OmegaConf.to_container(cfg.scaler, resolve=True)
    return ScalerCallback(
        per_structure_targets=scaler["per_structure_targets"],
        composition=scaler["composition"],
        no_composition=dos_targets,
        fixed_scales=scaler["fixed_scales"] or None,
        refit=scaler["refit_on_resume"],
    )


def _trainer(cfg: DictConfig, run_dir: Path, callbacks: list) -> L.Trainer:
    options = OmegaConf.to_container(cfg.trainer, resolve=True)
    options["default_root_dir"] = options.get("default_root_dir") or str(run_dir)
    options["inference_mode"] = False  # forces and stress are autograd gradients
    logger = CSVLogger(str(run_dir), name="", version="")
    return L.Trainer(**options, logger=logger, callbacks=callbacks)


def write_report(task: AtomisticTask, loader: Any, run_dir: Path, metrics_csv: Path | None) -> None:
    """Plots (learning curves, parity, DOS) and a metrics table under ``run_dir``."""
    plots = run_dir / "plots"
    if metrics_csv is not None and metrics_csv.is_file():
        learning_curves(metrics_csv, plots)
    collected = collect(task, loader)
    parity_plots(collected, plots)
    dos_overlays(collected, plots)
    write_metrics_table(collected, run_dir / "test_metrics.md")


def train(cfg: DictConfig) -> dict[str, Any]:
    """The training job: data, model, task, Trainer with ScalerCallback; plots at the end."""
    run_dir = output_dir()
    L.seed_everything(cfg.seed, workers=True)
    datamodule = _datamodule(cfg)
    datamodule.setup()
    targets = datamodule.target_options
    loss = OmegaConf.to_container(cfg.loss, resolve=True)
    if cfg.get("options"):  # metatrain drops the terms of gradients the data lacks
        loss, dropped = loss_for_data(loss, targets)
        if dropped:
            _announce(f"loss terms without data (not used): {', '.join(dropped)}")
    model_config = model_config_for_data(cfg, datamodule)
    task = AtomisticTask(
        hydra.utils.instantiate(model_config),
        loss,
        targets,
        **optimizer_arguments(cfg),
        per_structure_targets=list(cfg.scaler.per_structure_targets),
        global_mean=cfg.global_mean,
        model_config=model_config,
    )
    checkpoint = ModelCheckpoint(
        dirpath=str(run_dir / "checkpoints"), monitor="val/loss", save_last=True
    )
    callbacks: list = [checkpoint, EpochLog()]
    if cfg.scaler.scale_targets:
        callbacks.append(_scaler_callback(cfg, list(task.dos_targets)))
    trainer = _trainer(cfg, run_dir, callbacks)
    if trainer.is_global_zero:
        write_split(datamodule, run_dir)
    trainer.fit(task, datamodule, ckpt_path=cfg.ckpt_path)
    if len(datamodule.test_dataset) == 0:  # e.g. metatrain's default test_set: 0
        _announce("no test set: the final evaluation and report use the validation set")
        datamodule.test_dataset = datamodule.val_dataset
    results = trainer.test(task, datamodule, verbose=False)
    if trainer.is_global_zero:
        torch.save(task.inference_model(), run_dir / "model.pt")
        write_report(task, datamodule.test_dataloader(), run_dir, run_dir / "metrics.csv")
        print(f"outputs written to {run_dir}")
    return {"test": results[0] if results else {}, "best": checkpoint.best_model_path}


def write_split(datamodule: AtomisticDataModule, run_dir: Path) -> None:
    """``indices/training.txt``, ``validation.txt``, ``test.txt`` (metatrain's format):
    the structures of each set, as indices into their file."""
    names = {"train": "training", "val": "validation", "test": "test"}
    for stage, indices in datamodule.split.items():
        write_indices(run_dir / "indices" / f"{names[stage]}.txt", indices)


def evaluate(cfg: DictConfig) -> dict[str, Any]:
    """Evaluate ``ckpt_path`` on every structure of ``data.path`` (or the embedded
    dataset): metrics table, parity plots, DOS overlays under the run directory."""
    if not cfg.ckpt_path:
        raise ValueError("mode=evaluate needs ckpt_path=<checkpoint of a training run>")
    run_dir = output_dir()
    task = AtomisticTask.load_from_checkpoint(cfg.ckpt_path, map_location="cpu")
    data = _datamodule(cfg)
    path, _, extra = data._sources()
    targets = training_targets(cfg) or task.target_options
    # the structures in the dtype of the checkpoint's model (float32 for metatrain's)
    dtype = next(task.model.parameters(), torch.empty(0, dtype=data.dtype)).dtype
    dataset = AtomisticDataset.from_file(path, targets, extra, dtype=dtype)
    loader = torch.utils.data.DataLoader(
        dataset, batch_size=cfg.data.batch_size, collate_fn=collate, shuffle=False
    )
    trainer = _trainer(cfg, run_dir, [])
    results = trainer.test(task, dataloaders=loader, verbose=False)
    write_report(task, loader, run_dir, None)
    print(f"evaluation written to {run_dir}")
    return {"test": results[0] if results else {}}


def run(cfg: DictConfig) -> dict[str, Any]:
    """Validate the loss config, then train (or ``dry_run``: print it; or evaluate)."""
    translation = options_translation(cfg)
    if translation is not None:
        _announce(format_not_acted_on(translation.path, translation.not_acted_on))
    expanded = expand_loss_config(cfg.loss, loss_targets(cfg, translation))
    if cfg.dry_run:
        print(OmegaConf.to_yaml(cfg, resolve=True))
        print("# expanded loss config")
        print(OmegaConf.to_yaml(OmegaConf.create({"loss": expanded})))
        return {"loss": expanded}
    if cfg.mode == "evaluate":
        return evaluate(cfg)
    if cfg.mode != "train":
        raise ValueError(f"mode: expected 'train' or 'evaluate', got {cfg.mode!r}")
    return train(cfg)


def main() -> None:
    """Console entry point (also ``python -m pl_mtt.train``)."""
    register_configs()
    args = merge_loss_shorthand_overrides(sys.argv[1:])
    register_options_config(args)
    sys.argv = [sys.argv[0], *args]
    app = hydra.main(config_path=config_dir(), config_name="config", version_base="1.3")(run)
    app()


if __name__ == "__main__":
    main()
