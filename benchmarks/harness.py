"""Side-by-side timing and peak-memory measurement shared by every benchmark.

A benchmark module ``bench_<topic>.py`` defines ``cases(device, quick) -> list[Case]``;
each case holds a naive spec-derived step and the ``pl_mtt`` step, both closures over
inputs prepared once. :func:`compare` times both alternately and returns a row
with times, peak extra memory and the ratios. ``python benchmarks/run_all.py`` runs
every module and writes ``benchmarks/RESULTS.md``; each module also runs on its own.

Peak memory: on CUDA, ``torch.cuda.max_memory_allocated`` above the memory in use
before the step; on CPU, the peak resident set size above the resident size before the
step (Linux: ``VmHWM`` is reset through ``/proc/self/clear_refs``). CPU figures are
approximate (allocator caching), CUDA figures exact.
"""

from __future__ import annotations

import argparse
import contextlib
import ctypes
import gc
import os
import platform
import statistics
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import torch

__all__ = ["Case", "Row", "compare", "device_name", "main_for", "markdown_table"]


@dataclass
class Case:
    """One comparison: the naive baseline and pl_mtt on the same prepared inputs."""

    benchmark: str
    case: str
    baseline: Callable[[], object]
    ours: Callable[[], object]
    target: str = ""
    repeats: int = 10
    warmup: int = 2


@dataclass
class Row:
    benchmark: str
    case: str
    baseline_s: float
    ours_s: float
    baseline_bytes: int
    ours_bytes: int
    target: str = ""
    notes: list[str] = field(default_factory=list)

    @property
    def speedup(self) -> float:
        return self.baseline_s / self.ours_s if self.ours_s > 0 else float("inf")

    @property
    def memory_ratio(self) -> float:
        return self.ours_bytes / self.baseline_bytes if self.baseline_bytes > 0 else float("nan")


def _synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _rss_bytes(field_name: str) -> int:
    try:
        with open("/proc/self/status") as status:
            for line in status:
                if line.startswith(field_name + ":"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return 0


def _reset_peak_rss() -> bool:
    try:
        with open("/proc/self/clear_refs", "w") as clear_refs:
            clear_refs.write("5")
        return True
    except OSError:
        return False


def _release_free_heap() -> None:
    """Return freed heap pages to the OS (glibc), so a step's allocations show in the RSS.

    Without this, a step that reuses memory its own warm-up runs freed (small tensors
    live in malloc arenas, not in fresh mappings) reports ~0 extra memory.
    """
    with contextlib.suppress(OSError, AttributeError):
        ctypes.CDLL("libc.so.6").malloc_trim(0)


def peak_extra_memory(step: Callable[[], object], device: torch.device) -> int:
    """Peak memory above what was in use before one call of ``step`` (bytes)."""
    gc.collect()
    if device.type == "cuda":
        _synchronize(device)
        torch.cuda.empty_cache()
        before = torch.cuda.memory_allocated(device)
        torch.cuda.reset_peak_memory_stats(device)
        result = step()
        _synchronize(device)
        peak = torch.cuda.max_memory_allocated(device)
        del result
        return max(peak - before, 0)
    _release_free_heap()
    if not _reset_peak_rss():
        return 0
    before = _rss_bytes("VmRSS")
    result = step()
    peak = _rss_bytes("VmHWM")
    del result
    return max(peak - before, 0)


def _timed(step: Callable[[], object], device: torch.device) -> float:
    _synchronize(device)
    start = time.perf_counter()
    step()
    _synchronize(device)
    return time.perf_counter() - start


def one_thread(step: Callable[[], object]) -> Callable[[], object]:
    """``step`` run with one torch thread (the count is restored afterwards).

    A step of many small operations waits on every stalled pool thread of a shared
    machine; measuring both implementations this way compares their own work."""

    def run() -> object:
        threads = torch.get_num_threads()
        torch.set_num_threads(1)
        try:
            return step()
        finally:
            torch.set_num_threads(threads)

    return run


def compare(case: Case, device: torch.device) -> Row:
    """Measure the baseline and pl_mtt steps of ``case`` alternately (one call of each
    per repeat, so that both see the same machine load), then their peak memory."""
    for _ in range(case.warmup):
        case.baseline()
        case.ours()
    baseline_times, ours_times = [], []
    for _ in range(case.repeats):
        baseline_times.append(_timed(case.baseline, device))
        ours_times.append(_timed(case.ours, device))
    return Row(
        case.benchmark,
        case.case,
        statistics.median(baseline_times),
        statistics.median(ours_times),
        peak_extra_memory(case.baseline, device),
        peak_extra_memory(case.ours, device),
        case.target,
    )


def device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    cpu = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as cpuinfo:
            for line in cpuinfo:
                if line.startswith("model name"):
                    cpu = line.split(":", 1)[1].strip()
                    break
    except OSError:
        pass
    threads = torch.get_num_threads()
    return f"CPU: {cpu}, {os.cpu_count()} cores, {threads} torch threads"


def _format_time(seconds: float) -> str:
    if seconds < 1e-3:
        return f"{seconds * 1e6:.0f} µs"
    if seconds < 1:
        return f"{seconds * 1e3:.2f} ms"
    return f"{seconds:.2f} s"


def _format_bytes(n: int) -> str:
    if n <= 0:
        return "~0"
    for unit in ("B", "KiB", "MiB", "GiB"):
        if n < 1024 or unit == "GiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return f"{n:.1f} GiB"


def markdown_table(rows: Sequence[Row]) -> str:
    """The rows as a Markdown table (times are medians; memory is peak extra)."""
    lines = [
        "| benchmark | case | naive time | pl_mtt time | speedup | naive peak mem "
        "| pl_mtt peak mem | mem ratio | target |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for row in rows:
        ratio = row.memory_ratio
        lines.append(
            f"| {row.benchmark} | {row.case} | {_format_time(row.baseline_s)} "
            f"| {_format_time(row.ours_s)} | {row.speedup:.1f}× "
            f"| {_format_bytes(row.baseline_bytes)} | {_format_bytes(row.ours_bytes)} "
            f"| {'n/a' if ratio != ratio else f'{ratio:.3f}'} | {row.target} |"
        )
    return "\n".join(lines)


def parse_args(description: str) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=description)
    parser.add_argument("--device", default="cpu", help="cpu or cuda")
    parser.add_argument("--quick", action="store_true", help="small sizes, for smoke tests")
    return parser.parse_args()


def main_for(cases: Callable[[torch.device, bool], Sequence[Case]], description: str) -> None:
    """Standalone entry point of one benchmark module: print its table."""
    args = parse_args(description)
    device = torch.device(args.device)
    print(f"# {description}\n\ndevice: {device_name(device)}\n")
    rows = []
    for case in cases(device, args.quick):
        row = compare(case, device)
        rows.append(row)
        print(f"{row.benchmark} / {row.case}: {row.speedup:.1f}× faster", flush=True)
    print()
    print(markdown_table(rows))
