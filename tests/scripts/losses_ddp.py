"""Two-process gloo DDP check of ``LossModule(global_mean=True)``.

Each step draws one global batch; rank 0 gets its first systems and rank 1 the rest
(uneven sizes), and in step 1 rank 1 has no ``mtt::dipole`` at all. After DDP's gradient
averaging, the gradient must equal the single-process gradient of a plain LossModule
on the union of both ranks' batches; the epoch aggregates of ``compute()`` must be the
global ones. The same again with sample weights (per structure on the energy, per atom
on the forces): the global mean is then sum w l / sum w over both ranks. Prints ``DDP
global mean OK`` on success.

    python tests/scripts/losses_ddp.py
"""

from __future__ import annotations

import os
import socket
import sys
from pathlib import Path
from queue import Empty

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from metatensor.torch import TensorMap

from pl_mtt.loss_module import LossModule
from tests.scripts.losses_data import (
    atom_weights,
    energy_map,
    random_weights,
    structure_weights,
    systems_for,
    with_nans,
)

N_FEATURES = 4
TARGETS = {"energy": {"quantity": "energy", "forces": True}, "mtt::dipole": {}}
LOSS = {
    "energy": {"type": "mse", "forces": {"type": "mae", "weight": 0.5}},
    "mtt::dipole": {"type": "huber", "weight": 0.3, "reduction": "sum", "delta": 0.5},
}
WEIGHTED_LOSS = {
    "energy": {
        "type": "mse",
        "sample_weights": "structure_weight",
        "forces": {
            "type": "mae",
            "weight": 0.5,
            "sample_weights": "atom_weight",
            "type_weights": {1: 0.5, 8: 3.0},
        },
    },
    "mtt::dipole": LOSS["mtt::dipole"],
}
LOSSES = {"plain": LOSS, "weighted": WEIGHTED_LOSS}
# per step: atoms per system of the global batch, systems of rank 0, dipole on rank 1
STEPS = [([3, 5, 2, 4], 3, True), ([2, 6, 3, 1, 4, 2], 2, False)]


class Model(torch.nn.Module):
    """Per-atom features -> energy (sum over atoms), forces, dipole (sum over atoms)."""

    def __init__(self) -> None:
        super().__init__()
        generator = torch.Generator().manual_seed(0)
        self.energy = torch.nn.Parameter(torch.randn(N_FEATURES, 1, generator=generator))
        self.forces = torch.nn.Parameter(torch.randn(N_FEATURES, 3, generator=generator))
        self.dipole = torch.nn.Parameter(torch.randn(N_FEATURES, 3, generator=generator))

    def forward(self, features, system, n_systems: int, with_dipole: bool):
        def per_system(per_atom):
            return torch.zeros(n_systems, per_atom.shape[1], dtype=per_atom.dtype).index_add(
                0, system, per_atom
            )

        outputs = [per_system(features @ self.energy), (features @ self.forces).unsqueeze(-1)]
        if with_dipole:
            outputs.append(per_system(features @ self.dipole))
        return outputs


def global_batch(step: int):
    n_atoms, _, _ = STEPS[step]
    generator = torch.Generator().manual_seed(100 + step)
    n_systems, total = len(n_atoms), sum(n_atoms)
    features = torch.randn(total, N_FEATURES, generator=generator, dtype=torch.float64)
    energy = torch.randn(n_systems, 1, generator=generator, dtype=torch.float64)
    forces = torch.randn(total, 3, 1, generator=generator, dtype=torch.float64)
    dipole = torch.randn(n_systems, 3, generator=generator, dtype=torch.float64)
    energy_target = with_nans(energy_map(energy, n_atoms, forces), generator, 0.2)
    dipole_target = with_nans(energy_map(dipole, n_atoms), generator, 0.2)
    weights = (random_weights((n_systems,), generator), random_weights((total,), generator))
    systems = systems_for(n_atoms, generator)  # their atomic types, for type_weights
    return n_atoms, features, energy_target, dipole_target, (*weights, systems)


def select(tensor_map: TensorMap, systems: list[int], n_atoms: list[int]) -> TensorMap:
    """The rows of ``systems`` (renumbered from 0), gradients included."""
    block = tensor_map.block_by_id(0)
    atom_start = [sum(n_atoms[:s]) for s in range(len(n_atoms))]
    values = block.values[systems]
    local_atoms = [n_atoms[s] for s in systems]
    forces = None
    if "positions" in block.gradients_list():
        rows = [atom_start[s] + a for s in systems for a in range(n_atoms[s])]
        forces = block.gradient("positions").values[rows]
    return energy_map(values, local_atoms, forces, properties=block.properties)


def batch_for(step: int, rank: int | None):
    """Inputs and targets of a rank, or of the union of both ranks (``rank=None``).

    Returns (features, system index of each atom, number of systems, atoms per system,
    targets, local indices of the systems that have a dipole target, extra_data with
    the sample weights).
    """
    n_atoms, features, energy_target, dipole_target, weights = global_batch(step)
    _, split, rank1_dipole = STEPS[step]
    owner = [0 if s < split else 1 for s in range(len(n_atoms))]
    systems = [s for s in range(len(n_atoms)) if rank is None or owner[s] == rank]
    atom_start = [sum(n_atoms[:s]) for s in range(len(n_atoms))]
    rows = [atom_start[s] + a for s in systems for a in range(n_atoms[s])]
    local_atoms = [n_atoms[s] for s in systems]
    system_index = torch.tensor([i for i, n in enumerate(local_atoms) for _ in range(n)])
    targets = {"energy": select(energy_target, systems, n_atoms)}
    with_dipole = [i for i, s in enumerate(systems) if owner[s] == 0 or rank1_dipole]
    if with_dipole:
        dipole_systems = [systems[i] for i in with_dipole]
        targets["mtt::dipole"] = select(dipole_target, dipole_systems, n_atoms)
    extra = {
        "structure_weight": structure_weights(weights[0][systems]),
        "atom_weight": atom_weights(weights[1][rows], local_atoms),
    }
    structures = [weights[2][s] for s in systems]
    return (
        features[rows],
        system_index,
        len(systems),
        local_atoms,
        targets,
        with_dipole,
        (extra, structures),
    )


def predictions_from(outputs, targets, local_atoms, with_dipole):
    energy, forces = outputs[0], outputs[1]
    predictions = {"energy": energy_map(energy, local_atoms, forces)}
    if with_dipole:
        properties = targets["mtt::dipole"].block_by_id(0).properties
        dipole_atoms = [local_atoms[i] for i in with_dipole]
        predictions["mtt::dipole"] = energy_map(
            outputs[2][with_dipole], dipole_atoms, properties=properties
        )
    return predictions


def gradients_of(model: torch.nn.Module) -> list[torch.Tensor]:
    return [
        torch.zeros_like(p) if p.grad is None else p.grad.detach().clone()
        for p in model.parameters()
    ]


def run_steps(model: torch.nn.Module, module: LossModule, rank: int | None):
    """Every step on ``rank``'s batches (all of them when None): the parameter gradients
    of each step (of the wrapped model under DDP)."""
    parameters = getattr(model, "module", model)
    gradients = []
    for step in range(len(STEPS)):
        model.zero_grad()
        features, system, n_systems, atoms, targets, dipole, extra = batch_for(step, rank)
        outputs = model(features, system, n_systems, bool(dipole))
        predictions = predictions_from(outputs, targets, atoms, dipole)
        module(predictions, targets, *extra).backward()
        gradients.append(gradients_of(parameters))
    return gradients


def single_process_reference(loss):
    module = LossModule(loss, TARGETS)
    return run_steps(Model().double(), module, None), module.compute()


def worker(rank: int, world_size: int, port: int, queue) -> None:
    os.environ["MASTER_ADDR"] = "127.0.0.1"
    os.environ["MASTER_PORT"] = str(port)
    dist.init_process_group("gloo", rank=rank, world_size=world_size)
    results = {}
    try:
        for loss_name, loss in LOSSES.items():
            model = torch.nn.parallel.DistributedDataParallel(
                Model().double(), find_unused_parameters=True
            )
            module = LossModule(loss, TARGETS, global_mean=True)
            gradients = run_steps(model, module, rank)
            epoch = module.compute()
            batches = module.aggregate.batches.clone()
            # plain Python values: tensors sent through a queue outlive their process badly
            plain = [[g.tolist() for g in step] for step in gradients]
            epoch_values = {k: v.item() for k, v in epoch.items()}
            results[loss_name] = (plain, epoch_values, batches.tolist())
    finally:
        dist.destroy_process_group()
    queue.put((rank, results))  # one message per process, once the group is gone


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def next_result(queue, processes, timeout: float = 240.0):
    """The next worker's result; stops at once when a worker has died instead."""
    for _ in range(int(timeout)):
        try:
            return queue.get(timeout=1.0)
        except Empty:
            failed = [p.exitcode for p in processes if p.exitcode not in (None, 0)]
            if failed:
                raise SystemExit(f"a DDP worker failed with exit code {failed[0]}") from None
    raise SystemExit(f"no result from the DDP workers within {timeout:.0f} s")


def main() -> None:
    torch.set_num_threads(1)
    context = mp.get_context("spawn")
    queue = context.Queue()
    processes = [
        context.Process(target=worker, args=(rank, 2, free_port_value, queue))
        for free_port_value in [free_port()]
        for rank in range(2)
    ]
    for process in processes:
        process.start()
    results = {name: {} for name in LOSSES}
    for _ in processes:
        rank, by_loss = next_result(queue, processes)
        for loss_name, (plain, epoch, batches) in by_loss.items():
            gradients = [[torch.tensor(g, dtype=torch.float64) for g in step] for step in plain]
            results[loss_name][rank] = (gradients, epoch, batches)
    for process in processes:
        process.join(timeout=60)
        if process.exitcode != 0:
            raise SystemExit(f"a DDP worker failed with exit code {process.exitcode}")
    for loss_name, loss in LOSSES.items():
        check(loss_name, results[loss_name], *single_process_reference(loss))
    print("DDP global mean OK")


def check(loss_name: str, results: dict, expected_gradients, expected_epoch) -> None:
    if os.environ.get("LOSSES_DDP_DEBUG"):
        for rank, (gradients, _, _) in sorted(results.items()):
            for step, (a, b) in enumerate(zip(gradients, expected_gradients, strict=True)):
                print(rank, step, [float((x - y).abs().max()) for x, y in zip(a, b, strict=True)])
    for rank, (gradients, epoch, _) in results.items():
        for step, (got_step, expected_step) in enumerate(
            zip(gradients, expected_gradients, strict=True)
        ):
            for got, expected in zip(got_step, expected_step, strict=True):
                torch.testing.assert_close(
                    got,
                    expected,
                    rtol=1e-12,
                    atol=1e-12,
                    msg=lambda m, rank=rank, step=step: (
                        f"{loss_name}, rank {rank}, step {step}: {m}"
                    ),
                )
            assert any(g.abs().sum() > 0 for g in got_step)
        # mean terms: global sum / global count over the epoch, as single-process
        for name in ("energy", "energy/forces"):
            assert abs(epoch[name] - expected_epoch[name].item()) < 1e-12, (loss_name, name, epoch)
        # sum term: global sum / number of batches that had the term (2 + 1 here, the
        # single process saw the same sum in 2 batches)
        expected_dipole = expected_epoch["mtt::dipole"].item() * 2 / 3
        assert abs(epoch["mtt::dipole"] - expected_dipole) < 1e-12, epoch
    assert results[1][2] == [2.0, 2.0, 1.0]  # local batch counts: rank 1 missed a dipole


if __name__ == "__main__":
    main()
