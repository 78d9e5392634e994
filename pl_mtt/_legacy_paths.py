"""Module paths of the flat layout (before the one-folder-per-concept layout), kept as
aliases so that files written by that code still load: ``model.pt`` files pickle
``pl_mtt.task.InferenceModel``, ``pl_mtt.scaler.Scaler`` and friends by module path.

``import pl_mtt.scaler`` returns the module now at ``pl_mtt.scaling.scaler`` (the same
object, so classes compare equal). ``pl_mtt.fit_pass`` is not aliased: that name is the
function :func:`pl_mtt.fit_pass`, and a module alias would replace it.
"""

from __future__ import annotations

import importlib
import importlib.abc
import importlib.util
import sys
from types import ModuleType

__all__ = ["MOVED_MODULES", "install"]

MOVED_MODULES = {
    "pl_mtt.batch_atoms": "pl_mtt.tensormaps.batch_atoms",
    "pl_mtt.block_ops": "pl_mtt.tensormaps.block_ops",
    "pl_mtt.callbacks": "pl_mtt.training.callbacks",
    "pl_mtt.composition": "pl_mtt.scaling.composition",
    "pl_mtt.evaluation": "pl_mtt.training.evaluation",
    "pl_mtt.functional": "pl_mtt.losses.functional",
    "pl_mtt.functional.dos": "pl_mtt.losses.functional.dos",
    "pl_mtt.functional.ensemble": "pl_mtt.losses.functional.ensemble",
    "pl_mtt.functional.pointwise": "pl_mtt.losses.functional.pointwise",
    "pl_mtt.metrics": "pl_mtt.training.metrics",
    "pl_mtt.one_pass": "pl_mtt.scaling.one_pass",
    "pl_mtt.plots": "pl_mtt.training.plots",
    "pl_mtt.scaler": "pl_mtt.scaling.scaler",
    "pl_mtt.schema": "pl_mtt.training.schema",
    "pl_mtt.target_info": "pl_mtt.scaling.target_info",
    "pl_mtt.task": "pl_mtt.training.task",
}


class _AliasLoader(importlib.abc.Loader):
    def __init__(self, target: str) -> None:
        self.target = target

    def create_module(self, spec: importlib.machinery.ModuleSpec) -> ModuleType:
        return importlib.import_module(self.target)

    def exec_module(self, module: ModuleType) -> None:
        """The target module is already executed."""


class _AliasFinder(importlib.abc.MetaPathFinder):
    def find_spec(self, name: str, path: object = None, target: object = None):
        if name not in MOVED_MODULES:
            return None
        return importlib.util.spec_from_loader(name, _AliasLoader(MOVED_MODULES[name]))


def install() -> None:
    """Put the alias finder first on ``sys.meta_path`` (once): before the path finder,
    which would load a second copy of ``pl_mtt.functional.dos`` from the aliased
    package's ``__path__``. It answers for the names above only."""
    if not any(isinstance(finder, _AliasFinder) for finder in sys.meta_path):
        sys.meta_path.insert(0, _AliasFinder())
