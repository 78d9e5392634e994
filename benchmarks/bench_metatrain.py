"""Head to head: the same metatrain options file trained by ``mtt train`` and by
``python -m pl_mtt.train options=...``, for SOAP-BPNN and a small PET.

.. code-block:: bash

    python benchmarks/bench_metatrain.py                  # 300 structures, 8 epochs each
    python benchmarks/bench_metatrain.py --epochs 20 --architectures pet
    python benchmarks/bench_metatrain.py --quick          # 40 structures, 3 epochs, no file

One run: the embedded EMT data (rattled Cu/Au cells, energy, forces and stress) is
written as extxyz; one seeded train/validation split is written as index files that both
tools read (``training_set.indices``, ``validation_set: {indices: ...}``); one options
file per architecture (same seed, epochs, batch size, float32) is trained by each tool in
its own process with one thread (``OMP_NUM_THREADS=1``); both tools run at the same time,
one core each, so that load from elsewhere on the machine hits both alike
(``--sequential``: one after the other). Measured:

- time to the first epoch: from the process start to the first epoch's log line
  (imports, data reading, scale and baseline fit, first epoch with its validation);
- wall time per epoch after the first: (last epoch line - first epoch line) / (epochs - 1),
  both tools' epoch lines timestamped by this script as they arrive;
- final validation energy MAE (meV/atom) and force MAE (meV/Å): mtt's ``train.csv``,
  pl_mtt's ``metrics.csv``;
- peak memory: the maximum resident set size of the process (``wait4``).

The results go to ``benchmarks/RESULTS.md`` (section "metatrain head to head"), replacing
that section only. The machine's load is written with them: on a shared machine the
ratios of one run, not the absolute times, are what to compare.
"""

from __future__ import annotations

import argparse
import csv
import os
import re
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
RESULTS = HERE / "RESULTS.md"
SECTION = "## metatrain head to head"

STANDALONE = True  # not a side-by-side `cases()` module: run_all.py leaves it out

MODELS = {
    "soap_bpnn": {},  # metatrain's defaults
    "pet": {  # a small PET
        "cutoff": 4.5,
        "d_pet": 32,
        "d_head": 32,
        "d_node": 64,
        "d_feedforward": 64,
        "num_heads": 2,
        "num_attention_layers": 1,
        "num_gnn_layers": 2,
    },
}
NOTES = """Where the time of an epoch goes (cProfile of both tools on the same data): in
both, the architecture's own forward pass, the forces and stress by autograd with
`create_graph` and the backward pass through them take almost all of a step: the same
metatrain code at the same cost. A pl_mtt SOAP-BPNN training step of 8 structures on
one quiet core: 168 ms, of which 66 ms the model's forward with its forces and stress
(about 3 ms of it building the strained systems and pair vectors), 97 ms the backward,
and about 5 ms everything else (pl_mtt's pipeline, loss and metrics, Lightning's loop).
`mtt train` adds its collate function, which for every batch converts the systems to
ase, recomputes their neighbour lists, removes the composition baseline and the scales
from the targets, and for PET applies random rotations: about 35-55 ms per batch of 8
(14-17 % of an epoch in the quiet run). pl_mtt attaches the neighbour lists once per
structure and reuses them in every epoch, so its epoch is shorter by about that share;
the ratio cannot go much below 1 - (mtt's collate share), because what is left is the
architecture's own step in both tools. pl_mtt's time to the first epoch includes Hydra,
Lightning, building the model and its one-pass scale fit; mtt's its own imports and
fits. The validation MAEs agree within a few per cent (the runs differ in PET's random
rotations, which pl_mtt does not apply, and in the order of floating-point reductions).
"""

EPOCH_LINES = {
    "mtt": re.compile(r"Epoch:\s+(\d+) \|"),
    "pl_mtt": re.compile(r"\]\[pl_mtt\]\[INFO\] - Epoch (\d+) \|"),
}


@dataclass
class Run:
    """One training process and what was measured on it."""

    tool: str
    architecture: str
    epoch_times: list[float] = field(default_factory=list)
    seconds: float = 0.0
    peak_rss_bytes: int = 0
    energy_mae: float = float("nan")  # meV/atom
    forces_mae: float = float("nan")  # meV/Å
    returncode: int = 0
    output: list[str] = field(default_factory=list)

    @property
    def first_epoch(self) -> float:
        return self.epoch_times[0] if self.epoch_times else float("nan")

    @property
    def per_epoch(self) -> float:
        times = self.epoch_times
        return (times[-1] - times[0]) / (len(times) - 1) if len(times) > 1 else float("nan")


def write_inputs(
    directory: Path, n_structures: int, epochs: int, batch_size: int, seed: int = 0
) -> dict[str, Path]:
    """The extxyz file, the split's index files and one options file per architecture."""
    sys.path.insert(0, str(ROOT))
    import ase.io
    import numpy as np

    from pl_mtt.data import embedded_dataset, write_indices

    directory.mkdir(parents=True, exist_ok=True)
    data = embedded_dataset("emt", n_structures=n_structures)
    ase.io.write(directory / "emt.xyz", ase.io.read(data.path, index=":"), format="extxyz")
    order = np.random.default_rng(seed).permutation(n_structures).tolist()
    n_val = max(1, n_structures // 10)
    write_indices(directory / "training.txt", sorted(order[n_val:]))
    write_indices(directory / "validation.txt", sorted(order[:n_val]))
    paths = {}
    for name, hypers in MODELS.items():
        options = {
            "seed": seed,
            "device": "cpu",
            "base_precision": 32,
            "final_eval": False,
            "architecture": {
                "name": name,
                "model": hypers,
                "training": {
                    "batch_size": batch_size,
                    "num_epochs": epochs,
                    "num_workers": 0,
                    "log_interval": 1,
                    "checkpoint_interval": 10 * epochs,
                    "log_mae": True,
                },
            },
            "training_set": {
                "systems": {"read_from": "emt.xyz", "length_unit": "angstrom"},
                "targets": {
                    "energy": {"key": "energy", "unit": "eV", "forces": True, "stress": True}
                },
                "indices": "training.txt",
            },
            "validation_set": {"indices": "validation.txt"},
            "test_set": 0.0,
        }
        paths[name] = directory / f"options_{name}.yaml"
        paths[name].write_text(yaml.safe_dump(options, sort_keys=False))
    return paths


def _command(tool: str, options: Path) -> list[str]:
    if tool == "mtt":
        mtt = Path(sys.executable).with_name("mtt")
        return [str(mtt), "train", str(options), "-o", "model.pt"]
    overrides = ["trainer.enable_progress_bar=false", "trainer.enable_model_summary=false"]
    return [sys.executable, "-m", "pl_mtt.train", f"options={options}", *overrides]


def start(tool: str, architecture: str, options: Path, workdir: Path) -> tuple[Run, Any]:
    """Start one tool in its own process (one thread); its epoch lines are timestamped
    as they arrive. Returns the run and a function that waits for the end."""
    cwd = workdir / f"{tool}_{architecture}"
    cwd.mkdir(parents=True, exist_ok=True)
    (cwd / options.name).write_text(options.read_text())
    for name in ("emt.xyz", "training.txt", "validation.txt"):
        target = cwd / name
        if not target.exists():
            target.symlink_to(workdir / name)
    env = {
        **os.environ,
        "OMP_NUM_THREADS": "1",
        "MKL_NUM_THREADS": "1",
        "PYTHONUNBUFFERED": "1",
        "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")]),
    }
    run = Run(tool, architecture)
    pattern = EPOCH_LINES[tool]
    start = time.perf_counter()
    process = subprocess.Popen(
        _command(tool, cwd / options.name),
        cwd=cwd,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )

    def read() -> None:
        for line in process.stdout:
            if pattern.search(line):
                run.epoch_times.append(time.perf_counter() - start)
            run.output.append(line)

    reader = threading.Thread(target=read, daemon=True)
    reader.start()

    def finish() -> Run:
        _, status, usage = os.wait4(process.pid, 0)
        run.seconds = time.perf_counter() - start
        reader.join()
        run.returncode = os.waitstatus_to_exitcode(status)
        process.returncode = run.returncode
        run.peak_rss_bytes = usage.ru_maxrss * 1024  # Linux: KiB
        if run.returncode == 0:
            run.energy_mae, run.forces_mae = _final_mae(tool, cwd)
        return run

    return run, finish


def train_pair(architecture: str, options: Path, workdir: Path, concurrent: bool) -> list[Run]:
    """``mtt train`` and pl_mtt on the same options file: at the same time (each on its
    own core, so that both see the same machine load) or one after the other."""
    if not concurrent:
        return [start(tool, architecture, options, workdir)[1]() for tool in ("mtt", "pl_mtt")]
    started = [start(tool, architecture, options, workdir) for tool in ("mtt", "pl_mtt")]
    return [finish() for _, finish in started]


def _last_row(path: Path, skip_units: bool) -> dict[str, str]:
    with open(path, newline="") as handle:
        rows = list(csv.DictReader(handle))
    rows = rows[1:] if skip_units else rows
    return rows[-1]


def _final_mae(tool: str, cwd: Path) -> tuple[float, float]:
    """Final validation energy (meV/atom) and force (meV/Å) MAE."""
    if tool == "mtt":
        (path,) = cwd.glob("outputs/*/*/train.csv")
        row = _last_row(path, skip_units=True)  # second header row: units (meV, meV/A)
        return (
            float(row["validation energy MAE (per atom)"]),
            float(row["validation forces MAE"]),
        )
    (path,) = cwd.glob("outputs/*/*/metrics.csv")
    with open(path, newline="") as handle:
        rows = list(csv.DictReader(handle))
    energy = [r["val/energy_per_atom/MAE"] for r in rows if r.get("val/energy_per_atom/MAE")]
    forces = [r["val/forces/MAE"] for r in rows if r.get("val/forces/MAE")]
    return 1000 * float(energy[-1]), 1000 * float(forces[-1])


def _ratio(ours: float, theirs: float) -> str:
    return f"{ours / theirs:.2f}" if theirs and theirs == theirs else "n/a"


def report(runs: list[Run], arguments: argparse.Namespace, load: tuple[float, ...]) -> str:
    lines = [
        SECTION,
        "",
        f"Produced by `python benchmarks/bench_metatrain.py --structures {arguments.structures} "
        f"--epochs {arguments.epochs} --batch-size {arguments.batch_size}` on "
        f"{time.strftime('%Y-%m-%d')}: EMT Cu/Au, energy + forces + stress, "
        f"{arguments.structures // 10} validation structures, float32, one thread per "
        f"process, {'both tools at once' if arguments.concurrent else 'one tool at a time'}, "
        f"load average before the run {load[0]:.1f} (1 min) on {os.cpu_count()} cores.",
        "",
        "| architecture | tool | time to 1st epoch | s/epoch after the 1st | val energy MAE "
        "(meV/atom) | val force MAE (meV/Å) | peak memory |",
        "|---|---|---|---|---|---|---|",
    ]
    for run in runs:
        lines.append(
            f"| {run.architecture} | {run.tool} | {run.first_epoch:.1f} s | "
            f"{run.per_epoch:.2f} s | {run.energy_mae:.2f} | {run.forces_mae:.1f} | "
            f"{run.peak_rss_bytes / 2**20:.0f} MiB |"
        )
    lines += ["", "pl_mtt / mtt:", ""]
    lines.append(
        "| architecture | epoch time | time to 1st epoch | energy MAE | force MAE | memory |"
    )
    lines.append("|---|---|---|---|---|---|")
    by_key = {(r.architecture, r.tool): r for r in runs}
    for architecture in dict.fromkeys(r.architecture for r in runs):
        ours, theirs = by_key.get((architecture, "pl_mtt")), by_key.get((architecture, "mtt"))
        if ours is None or theirs is None:
            continue
        lines.append(
            f"| {architecture} | {_ratio(ours.per_epoch, theirs.per_epoch)} | "
            f"{_ratio(ours.first_epoch, theirs.first_epoch)} | "
            f"{_ratio(ours.energy_mae, theirs.energy_mae)} | "
            f"{_ratio(ours.forces_mae, theirs.forces_mae)} | "
            f"{_ratio(ours.peak_rss_bytes, theirs.peak_rss_bytes)} |"
        )
    lines += ["", "Goals: MAE ratios <= 1.1 at equal epochs, epoch-time ratio <= 0.8.", "", NOTES]
    return "\n".join(lines)


def write_section(text: str) -> None:
    """Replace (or append) this benchmark's section of RESULTS.md."""
    existing = RESULTS.read_text() if RESULTS.exists() else "# Benchmarks\n"
    parts = re.split(r"(?m)^(?=## )", existing)
    kept = [p for p in parts if not p.startswith(SECTION)]
    RESULTS.write_text("".join(p.rstrip() + "\n\n" for p in kept).rstrip() + "\n\n" + text)


def quick_check(directory: Path) -> dict[str, Path]:
    """What the test suite runs: the inputs of a tiny job, checked by both metatrain's
    validator and pl_mtt's reading of the options files (no training)."""
    import importlib

    from omegaconf import OmegaConf

    from pl_mtt.interop import translate_options

    pydantic = importlib.import_module("metatrain.utils.pydantic")
    paths = write_inputs(directory, 12, 2, 4)
    cwd = os.getcwd()
    os.chdir(directory)
    try:
        for path in paths.values():
            pydantic.validate_base_options(OmegaConf.to_container(OmegaConf.load(path)))
            translation = translate_options(path.name, list(MODELS))
            assert translation.config["trainer"]["max_epochs"] == 2
    finally:
        os.chdir(cwd)
    return paths


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--structures", type=int, default=300)
    parser.add_argument("--epochs", type=int, default=8)
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--architectures", nargs="+", default=list(MODELS), choices=list(MODELS))
    parser.add_argument("--quick", action="store_true", help="40 structures, 3 epochs, no file")
    parser.add_argument(
        "--sequential",
        dest="concurrent",
        action="store_false",
        help="one tool after the other (default: both at once, one core each)",
    )
    parser.add_argument("--workdir", type=Path, default=None, help="keep the runs here")
    arguments = parser.parse_args()
    if arguments.quick:
        arguments.structures, arguments.epochs = 40, 3
    load = os.getloadavg()
    with tempfile.TemporaryDirectory() as scratch:
        workdir = arguments.workdir or Path(scratch)
        paths = write_inputs(workdir, arguments.structures, arguments.epochs, arguments.batch_size)
        runs = []
        for architecture in arguments.architectures:
            pair = train_pair(architecture, paths[architecture], workdir, arguments.concurrent)
            for run in pair:
                tool = run.tool
                print(
                    f"{architecture} / {tool}: {run.seconds:.0f} s, {len(run.epoch_times)} "
                    f"epochs, first {run.first_epoch:.1f} s, then {run.per_epoch:.2f} s/epoch, "
                    f"val MAE {run.energy_mae:.2f} meV/atom, {run.forces_mae:.1f} meV/Å",
                    flush=True,
                )
                if run.returncode != 0:
                    print("".join(run.output[-40:]), file=sys.stderr)
                    raise SystemExit(f"{tool} failed on {architecture} ({run.returncode})")
                runs.append(run)
    text = report(runs, arguments, load)
    print(text)
    if not arguments.quick:
        write_section(text)
        print(f"wrote {RESULTS}")


if __name__ == "__main__":
    main()
