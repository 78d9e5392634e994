"""The Hydra entry point: ``python -m pl_mtt.train [overrides]``.

.. code-block:: bash

    python -m pl_mtt.train                                   # the default job
    python -m pl_mtt.train loss.energy.forces=mae            # one loss term changed
    python -m pl_mtt.train loss.energy.forces=mae loss.energy.forces.weight=0.1
    python -m pl_mtt.train loss=mse dry_run=true             # print the expanded loss
    python -m pl_mtt.train -m loss.energy.forces=mse,mae     # a sweep

The loss config is validated with :func:`pl_mtt.expand_loss_config` before anything
else runs, so a bad loss fails in a second with the key path of the problem.
"""

from __future__ import annotations

import re
import sys
from pathlib import Path
from typing import Any

import hydra
from omegaconf import DictConfig, OmegaConf

from pl_mtt.config import expand_loss_config
from pl_mtt.registry import loss_type_names
from pl_mtt.schema import register_configs

__all__ = ["config_dir", "main", "merge_loss_shorthand_overrides", "run"]


def config_dir() -> str:
    """The Hydra config tree: ``conf/`` of a source checkout or the installed copy."""
    here = Path(__file__).resolve().parent
    for candidate in (here / "conf", here.parent / "conf"):
        if (candidate / "config.yaml").is_file():
            return str(candidate)
    raise FileNotFoundError(f"no Hydra config tree (conf/config.yaml) found near {here}")


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
    """Target options the loss grammar sees (as configured in ``data.targets``)."""
    return OmegaConf.to_container(cfg.data.targets, resolve=True) or {}


def run(cfg: DictConfig) -> dict[str, Any]:
    """Validate the loss config; with ``dry_run`` print it and stop."""
    expanded = expand_loss_config(cfg.loss, training_targets(cfg))
    if cfg.dry_run:
        print(OmegaConf.to_yaml(cfg, resolve=True))
        print("# expanded loss config")
        print(OmegaConf.to_yaml(OmegaConf.create({"loss": expanded})))
        return {"loss": expanded}
    raise NotImplementedError("training is not available yet; run with dry_run=true")


def main() -> None:
    """Console entry point (also ``python -m pl_mtt.train``)."""
    register_configs()
    sys.argv = [sys.argv[0], *merge_loss_shorthand_overrides(sys.argv[1:])]
    app = hydra.main(config_path=config_dir(), config_name="config", version_base="1.3")(run)
    app()


if __name__ == "__main__":
    main()
