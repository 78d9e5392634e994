"""Batching against a naive collate.

.. code-block:: bash

    python benchmarks/bench_data.py [--quick] [--device cuda]

- ``collate``: ``pl_mtt.data.collate`` (tensor concatenation, a loop over the structures
  of the batch only) against a naive collate that builds every sample row of every atom
  in Python.
"""

from __future__ import annotations

import sys
import tempfile
from pathlib import Path

import torch
from metatensor.torch import Labels, TensorBlock, TensorMap
from metatomic.torch import System

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from harness import Case, main_for

from pl_mtt.data import AtomisticDataset, collate, embedded_dataset


def naive_join(tensor_maps: list[TensorMap]) -> TensorMap:
    """Per-atom Python loops: one sample row at a time (the straightforward collate)."""
    blocks = []
    for block_id in range(len(tensor_maps[0].keys)):
        parts = [t.block_by_id(block_id) for t in tensor_maps]
        rows, values = [], []
        for position, block in enumerate(parts):
            names = block.samples.names
            for row in block.samples.values.tolist():
                row = list(row)
                row[names.index("system")] = position
                rows.append(row)
            values.append(block.values)
        first = parts[0]
        joined = TensorBlock(
            torch.cat(values),
            Labels(first.samples.names, torch.tensor(rows)),
            first.components,
            first.properties,
        )
        offset = 0
        for name in first.gradients_list():
            g_rows, g_values, offset = [], [], 0
            for position, block in enumerate(parts):
                gradient = block.gradient(name)
                names = gradient.samples.names
                for row in gradient.samples.values.tolist():
                    row = list(row)
                    row[0] += offset
                    if "system" in names:
                        row[names.index("system")] = position
                    g_rows.append(row)
                g_values.append(gradient.values)
                offset += len(block.samples)
            joined.add_gradient(
                name,
                TensorBlock(
                    torch.cat(g_values),
                    Labels(names, torch.tensor(g_rows)),
                    first.gradient(name).components,
                    first.properties,
                ),
            )
        blocks.append(joined)
    return TensorMap(tensor_maps[0].keys, blocks)


def naive_collate(items):
    systems = [item[0] for item in items]
    targets = {name: naive_join([item[1][name] for item in items]) for name in items[0][1]}
    return systems, targets, {}


def random_items(n_structures: int, n_atoms: int) -> list:
    """Per-structure energy targets with forces and strain gradients (random values)."""
    from pl_mtt.data import structure_tensor_map
    from pl_mtt.data.layout import property_labels

    properties = property_labels(1, energy_like=True)
    items = []
    for _ in range(n_structures):
        system = System(
            torch.full((n_atoms,), 29, dtype=torch.int32),
            torch.rand(n_atoms, 3, dtype=torch.float64) * 10,
            torch.eye(3, dtype=torch.float64) * 10,
            torch.ones(3, dtype=torch.bool),
        )
        target = structure_tensor_map(
            torch.rand(1, 1, dtype=torch.float64),
            properties,
            positions_gradient=torch.rand(n_atoms, 3, 1, dtype=torch.float64),
            strain_gradient=torch.rand(3, 3, 1, dtype=torch.float64),
        )
        items.append((system, {"energy": target}, {}))
    return items


def cases(device: torch.device, quick: bool) -> list[Case]:
    torch.manual_seed(0)
    with tempfile.TemporaryDirectory() as directory:
        data = embedded_dataset("emt", n_structures=64, directory=directory)
        dataset = AtomisticDataset.from_file(data.path, data.targets)
    result = []
    batches = {"emt, 8 structures (8-32 atoms)": [dataset[i] for i in range(8)]}
    if not quick:
        batches["emt, 32 structures (8-32 atoms)"] = [dataset[i] for i in range(32)]
        batches["32 structures of 256 atoms"] = random_items(32, 256)
    for name, items in batches.items():
        result.append(
            Case(
                "collate",
                f"{name}, energy+forces+stress",
                lambda items=items: naive_collate(items),
                lambda items=items: collate(items),
                target="per-atom loop removed",
                repeats=5 if quick else 20,
            )
        )

    return result


if __name__ == "__main__":
    main_for(cases, "Data batching")
