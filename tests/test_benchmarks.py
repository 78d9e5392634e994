"""Every benchmark case runs (small sizes): a broken benchmark script fails here, not
on the day somebody wants its numbers. Timings are never asserted."""

from __future__ import annotations

import importlib
import sys
from pathlib import Path

import pytest
import torch

BENCHMARKS = Path(__file__).resolve().parent.parent / "benchmarks"
MODULES = sorted(path.stem for path in BENCHMARKS.glob("bench_*.py"))


@pytest.fixture(autouse=True)
def _benchmarks_importable(monkeypatch, tmp_path):
    monkeypatch.syspath_prepend(str(BENCHMARKS))
    monkeypatch.setenv("PL_MTT_CACHE", str(tmp_path))


def test_every_benchmark_module_is_listed():
    assert {"bench_data", "bench_dos", "bench_losses", "bench_scaler", "bench_step"} <= set(MODULES)


@pytest.mark.parametrize("name", MODULES)
def test_quick_cases_run(name, tmp_path):
    module = importlib.import_module(name)
    if getattr(module, "STANDALONE", False):  # trains whole jobs: only its inputs here
        pytest.importorskip("metatrain")
        assert module.quick_check(tmp_path / "inputs")
        sys.modules.pop(name, None)
        return
    cases = module.cases(torch.device("cpu"), True)
    assert cases, f"{name}.cases() returned no case"
    for case in cases:
        case.baseline()
        case.ours()
    sys.modules.pop(name, None)
