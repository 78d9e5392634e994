"""ScalerCallback in real Lightning Trainers: DDP (gloo, 2 CPU processes), checkpoints,
discovery from the data, hand-over to the LossModule, errors."""

from __future__ import annotations

import functools
import sys
import warnings
from pathlib import Path

import lightning.pytorch as pl
import pytest
import torch
from metatensor.torch import Labels, TensorBlock, TensorMap

SCRIPTS = Path(__file__).parent / "scripts"
sys.path.insert(0, str(SCRIPTS))

from scaler_data import collate  # noqa: E402
from scaler_lightning import TYPES, DataModule, StructureDataset, Task, make_structures  # noqa: E402

from pl_mtt.scaling.composition import CompositionModel  # noqa: E402
from pl_mtt.scaling.fit import fit_pass  # noqa: E402
from pl_mtt.scaling.scaler import Scaler  # noqa: E402
from pl_mtt.tensormaps import zero_sample_layout  # noqa: E402
from pl_mtt.training.callbacks import ScalerCallback  # noqa: E402

LOSS_TARGETS = ("energy", "mtt::charge", "mtt::multi")


def _trainer(callback, **kwargs):
    options = {
        "accelerator": "cpu",
        "devices": 1,
        "max_steps": 2,
        "logger": False,
        "enable_checkpointing": False,
        "enable_model_summary": False,
        "enable_progress_bar": False,
        "callbacks": [callback],
    }
    options.update(kwargs)
    return pl.Trainer(**options)


def _single_process_fit(structures):
    data = [collate(structures[i : i + 5], LOSS_TARGETS) for i in range(0, len(structures), 5)]
    layouts = {name: zero_sample_layout(t) for name, t in data[0][1].items()}
    scaler, composition = Scaler(None, layouts), CompositionModel(None, layouts)
    fit_pass(data, scaler, composition)
    return scaler, composition


@pytest.fixture(autouse=True)
def _quiet():
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        yield


@pytest.mark.slow
def test_ddp_two_ranks_identical_and_equal_to_single_process(run_python, tmp_path):
    result = run_python(
        [str(SCRIPTS / "scaler_ddp.py"), str(tmp_path), "--devices", "2", "--n", "31"],
        cwd=tmp_path,
        timeout=300,
    )
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    ranks = [torch.load(tmp_path / f"rank{r}.pt", weights_only=False) for r in (0, 1)]
    assert [r["world_size"] for r in ranks] == [2, 2]
    assert sorted(r["structures"] for r in ranks) == [15, 16]  # strided halves, no padding
    assert [r["total"] for r in ranks] == [31, 31]
    assert all(r["loss_has_scaler"] for r in ranks)
    single_scaler, single_composition = _single_process_fit(make_structures(31, seed=3))
    for part, single in (("scaler", single_scaler), ("composition", single_composition)):
        expected = {k: v for k, v in single.state_dict().items() if isinstance(v, torch.Tensor)}
        assert set(ranks[0][part]) == set(expected)
        for key, value in expected.items():
            assert torch.equal(ranks[0][part][key], ranks[1][part][key]), key  # bit-identical
            if value.is_floating_point():
                torch.testing.assert_close(ranks[0][part][key], value, rtol=1e-12, atol=0)
            else:
                assert torch.equal(ranks[0][part][key], value), key
    assert bool(ranks[0]["scaler"]["fitted"])


def test_fit_discovers_types_layouts_targets_and_hands_over(capsys):
    structures = make_structures(20, seed=1)
    callback = ScalerCallback()
    task = Task()
    trainer = _trainer(callback, enable_progress_bar=True)
    trainer.fit(
        task, datamodule=DataModule(structures, targets=(*LOSS_TARGETS, "mtt::dos", "mtt::pair"))
    )
    assert "Fitting scales" in capsys.readouterr().err
    assert task.loss.scaler is task.scaler
    assert set(task.scaler.targets) == set(LOSS_TARGETS)  # the LossModule's targets only
    assert task.scaler.atomic_types == TYPES
    assert callback.summary.local_structures == 20
    expected, composition = _single_process_fit(structures)
    for name in LOSS_TARGETS:
        for a, b in zip(
            task.scaler.scales[name].blocks(), expected.scales[name].blocks(), strict=True
        ):
            torch.testing.assert_close(a.values, b.values, rtol=1e-12, atol=0)
    torch.testing.assert_close(
        task.composition.weights["energy"].block_by_id(0).values,
        composition.weights["energy"].block_by_id(0).values,
        rtol=1e-12,
        atol=0,
    )
    assert task.steps == 2


def test_dos_targets_from_the_loss_config():
    structures = make_structures(12, seed=2)
    callback = ScalerCallback(atomic_types=TYPES, fixed_scales={"energy": 2.0})
    task = Task(
        loss_targets={"energy": {"quantity": "energy"}, "mtt::dos": {}},
    )
    task.loss.config["mtt::dos"]["type"] = "masked_dos"  # as expand_loss_config writes it
    trainer = _trainer(callback)
    trainer.fit(task, datamodule=DataModule(structures, targets=("energy", "mtt::dos")))
    assert task.scaler.no_per_property_scales == {"mtt::dos"}
    assert task.composition.blocks["mtt::dos"] == []
    assert torch.all(task.scaler.per_property_scales["mtt::dos"].block_by_id(0).values == 1.0)
    values = task.scaler.scales["mtt::dos"].block_by_id(0).values
    assert torch.all(values == values[0, 0])  # one pooled scale
    assert values[0, 0] != 1.0
    assert task.scaler.scales["energy"].block_by_id(0).values.item() == 2.0
    assert task.scaler.atomic_types == TYPES


def test_checkpoint_round_trip_does_not_refit(tmp_path):
    structures = make_structures(16, seed=5)
    data = DataModule(structures)
    first = Task()
    trainer = _trainer(ScalerCallback())
    trainer.fit(first, datamodule=data)
    checkpoint = tmp_path / "last.ckpt"
    trainer.save_checkpoint(checkpoint)
    state = torch.load(checkpoint, weights_only=False)["state_dict"]

    resumed = Task()
    callback = ScalerCallback()
    trainer = _trainer(callback, max_steps=4)
    trainer.fit(resumed, datamodule=data, ckpt_path=checkpoint)
    assert callback.summary is None  # restored, not refitted
    assert set(state) == set(resumed.state_dict())  # no missing / unexpected keys
    for key, value in first.state_dict().items():
        if key.startswith(("scaler.", "composition.")) and isinstance(value, torch.Tensor):
            assert torch.equal(resumed.state_dict()[key], value), key
    assert resumed.loss.scaler is resumed.scaler
    assert resumed.steps == 2  # steps 3 and 4 only

    # a self-describing checkpoint: plain torch.load(weights_only=True) and
    # load_from_checkpoint without any data (Task.on_load_checkpoint calls restore)
    assert torch.load(checkpoint, weights_only=True)["state_dict"].keys() == state.keys()
    loaded = Task.load_from_checkpoint(checkpoint)
    assert loaded.loss.scaler is loaded.scaler
    for key, value in first.state_dict().items():
        if isinstance(value, torch.Tensor):
            assert torch.equal(loaded.state_dict()[key], value), key

    forced = Task()
    callback = ScalerCallback(refit=True)
    _trainer(callback, max_steps=4).fit(forced, datamodule=data, ckpt_path=checkpoint)
    assert callback.summary is not None
    assert callback.summary.local_structures == 16


def test_custom_batches_and_errors():
    structures = make_structures(8, seed=6)

    def as_dict(items):
        systems, targets, extra = collate(items, LOSS_TARGETS)
        return {"systems": systems, "targets": targets, "extra": extra}

    class DictTask(Task):
        def training_step(self, batch, index):
            return super().training_step((batch["systems"], batch["targets"], {}), index)

    loader = torch.utils.data.DataLoader(
        StructureDataset(structures), batch_size=4, collate_fn=as_dict
    )
    with pytest.raises(ValueError, match="cannot unpack a training batch of type dict"):
        _trainer(ScalerCallback()).fit(DictTask(), train_dataloaders=loader)

    callback = ScalerCallback(
        unpack_batch=lambda b: (b["systems"], b["targets"], b["extra"]), composition=False
    )
    task = DictTask()
    _trainer(callback).fit(task, train_dataloaders=loader)
    assert callback.summary.local_structures == 8
    assert task.composition is None
    assert bool(task.scaler.fitted)

    bad_loader = torch.utils.data.DataLoader(
        StructureDataset(structures),
        batch_size=4,
        collate_fn=functools.partial(_bad_layout_batch),
    )
    with pytest.raises(ValueError, match="target 'energy': unsupported sample layout"):
        _trainer(ScalerCallback()).fit(Task(), train_dataloaders=bad_loader)

    trainer = _trainer(ScalerCallback())
    with pytest.raises(ValueError, match="the trainer has no train dataloader"):
        ScalerCallback().setup(trainer, Task(), "fit")


def _bad_layout_batch(items):
    systems, targets, extra = collate(items, LOSS_TARGETS)
    block = targets["energy"].block_by_id(0)
    targets["energy"] = TensorMap(
        Labels.single(),
        [
            TensorBlock(
                block.values,
                Labels(["structure"], block.samples.values),
                [],
                block.properties,
            )
        ],
    )
    return systems, targets, extra
