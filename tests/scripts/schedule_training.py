"""A small AtomisticTask run with a loss schedule and batches bounded by atom count,
recording what every step saw (shared by the tests and the DDP script).

    python schedule_training.py OUT_DIR [--devices 2] [--max-epochs 4] [--ckpt-path C]

Writes ``OUT_DIR/rank<r>.pt``: per training step the epoch, the weight of every term,
the loss returned, the unweighted term values, the atoms and the energies (which
identify the structures) of the batch; and the number of training structures.
"""

from __future__ import annotations

import argparse
import os
import sys
import warnings

import lightning.pytorch as pl
import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))))

from pl_mtt import AtomisticTask, LossScheduleCallback, ScalerCallback
from pl_mtt.data import AtomisticDataModule
from pl_mtt.models import RadialMLP

LOSS = {"energy": {"type": "mse", "forces": "mae", "stress": "mse"}}
STAGES = [
    {"epoch": 1, "loss": {"energy": {"weight": 10.0}}},
    {"epoch": 2, "loss": {"energy": {"forces": {"weight": 0.1}}}, "ramp_epochs": 3},
    # ends the ramp above early (its own ramp starts from epoch 2's weights) and
    # rebuilds the stress term as a huber loss
    {"epoch": 3, "loss": {"energy": {"stress": {"type": "huber", "delta": 0.5}}}, "ramp_epochs": 2},
]
# the weights of every epoch, by hand: (energy, forces, stress)
EXPECTED = [
    (1.0, 1.0, 1.0),
    (10.0, 1.0, 1.0),
    (10.0, 1.0 + (0.1 - 1.0) / 3, 1.0),
    (10.0, 0.7 + (0.1 - 0.7) / 2, 1.0),
    (10.0, 0.1, 1.0),
]
MAX_ATOMS = 70


def datamodule(n_structures: int = 20) -> AtomisticDataModule:
    return AtomisticDataModule(
        "emt",
        n_structures=n_structures,
        val_fraction=0.2,
        test_fraction=0.1,
        max_atoms_per_batch=MAX_ATOMS,
    )


def task(targets) -> AtomisticTask:
    torch.manual_seed(0)
    return AtomisticTask(RadialMLP(n_radial=6, hidden=[8]), LOSS, targets, lr=1e-3)


class Recorder(pl.Callback):
    """What each training step used: weights, loss, term values, atoms, energies."""

    def __init__(self) -> None:
        self.steps: list[dict] = []

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        systems, targets, _ = batch
        self.steps.append(
            {
                "epoch": trainer.current_epoch,
                "weights": {n: t.weight for n, t in pl_module.loss.terms.items()},
                "config": pl_module.loss.config,
                "loss": float(outputs["loss"]),
                "terms": {n: float(v) for n, v in pl_module.loss.last_values.items()},
                "atoms": sum(len(s) for s in systems),
                "energies": targets["energy"].block().values.reshape(-1).tolist(),
            }
        )


def trainer(root: str, devices: int, max_epochs: int, recorder: Recorder) -> pl.Trainer:
    checkpoints = pl.callbacks.ModelCheckpoint(
        dirpath=os.path.join(root, "checkpoints"), filename="{epoch}", save_top_k=-1
    )
    return pl.Trainer(
        accelerator="cpu",
        devices=devices,
        strategy="ddp" if devices > 1 else "auto",
        max_epochs=max_epochs,
        inference_mode=False,
        logger=pl.loggers.CSVLogger(root, name="", version=""),
        log_every_n_steps=1,
        enable_progress_bar=False,
        enable_model_summary=False,
        callbacks=[ScalerCallback(), LossScheduleCallback(STAGES), recorder, checkpoints],
    )


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("out_dir")
    parser.add_argument("--devices", type=int, default=1)
    parser.add_argument("--max-epochs", type=int, default=4)
    parser.add_argument("--ckpt-path", default=None)
    args = parser.parse_args()
    warnings.filterwarnings("ignore")
    torch.set_num_threads(1)
    data = datamodule()
    data.setup()
    recorder = Recorder()
    run = trainer(args.out_dir, args.devices, args.max_epochs, recorder)
    run.fit(task(data.target_options), data, ckpt_path=args.ckpt_path)
    out = {"steps": recorder.steps, "n_train": len(data.train_dataset)}
    torch.save(out, os.path.join(args.out_dir, f"rank{run.global_rank}.pt"))


if __name__ == "__main__":
    main()
