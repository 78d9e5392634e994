"""PNG plots of a run: learning curves, parity plots, DOS overlays.

Figures are plain ``matplotlib.figure.Figure`` objects saved to files: importing this
module never switches the matplotlib backend (inline plots in notebooks keep working).

.. code-block:: python

    learning_curves("outputs/<run>/metrics.csv", "outputs/<run>/plots")
    parity_plots(collect(task, loader), "outputs/<run>/plots")
"""

from __future__ import annotations

import csv
import math
from collections import defaultdict
from pathlib import Path

import numpy as np
from matplotlib.figure import Figure

from pl_mtt.training.evaluation import Collected

__all__ = [
    "dos_overlays",
    "learning_curve_figure",
    "learning_curves",
    "parity_plots",
    "read_metrics_csv",
    "write_metrics_table",
]


def _file_name(name: str) -> str:
    return "".join(c if c.isalnum() or c in "-_" else "_" for c in name)


def read_metrics_csv(path: str | Path) -> dict[str, list[tuple[float, float]]]:
    """Lightning ``CSVLogger`` file -> metric name -> [(epoch, value)] (epoch-level rows)."""
    series: dict[str, list[tuple[float, float]]] = defaultdict(list)
    with open(path, newline="") as handle:
        for row in csv.DictReader(handle):
            epoch = row.get("epoch")
            if not epoch:
                continue
            for name, value in row.items():
                if name in ("epoch", "step") or not value or name.endswith("_step"):
                    continue
                series[name].append((float(epoch), float(value)))
    return dict(series)


def learning_curve_figure(metric: str, stages: dict[str, list[tuple[float, float]]]) -> Figure:
    """One metric against the epoch (1-based), a line with markers per stage (``train``,
    ``val``; ``test`` as points), on a log scale when every value is positive. Every
    point has a marker, so a run of a single epoch still shows its values."""
    figure = Figure(figsize=(5, 3.5))
    axes = figure.subplots()
    for stage, points in stages.items():
        epochs, values = zip(*points, strict=True)
        style = "o" if stage == "test" else "-o"
        axes.plot(np.asarray(epochs) + 1, values, style, markersize=3, label=stage)
    axes.set_xlabel("epoch")
    axes.set_ylabel(metric)
    if all(v > 0 for pts in stages.values() for _, v in pts):
        axes.set_yscale("log")
    axes.legend()
    axes.set_title(metric)
    figure.tight_layout()
    return figure


def learning_curves(metrics_csv: str | Path, out_dir: str | Path) -> list[Path]:
    """One PNG per metric (train, val and test on a log scale against the epoch)."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    by_metric: dict[str, dict[str, list[tuple[float, float]]]] = defaultdict(dict)
    for name, points in read_metrics_csv(metrics_csv).items():
        stage, _, metric = name.partition("/")
        if metric and stage in ("train", "val", "test"):
            by_metric[metric][stage] = points
    written = []
    for metric, stages in sorted(by_metric.items()):
        path = out_dir / f"learning_curve_{_file_name(metric)}.png"
        learning_curve_figure(metric, stages).savefig(path, dpi=100)
        written.append(path)
    return written


def parity_plots(collected: Collected, out_dir: str | Path, prefix: str = "parity") -> list[Path]:
    """Predicted against reference, one PNG per quantity (MAE/RMSE in the title)."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    written = []
    rows = {row["quantity"]: row for row in collected.table()}
    for name in collected.pairs:
        prediction, target = collected.arrays(name)
        keep = ~np.isnan(target)
        if not keep.any():
            continue
        prediction, target = prediction[keep], target[keep]
        figure = Figure(figsize=(4.2, 4))
        axes = figure.subplots()
        axes.scatter(target, prediction, s=4, alpha=0.5)
        low = float(min(target.min(), prediction.min()))
        high = float(max(target.max(), prediction.max()))
        axes.plot([low, high], [low, high], "k--", lw=1)
        unit = collected.units.get(name, "")
        label = f"{name} [{unit}]" if unit else name
        axes.set_xlabel(f"reference {label}")
        axes.set_ylabel(f"predicted {label}")
        row = rows[name]
        axes.set_title(f"MAE {row['MAE']:.3g}, RMSE {row['RMSE']:.3g}", fontsize=10)
        figure.tight_layout()
        path = out_dir / f"{prefix}_{_file_name(name)}.png"
        figure.savefig(path, dpi=100)
        written.append(path)
    return written


def dos_overlays(
    collected: Collected, out_dir: str | Path, grid_spacing: float = 0.05
) -> list[Path]:
    """Predicted (aligned window) and reference DOS of a few structures per DOS target;
    masked-out reference points are drawn dashed."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    written = []
    for name, curves in collected.dos.items():
        if not curves:
            continue
        columns = min(3, len(curves))
        rows = math.ceil(len(curves) / columns)
        figure = Figure(figsize=(4 * columns, 2.8 * rows))
        axes = figure.subplots(rows, columns, squeeze=False)
        for index, (prediction, target, mask) in enumerate(curves):
            axis = axes[index // columns][index % columns]
            energy = grid_spacing * np.arange(len(target))
            trusted = np.where(mask != 0, target, np.nan)
            axis.plot(energy, target, "k--", lw=0.8, label="reference (masked out)")
            axis.plot(energy, trusted, "k-", lw=1.2, label="reference")
            axis.plot(energy, prediction, "C1-", lw=1.2, label="predicted (aligned)")
            axis.set_xlabel("energy in the target's window [eV]")
            axis.set_ylabel(name)
        for index in range(len(curves), rows * columns):
            axes[index // columns][index % columns].axis("off")
        axes[0][0].legend(fontsize=7)
        figure.tight_layout()
        path = out_dir / f"dos_{_file_name(name)}.png"
        figure.savefig(path, dpi=100)
        written.append(path)
    return written


def write_metrics_table(collected: Collected, path: str | Path) -> Path:
    """A Markdown table of MAE, RMSE, reference RMS and composition-only MAE."""
    lines = [
        "| quantity | unit | count | MAE | RMSE | reference RMS | composition-only MAE |",
        "|---|---|---|---|---|---|---|",
    ]
    for row in collected.table():
        lines.append(
            f"| {row['quantity']} | {row['unit']} | {row['count']} | {row['MAE']:.4g} "
            f"| {row['RMSE']:.4g} | {row['reference RMS']:.4g} "
            f"| {row['composition-only MAE']:.4g} |"
        )
    path = Path(path)
    path.write_text("\n".join(lines) + "\n")
    return path
