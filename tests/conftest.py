"""Shared test helpers."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

REPO_ROOT = Path(__file__).resolve().parent.parent


def python_subprocess(
    args: list[str], cwd: Path, timeout: float = 600, env: dict[str, str] | None = None
) -> subprocess.CompletedProcess:
    """Run ``python <args>`` with this checkout importable; output captured as text."""
    full_env = {**os.environ, **(env or {})}
    full_env["PYTHONPATH"] = os.pathsep.join(
        [str(REPO_ROOT), *filter(None, [full_env.get("PYTHONPATH")])]
    )
    full_env.setdefault("PYTHONUNBUFFERED", "1")
    return subprocess.run(
        [sys.executable, *args],
        cwd=cwd,
        env=full_env,
        capture_output=True,
        text=True,
        timeout=timeout,
        check=False,
    )


def quiet_trainer(**options):
    """A CPU ``lightning.Trainer`` without logger, checkpoints, progress bar or summary,
    with gradients in evaluation (forces are autograd gradients); ``options`` add or
    replace Trainer arguments."""
    import lightning.pytorch as pl

    defaults = {
        "accelerator": "cpu",
        "logger": False,
        "enable_checkpointing": False,
        "enable_progress_bar": False,
        "enable_model_summary": False,
        "inference_mode": False,
    }
    return pl.Trainer(**{**defaults, **options})


@pytest.fixture
def run_python():
    """Fixture form of :func:`python_subprocess`."""
    return python_subprocess


@pytest.fixture(autouse=True)
def _one_torch_thread():
    """Tests use small tensors: one thread avoids oversubscribing a 2-core machine."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(autouse=True)
def _seeded_global_rng():
    """Tests that draw from torch's global generator see the same numbers whatever ran
    before them (the test order, or a selection with -k, changes nothing)."""
    torch.manual_seed(0)


@pytest.fixture
def without_metatrain(monkeypatch):
    """``importlib.import_module`` fails for metatrain, as if it were not installed."""
    import importlib

    real = importlib.import_module

    def import_module(name, *args, **kwargs):
        if name.startswith("metatrain"):
            raise ModuleNotFoundError(f"No module named '{name}'")
        return real(name, *args, **kwargs)

    monkeypatch.setattr(importlib, "import_module", import_module)
