"""Fit the scales on a dataset zip in a real Lightning Trainer (DDP on CPU with gloo).

    python disk_ddp.py DATA.zip OUT_DIR [--devices 2]

Every structure of the zip is in the training split; writes ``OUT_DIR/rank<r>.pt`` with
the scaler and composition state dicts and the number of structures the rank fitted on.
"""

from __future__ import annotations

import argparse
import os
import sys
import warnings

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import lightning.pytorch as pl
import torch
from scaler_lightning import Task

from pl_mtt.data import AtomisticDataModule
from pl_mtt.training.callbacks import ScalerCallback

TARGETS = {
    "energy": {"quantity": "energy", "unit": "eV", "forces": True, "stress": True},
    "mtt::charges": {"key": "charges", "per_atom": True},
}


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("data")
    parser.add_argument("out_dir")
    parser.add_argument("--devices", type=int, default=2)
    args = parser.parse_args()
    warnings.filterwarnings("ignore")
    torch.set_num_threads(1)
    data = AtomisticDataModule(
        dataset=None,
        path=args.data,
        targets=TARGETS,
        val_fraction=0.0,
        test_fraction=0.0,
        batch_size=2,
    )
    callback = ScalerCallback(targets=list(TARGETS))
    task = Task(loss_targets={"energy": {"quantity": "energy"}})
    trainer = pl.Trainer(
        accelerator="cpu",
        devices=args.devices,
        strategy="ddp" if args.devices > 1 else "auto",
        max_steps=1,
        logger=False,
        enable_checkpointing=False,
        enable_model_summary=False,
        enable_progress_bar=False,
        callbacks=[callback],
    )
    trainer.fit(task, datamodule=data)
    os.makedirs(args.out_dir, exist_ok=True)
    torch.save(
        {
            "scaler": {k: v for k, v in task.scaler.state_dict().items() if torch.is_tensor(v)},
            "composition": {
                k: v for k, v in task.composition.state_dict().items() if torch.is_tensor(v)
            },
            "structures": callback.summary.local_structures,
        },
        os.path.join(args.out_dir, f"rank{trainer.global_rank}.pt"),
    )


if __name__ == "__main__":
    main()
