"""Run every benchmark of the project and write ``benchmarks/RESULTS.md``.

.. code-block:: bash

    python benchmarks/run_all.py                 # CPU
    python benchmarks/run_all.py --device cuda   # adds/replaces the GPU section

Each ``benchmarks/bench_*.py`` module provides ``cases(device, quick)``; every case is
measured side by side (naive spec-derived baseline, then pl_mtt) in this one run. The
file keeps one section per device: running on another device replaces only its own.
"""

from __future__ import annotations

import importlib
import re
import sys
import time
from pathlib import Path

import torch

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

from harness import compare, device_name, markdown_table, parse_args  # noqa: E402

RESULTS = HERE / "RESULTS.md"
HEADER = """# Benchmarks

Produced by `python benchmarks/run_all.py [--device cuda]`: every case is measured side by
side in one run against a naive implementation written from the spec. Times are medians
of forward + backward (or of one fit); memory is the peak above what was in use before
the step (CPU: resident set size, approximate; CUDA: allocator peak, exact).
"""


def benchmark_modules() -> list[str]:
    return sorted(path.stem for path in HERE.glob("bench_*.py"))


def run(device: torch.device, quick: bool, only: list[str] | None = None) -> str:
    rows, extra = [], []
    for name in benchmark_modules():
        if only and name not in only:
            continue
        module = importlib.import_module(name)
        if getattr(module, "STANDALONE", False):  # runs on its own (bench_metatrain)
            continue
        for case in module.cases(device, quick):
            row = compare(case, device)
            rows.append(row)
            print(f"{row.benchmark} / {row.case}: {row.speedup:.1f}× faster", flush=True)
        if hasattr(module, "extra_report"):
            extra.append(module.extra_report(device, quick))
    title = f"## {device_name(device)}"
    stamp = time.strftime("%Y-%m-%d")
    body = [title, "", f"Run on {stamp}, torch {torch.__version__}.", "", markdown_table(rows)]
    body += [text for text in extra if text]
    return "\n".join(body) + "\n"


def merge_section(existing: str, section: str) -> str:
    """Replace the section with the same ``## device`` title in place, or append it."""
    title = section.splitlines()[0]
    parts = re.split(r"(?m)^(?=## )", existing)[1:]
    titles = [part.splitlines()[0] for part in parts]
    if title in titles:
        parts[titles.index(title)] = section
    else:
        parts.append(section)
    return HEADER + "\n" + "\n".join(p.rstrip() + "\n" for p in parts)


def main() -> None:
    args = parse_args(__doc__.splitlines()[0])
    device = torch.device(args.device)
    section = run(device, args.quick)
    existing = RESULTS.read_text() if RESULTS.exists() else HEADER
    if not args.quick:
        RESULTS.write_text(merge_section(existing, section))
        print(f"\nwrote {RESULTS}")
    print(section)


if __name__ == "__main__":
    main()
