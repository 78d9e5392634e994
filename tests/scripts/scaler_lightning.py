"""A tiny Lightning task and data module on the synthetic data of ``scaler_data``."""

from __future__ import annotations

import functools

import lightning.pytorch as pl
import torch
from scaler_data import collate, random_structures

from pl_mtt import scaling
from pl_mtt.loss_module import LossModule
from pl_mtt.training.callbacks import ScalerCallback

TARGETS = ("energy", "mtt::charge", "mtt::multi")
TYPES = [1, 6, 8]


class StructureDataset(torch.utils.data.Dataset):
    def __init__(self, structures):
        self.structures = structures

    def __len__(self):
        return len(self.structures)

    def __getitem__(self, index):
        return self.structures[index]


def make_structures(n: int = 30, seed: int = 0, **kwargs):
    kwargs.setdefault("nan_fraction", 0.05)
    kwargs.setdefault("mask_fraction", 0.1)
    return random_structures(n, TYPES, seed=seed, **kwargs)


class DataModule(pl.LightningDataModule):
    def __init__(self, structures, batch_size: int = 4, targets=TARGETS):
        super().__init__()
        self.structures = structures
        self.batch_size = batch_size
        self.targets = targets

    def train_dataloader(self):
        return torch.utils.data.DataLoader(
            StructureDataset(self.structures),
            batch_size=self.batch_size,
            shuffle=True,
            collate_fn=functools.partial(collate, targets=self.targets),
        )


class Task(pl.LightningModule):
    """A model with one parameter; the loss is the MSE of the energy in loss units."""

    def __init__(self, loss_targets=None):
        super().__init__()
        self.weight = torch.nn.Parameter(torch.zeros(1, dtype=torch.float64))
        targets = loss_targets or {
            "energy": {"quantity": "energy"},
            "mtt::charge": {},
            "mtt::multi": {},
        }
        self.loss = LossModule("mse", targets)
        self.steps = 0

    def training_step(self, batch, _):
        systems, targets, _extra = batch
        self.steps += 1
        n = len(systems)
        raw = targets["energy"].block_by_id(0).values.detach() * 0
        predictions = {"energy": _energy_like(targets["energy"], raw + self.weight * n)}
        predictions, targets = scaling.prepare_for_loss(self, systems, predictions, targets)
        p = predictions["energy"].block_by_id(0).values
        t = targets["energy"].block_by_id(0).values
        return ((p - t) ** 2).mean()

    def on_load_checkpoint(self, checkpoint):
        ScalerCallback.restore(self, checkpoint)  # scaler/composition before the weights

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=1e-3)


def _energy_like(tensor, values):
    from metatensor.torch import TensorBlock, TensorMap

    block = tensor.block_by_id(0)
    return TensorMap(
        tensor.keys, [TensorBlock(values, block.samples, block.components, block.properties)]
    )
