"""The package layout: no import cycles between modules, public names where users import
them, and files written by the flat layout still load and predict the same values."""

from __future__ import annotations

import ast
import importlib
import json
import subprocess
import sys
from pathlib import Path

import ase.io
import pytest
import torch

import pl_mtt
from pl_mtt.data import atoms_to_system

ROOT = Path(__file__).resolve().parent.parent
PACKAGE = ROOT / "pl_mtt"
PRE_LAYOUT = Path(__file__).resolve().parent / "data" / "pre_layout"


def module_name(path: Path) -> str:
    parts = path.relative_to(ROOT).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def import_graph(package: Path = PACKAGE) -> dict[str, set[str]]:
    """``module -> modules of the package it imports``, read from the source with ``ast``.

    ``from a.b import c`` is an edge to ``a.b.c`` when that is a module, else to ``a.b``;
    imports inside functions count too (they run, and a cycle through them is still a
    cycle). A package's own ``__init__`` running first is not an edge.
    """
    modules = {module_name(path): path for path in package.rglob("*.py")}
    graph: dict[str, set[str]] = {}
    for name, path in modules.items():
        edges: set[str] = set()
        is_package = path.name == "__init__.py"
        for node in ast.walk(ast.parse(path.read_text(), filename=str(path))):
            if isinstance(node, ast.Import):
                edges.update(alias.name for alias in node.names)
            elif isinstance(node, ast.ImportFrom):
                if node.level:  # relative import
                    base = name.split(".")
                    base = base if is_package else base[:-1]
                    base = base[: len(base) - node.level + 1]
                    source = ".".join([*base, node.module] if node.module else base)
                else:
                    source = node.module or ""
                for alias in node.names:
                    candidate = f"{source}.{alias.name}"
                    edges.add(candidate if candidate in modules else source)
        graph[name] = {edge for edge in edges if edge in modules and edge != name}
    return graph


def find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    """One cycle of ``graph`` as a list of modules (first == last), or None."""
    state: dict[str, int] = {}  # 1: on the current path, 2: done
    path: list[str] = []

    def visit(node: str) -> list[str] | None:
        state[node] = 1
        path.append(node)
        for edge in sorted(graph[node]):
            if state.get(edge) == 1:
                return [*path[path.index(edge) :], edge]
            if edge not in state and (cycle := visit(edge)):
                return cycle
        path.pop()
        state[node] = 2
        return None

    for node in sorted(graph):
        if node not in state and (cycle := visit(node)):
            return cycle
    return None


def test_import_graph_has_no_cycle():
    graph = import_graph()
    assert len(graph) > 40  # the whole package was read
    assert "pl_mtt.losses.base" in graph["pl_mtt.losses.pointwise"]  # edges are found
    cycle = find_cycle(graph)
    assert cycle is None, "import cycle: " + " -> ".join(cycle)


def test_the_cycle_finder_finds_a_cycle(tmp_path):
    package = tmp_path / "pl_mtt"
    (package / "sub").mkdir(parents=True)
    (package / "__init__.py").write_text("")
    (package / "sub" / "__init__.py").write_text("from pl_mtt.sub.a import x\n")
    (package / "sub" / "a.py").write_text("from . import b\nx = 1\n")
    (package / "sub" / "b.py").write_text("def f():\n    from pl_mtt.sub.a import x\n")
    global ROOT
    root, ROOT = ROOT, tmp_path
    try:
        graph = import_graph(package)
    finally:
        ROOT = root
    assert find_cycle(graph) == ["pl_mtt.sub.a", "pl_mtt.sub.b", "pl_mtt.sub.a"]


def test_registry_imports_nothing_of_the_package():
    graph = import_graph()
    assert graph["pl_mtt.registry"] == set()
    assert graph["pl_mtt.config"] == {"pl_mtt.registry"}


def test_the_package_imports_nothing_of_metatrain():
    """metatrain is an optional extra: every module of the package imports without it
    being loaded (the adapter and the options reader load it when asked for)."""
    modules = sorted(module_name(path) for path in PACKAGE.rglob("*.py"))
    code = (
        "import importlib, sys\n"
        f"for name in {modules!r}:\n"
        "    importlib.import_module(name)\n"
        "print(sorted(m for m in sys.modules if m.split('.')[0] == 'metatrain'))\n"
    )
    result = subprocess.run(
        [sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=300
    )
    assert result.returncode == 0, result.stderr[-3000:]
    assert result.stdout.strip().splitlines()[-1] == "[]"


def test_layers_run_one_way():
    """Lower layers import nothing from the layers above them."""
    graph = import_graph()
    above = {
        "pl_mtt.registry": ("pl_mtt.losses", "pl_mtt.loss_module", "pl_mtt.scaling"),
        "pl_mtt.losses": ("pl_mtt.loss_module", "pl_mtt.scaling", "pl_mtt.training"),
        "pl_mtt.tensormaps": ("pl_mtt.losses", "pl_mtt.scaling", "pl_mtt.training"),
        "pl_mtt.scaling": ("pl_mtt.training", "pl_mtt.data", "pl_mtt.models"),
        "pl_mtt.data": ("pl_mtt.training", "pl_mtt.scaling", "pl_mtt.losses"),
        "pl_mtt.models": ("pl_mtt.training", "pl_mtt.scaling", "pl_mtt.data"),
    }
    for layer, forbidden in above.items():
        for module, edges in graph.items():
            if module == layer or module.startswith(layer + "."):
                bad = sorted(e for e in edges if e.startswith(forbidden))
                assert not bad, f"{module} imports {bad}"


def test_every_folder_says_what_lives_there():
    for init in PACKAGE.rglob("__init__.py"):
        docstring = ast.get_docstring(ast.parse(init.read_text()))
        assert docstring, f"{init.relative_to(ROOT)} has no docstring"


@pytest.mark.parametrize(
    ("module", "names"),
    [
        ("pl_mtt", pl_mtt.__all__),
        (
            "pl_mtt.scaling",
            [
                "prepare_for_loss",
                "for_metrics",
                "to_physical",
                "targets_for_loss",
                "targets_from_loss",
                "predictions_for_loss",
                "divide_by_atoms",
                "multiply_by_atoms",
            ],
        ),
        ("pl_mtt.losses", ["create_loss", "register_loss_type", "LossTerm", "Param"]),
        ("pl_mtt.data", ["AtomisticDataModule", "AtomisticDataset", "collate"]),
        ("pl_mtt.models", ["RadialMLP"]),
        ("pl_mtt.train", ["main"]),
        ("pl_mtt.export", ["main"]),
        ("pl_mtt.interop", ["export_model", "atomistic_model", "calculator"]),
        ("pl_mtt.data", ["requested_neighbor_lists", "attach_neighbor_lists"]),
        ("pl_mtt.tensormaps", ["ensemble_output_name", "zero_sample_layout"]),
    ],
)
def test_public_names_import_from_where_users_import_them(module, names):
    imported = importlib.import_module(module)
    for name in names:
        assert getattr(imported, name) is not None, f"{module}.{name}"


def test_fit_pass_stays_the_function():
    import pl_mtt.scaling.fit

    assert callable(pl_mtt.fit_pass)
    assert pl_mtt.fit_pass is pl_mtt.scaling.fit.fit_pass


def test_old_module_paths_are_the_new_modules():
    from pl_mtt._legacy_paths import MOVED_MODULES

    for old, new in MOVED_MODULES.items():
        assert importlib.import_module(old) is importlib.import_module(new), old
    from pl_mtt.scaler import Scaler  # a path pickled by the flat layout

    assert Scaler is pl_mtt.Scaler


def _predict(model: torch.nn.Module) -> dict[str, list[float]]:
    frames = ase.io.read(PRE_LAYOUT / "structures.xyz", index=":")
    systems = [atoms_to_system(atoms) for atoms in frames]
    with torch.enable_grad():
        block = model(systems)["energy"].block()
    return {
        "energy": block.values.reshape(-1).tolist(),
        "positions_gradient": block.gradient("positions").values.reshape(-1).tolist(),
        "strain_gradient": block.gradient("strain").values.reshape(-1).tolist(),
    }


def _assert_same(predicted: dict[str, list[float]], expected: dict[str, list[float]]) -> None:
    assert predicted.keys() == expected.keys()
    for key, values in expected.items():
        torch.testing.assert_close(
            torch.tensor(predicted[key], dtype=torch.float64),
            torch.tensor(values, dtype=torch.float64),
            rtol=1e-12,
            atol=1e-12,
            msg=key,
        )


def test_checkpoint_of_the_flat_layout_loads_and_predicts_the_same():
    expected = json.loads((PRE_LAYOUT / "expected.json").read_text())
    task = pl_mtt.AtomisticTask.load_from_checkpoint(PRE_LAYOUT / "last.ckpt", map_location="cpu")
    assert task.scaler is not None
    assert task.composition is not None
    _assert_same(_predict(task), expected["last.ckpt"])


def test_model_pt_of_the_flat_layout_loads_in_a_fresh_process():
    """A fresh process: nothing of pl_mtt imported before ``torch.load``."""
    script = f"""
import json, sys, torch
sys.path.insert(0, {str(Path(__file__).parent)!r})
model = torch.load({str(PRE_LAYOUT / "model.pt")!r}, weights_only=False)
import test_layout
expected = json.loads(open({str(PRE_LAYOUT / "expected.json")!r}).read())
test_layout._assert_same(test_layout._predict(model), expected["model.pt"])
print(type(model).__module__, type(model.scaler).__module__)
"""
    result = subprocess.run(
        [sys.executable, "-c", script], capture_output=True, text=True, cwd=ROOT, timeout=300
    )
    assert result.returncode == 0, result.stderr[-3000:]
    assert result.stdout.split() == ["pl_mtt.training.task", "pl_mtt.scaling.scaler"]
