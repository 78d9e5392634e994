"""Fit the scales and composition baseline of a dataset once, and write a statistics file.

.. code-block:: bash

    python -m pl_mtt.training.fit_statistics train.zip statistics.yaml
    python -m pl_mtt.training.fit_statistics train.xyz statistics.yaml \\
        --targets "{energy: {key: dft_energy}}" --batch-size 64 --num-workers 4
    python -m pl_mtt.train data.path=train.zip scaler.statistics=statistics.yaml

One streaming pass over every structure of the file (give it the training set), with
the same code as :class:`pl_mtt.ScalerCallback`: a zip or a directory is read on access,
so memory does not grow with the dataset. The file is what
:func:`pl_mtt.scaling.statistics.write_statistics` writes.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import yaml
from torch.utils.data import DataLoader

from pl_mtt.data import collate, open_dataset
from pl_mtt.scaling.fit import fit_pass, unfitted_models
from pl_mtt.scaling.statistics import write_statistics

__all__ = ["fit_statistics", "main"]


def fit_statistics(
    path: str | Path,
    output: str | Path,
    targets: Mapping[str, Any] | None = None,
    extra_data: Mapping[str, Any] | None = None,
    *,
    batch_size: int = 64,
    num_workers: int = 0,
    per_structure_targets: Sequence[str] = (),
    composition: bool = True,
    no_composition: Sequence[str] = (),
    no_per_property_scales: Sequence[str] = (),
    fixed_scales: Mapping[str, Any] | None = None,
    fixed_baseline: Mapping[str, Any] | None = None,
    progress: bool = False,
) -> dict[str, Any]:
    """Fit on every structure of ``path`` and write the statistics to ``output``.

    Arguments are those of :func:`pl_mtt.data.open_dataset` and
    :class:`pl_mtt.ScalerCallback`; returns what was written.
    """
    dataset = open_dataset(path, targets or {"energy": {}}, extra_data)
    layouts = dataset.layouts()
    scaler, baseline = unfitted_models(
        None,
        layouts,
        per_structure_targets=[n for n in per_structure_targets if n in layouts],
        no_per_property_scales=no_per_property_scales,
        composition=composition,
        no_composition=no_composition,
    )
    loader = DataLoader(dataset, batch_size=batch_size, collate_fn=collate, num_workers=num_workers)

    def bar(batches):
        from tqdm.auto import tqdm

        return tqdm(batches, total=len(loader), desc="Fitting scales", disable=not progress)

    fit_pass(
        loader,
        scaler,
        baseline,
        fixed_scales=fixed_scales,
        fixed_baseline=fixed_baseline,
        progress=bar,
    )
    units = {
        name: str(options.get("unit") or "") for name, options in dataset.target_options.items()
    }
    return write_statistics(output, scaler, baseline, units)


def _yaml(text: str | None, what: str) -> Any:
    if text is None:
        return None
    if Path(text).is_file():
        return text  # a statistics file, for --fixed-scales / --fixed-baseline
    try:
        return yaml.safe_load(text)
    except yaml.YAMLError as error:
        raise ValueError(f"{what}: not valid YAML: {error}") from None


def main(argv: list[str] | None = None) -> int:
    """Command-line entry point (``python -m pl_mtt.training.fit_statistics``)."""
    parser = argparse.ArgumentParser(
        prog="python -m pl_mtt.training.fit_statistics",
        description="One pass over a dataset (extxyz, DiskDataset .zip or MemmapDataset "
        "directory): fit the composition baseline and target scales, write them as YAML.",
    )
    parser.add_argument("input")
    parser.add_argument("output", help="the statistics file to write (.yaml)")
    parser.add_argument("--targets", help="target options as YAML (default: {energy: {}})")
    parser.add_argument("--extra-data", help="extra data options as YAML (e.g. masks)")
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--num-workers", type=int, default=0)
    parser.add_argument("--per-structure-targets", nargs="*", default=[])
    parser.add_argument("--no-composition", action="store_true", help="no baseline at all")
    parser.add_argument("--no-composition-for", nargs="*", default=[], metavar="TARGET")
    parser.add_argument("--no-per-property-scales", nargs="*", default=[], metavar="TARGET")
    parser.add_argument("--fixed-scales", help="YAML mapping, or a statistics file")
    parser.add_argument("--fixed-baseline", help="YAML mapping, or a statistics file")
    args = parser.parse_args(argv)
    from pl_mtt.scaling.statistics import fixed_baseline_from, fixed_scales_from

    try:
        fixed_scales = _yaml(args.fixed_scales, "--fixed-scales")
        fixed_baseline = _yaml(args.fixed_baseline, "--fixed-baseline")
        if isinstance(fixed_scales, str):
            fixed_scales = fixed_scales_from(fixed_scales)
        if isinstance(fixed_baseline, str):
            fixed_baseline = fixed_baseline_from(fixed_baseline)
        written = fit_statistics(
            args.input,
            args.output,
            _yaml(args.targets, "--targets"),
            _yaml(args.extra_data, "--extra-data"),
            batch_size=args.batch_size,
            num_workers=args.num_workers,
            per_structure_targets=args.per_structure_targets,
            composition=not args.no_composition,
            no_composition=args.no_composition_for,
            no_per_property_scales=args.no_per_property_scales,
            fixed_scales=fixed_scales,
            fixed_baseline=fixed_baseline,
            progress=True,
        )
    except ValueError as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    print(
        f"wrote {args.output}: targets {list(written['targets'])}, "
        f"atomic types {written['atomic_types']}"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
