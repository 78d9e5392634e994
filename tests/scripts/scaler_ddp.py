"""Fit the scales in a real Lightning Trainer (optionally DDP on CPU) and save each rank's view.

    python scaler_ddp.py OUT_DIR [--devices 2] [--n 31] [--ckpt-path CKPT] [--save CKPT]

Writes ``OUT_DIR/rank<r>.pt`` with the scaler and composition state dicts, the number of
structures this rank saw in the fit pass (-1 when it did not fit) and the training steps.
"""

from __future__ import annotations

import argparse
import os
import sys
import warnings

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import lightning.pytorch as pl
import torch
from scaler_lightning import DataModule, Task, make_structures

from pl_mtt.training.callbacks import ScalerCallback


def _tensors(state: dict) -> dict:
    return {k: v.cpu() for k, v in state.items() if isinstance(v, torch.Tensor)}


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("out_dir")
    parser.add_argument("--devices", type=int, default=1)
    parser.add_argument("--n", type=int, default=31)
    parser.add_argument("--ckpt-path", default=None)
    parser.add_argument("--save", default=None)
    parser.add_argument("--max-steps", type=int, default=2)
    args = parser.parse_args()
    warnings.filterwarnings("ignore")
    torch.set_num_threads(1)

    callback = ScalerCallback()
    task = Task()
    trainer = pl.Trainer(
        accelerator="cpu",
        devices=args.devices,
        strategy="ddp" if args.devices > 1 else "auto",
        max_steps=args.max_steps,
        logger=False,
        enable_checkpointing=False,
        enable_model_summary=False,
        enable_progress_bar=False,
        callbacks=[callback],
    )
    data = DataModule(make_structures(args.n, seed=3), batch_size=4)
    trainer.fit(task, datamodule=data, ckpt_path=args.ckpt_path)
    if args.save:
        trainer.save_checkpoint(args.save)
    rank = trainer.global_rank
    os.makedirs(args.out_dir, exist_ok=True)
    torch.save(
        {
            "scaler": _tensors(task.scaler.state_dict()),
            "composition": _tensors(task.composition.state_dict()),
            "structures": -1 if callback.summary is None else callback.summary.local_structures,
            "total": -1 if callback.summary is None else callback.summary.total_structures,
            "world_size": trainer.world_size,
            "loss_has_scaler": task.loss.scaler is task.scaler,
        },
        os.path.join(args.out_dir, f"rank{rank}.pt"),
    )


if __name__ == "__main__":
    main()
