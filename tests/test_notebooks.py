"""The tutorial notebooks: each executes without error, and each is committed executed.

The notebooks run as in CI: kernel ``python3``, working directory the repository root,
embedded datasets in a temporary cache. They write their own outputs to temporary
directories; nothing is written to the repository.

To re-execute them and store the outputs (after editing a notebook)::

    python -m tests.test_notebooks [notebooks/02_scales.ipynb ...]
"""

from __future__ import annotations

import os
import sys
import tempfile
import time
from pathlib import Path

import pytest

REPO_ROOT = Path(__file__).resolve().parent.parent
NOTEBOOKS = sorted((REPO_ROOT / "notebooks").glob("*.ipynb"))
TIMEOUT_PER_CELL = 300


def execute(path: Path, cwd: Path = REPO_ROOT):
    """The notebook at ``path`` executed in a fresh ``python3`` kernel (not written).

    Raises ``nbclient.exceptions.CellExecutionError`` at the first failing cell. No
    execution timestamps are recorded and the Python version is dropped from the
    metadata, so stored notebooks diff cleanly.
    """
    import nbformat
    from nbclient import NotebookClient

    notebook = nbformat.read(path, as_version=4)
    client = NotebookClient(
        notebook,
        kernel_name="python3",
        timeout=TIMEOUT_PER_CELL,
        resources={"metadata": {"path": str(cwd)}},
        record_timing=False,
    )
    client.execute()
    notebook.metadata.get("language_info", {}).pop("version", None)
    return notebook


def _kernel_env() -> dict[str, str]:
    """Environment of the kernel and its subprocesses: this checkout first on
    PYTHONPATH, and one thread per process (the notebooks' models are tiny: on a shared
    CPU, one thread is several times faster than oversubscribed ones)."""
    paths = [str(REPO_ROOT), *filter(None, [os.environ.get("PYTHONPATH")])]
    return {"PYTHONPATH": os.pathsep.join(paths), "OMP_NUM_THREADS": "1"}


def _outputs_of(notebook, kind: str) -> list:
    return [
        output
        for cell in notebook.cells
        if cell.cell_type == "code"
        for output in cell.outputs
        if kind in output.get("data", {})
    ]


@pytest.fixture(scope="module")
def cache_dir(tmp_path_factory) -> Path:
    """One embedded-data cache shared by the notebooks (each dataset generated once)."""
    return tmp_path_factory.mktemp("pl_mtt_cache")


def test_there_are_five_notebooks():
    assert [p.name[:3] for p in NOTEBOOKS] == ["01_", "02_", "03_", "04_", "05_"], NOTEBOOKS


@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda p: p.stem)
def test_notebook_is_stored_executed_without_timestamps(path):
    import nbformat

    notebook = nbformat.read(path, as_version=4)
    code = [cell for cell in notebook.cells if cell.cell_type == "code"]
    assert code, path
    counts = [cell.execution_count for cell in code if cell.source.strip()]
    assert None not in counts, f"{path.name}: not executed (run python -m tests.test_notebooks)"
    assert counts == list(range(1, len(counts) + 1)), f"{path.name}: executed out of order"
    assert not any("execution" in cell.metadata for cell in code), "execution timestamps stored"
    assert _outputs_of(notebook, "image/png"), f"{path.name}: no plot stored"
    errors = [o for cell in code for o in cell.outputs if o.output_type == "error"]
    assert not errors, f"{path.name}: stored with an error output"


@pytest.mark.slow
@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda p: p.stem)
def test_notebook_executes(path, cache_dir, tmp_path, monkeypatch):
    monkeypatch.setenv("PL_MTT_CACHE", str(cache_dir))
    monkeypatch.setenv("TMPDIR", str(tmp_path))  # the notebooks' temporary directories
    for name, value in _kernel_env().items():
        monkeypatch.setenv(name, value)
    before = {p.name for p in REPO_ROOT.iterdir()}
    notebook = execute(path)
    assert _outputs_of(notebook, "image/png"), f"{path.name}: no plot produced"
    created = {p.name for p in REPO_ROOT.iterdir()} - before
    assert not created, f"{path.name} wrote into the repository: {sorted(created)}"


def main(paths: list[str]) -> None:
    """Execute the given notebooks (default: all) from the repository root and store them."""
    import nbformat

    os.environ.update(_kernel_env())
    for path in [Path(p).resolve() for p in paths] or NOTEBOOKS:
        start = time.perf_counter()
        with tempfile.TemporaryDirectory() as scratch:
            os.environ["TMPDIR"] = scratch  # the notebook's outputs, removed afterwards
            notebook = execute(path)
        nbformat.write(notebook, path)
        print(f"{path.relative_to(REPO_ROOT)}: {time.perf_counter() - start:.1f} s")


if __name__ == "__main__":
    main(sys.argv[1:])
