"""Loss schedules: merging partial configs, the weights of every epoch (stages, ramps),
LossModule.reconfigure against the loop references, real Trainer runs (logged weights,
resume mid-schedule), two DDP ranks holding the same weights, and the Hydra app."""

from __future__ import annotations

import csv
import re

import pytest
import torch

from pl_mtt import LossModule, LossScheduleCallback
from pl_mtt.config import merge_loss_config
from pl_mtt.training.app import run
from pl_mtt.training.loss_schedule import LossSchedule, parse_stages
from tests.conftest import REPO_ROOT
from tests.scripts import schedule_training
from tests.test_hydra import composed
from tests.test_loss_module import MLIP_TARGETS, WEIGHTED, mlip_batch, weighted_reference

MSE = {"type": "mse", "weight": 1.0, "reduction": "mean"}
HUBER = {"type": "huber", "weight": 1.0, "reduction": "mean", "delta": 1.0}
TERMS = ("energy", "energy/forces", "energy/stress")


@pytest.fixture
def generator():
    return torch.Generator().manual_seed(11)


# --- merging a partial config over the base --------------------------------------------
def test_merge_changes_only_what_the_stage_gives():
    base = {"energy": {"type": "huber", "delta": 0.2, "forces": "mae", "stress": "mse"}}
    merged = merge_loss_config(
        base, {"energy": {"weight": 1000.0, "forces": {"weight": 10.0}}}, MLIP_TARGETS
    )
    assert merged == {
        "energy": {
            **HUBER,
            "delta": 0.2,
            "weight": 1000.0,
            "gradients": {"positions": {**MSE, "type": "mae", "weight": 10.0}, "strain": MSE},
        }
    }


def test_merge_a_new_type_keeps_weight_and_reduction_and_drops_old_parameters():
    base = {
        "energy": {"stress": {"type": "huber", "delta": 0.2, "weight": 0.5, "reduction": "sum"}}
    }
    forms = [  # every form of the grammar for "stress becomes mae"
        {"energy": {"stress": "mae"}},
        {"energy": {"stress": {"type": "mae"}}},
        {"energy": {"gradients": {"strain": "mae"}}},
        {"energy": {"gradients": {"strain": {"type": "mae"}}}},
    ]
    for form in forms:
        merged = merge_loss_config(base, form, MLIP_TARGETS)
        assert merged["energy"]["gradients"]["strain"] == {
            "type": "mae",
            "weight": 0.5,
            "reduction": "sum",
        }, form
        assert merged["energy"]["gradients"]["positions"] == MSE
    # a parameter of the new type is given with it; the same type keeps its parameters
    merged = merge_loss_config(base, {"energy": {"forces": {"type": "huber"}}}, MLIP_TARGETS)
    assert merged["energy"]["gradients"]["positions"] == HUBER
    merged = merge_loss_config(base, {"energy": {"stress": {"weight": 2.0}}}, MLIP_TARGETS)
    assert merged["energy"]["gradients"]["strain"]["delta"] == 0.2


def test_merge_global_shorthand_and_string_targets():
    merged = merge_loss_config({"energy": {"forces": {"weight": 0.1}}}, "mae", MLIP_TARGETS)
    assert merged["energy"]["type"] == "mae"
    assert merged["energy"]["gradients"]["positions"] == {**MSE, "type": "mae", "weight": 0.1}
    merged = merge_loss_config({"energy": {"weight": 3.0}}, {"energy": "mae"}, MLIP_TARGETS)
    assert (merged["energy"]["type"], merged["energy"]["weight"]) == ("mae", 3.0)
    assert merged["energy"]["gradients"]["positions"] == MSE  # not the gradients
    assert (
        merge_loss_config(WEIGHTED, None, MLIP_TARGETS) == LossModule(WEIGHTED, MLIP_TARGETS).config
    )


@pytest.mark.parametrize(
    ("override", "targets", "message"),
    [
        (
            {"forces": "mse"},
            MLIP_TARGETS,
            "loss_schedule[0].loss.forces: 'forces' has no term in the loss, and terms "
            "cannot be added here. Terms exist for: 'energy'.",
        ),
        (
            {"energy": {"stress": "mae"}},
            {"energy": {"quantity": "energy", "forces": True}},
            "loss_schedule[0].loss.energy.stress: target 'energy' has no 'strain' gradient "
            "term in the loss, and terms cannot be added here. Terms of 'energy': energy, "
            "energy/forces",
        ),
        (
            {"energy": {"forces": False}},
            MLIP_TARGETS,
            "loss_schedule[0].loss.energy.forces: a term cannot be removed here (set its "
            "weight to 0.0 instead)",
        ),
        (
            {"energy": {"forces": {"wieght": 2.0}}},
            MLIP_TARGETS,
            "loss_schedule[0].loss.energy.forces.wieght: unknown key 'wieght' for loss type "
            "'mse'. Valid keys: 'type', 'weight', 'reduction', 'sample_weights', "
            "'type_weights'. Did you mean 'weight'?",
        ),
        (
            {"energy": {"forces": {"weight": -1.0}}},
            MLIP_TARGETS,
            "loss_schedule[0].loss.energy.forces.weight: expected a non-negative number, got -1.0",
        ),
        (
            {"energy": {"forces": "masked_dos"}},
            MLIP_TARGETS,
            "loss_schedule[0].loss.energy.forces.type: loss type 'masked_dos' cannot be used "
            "on a gradient; use e.g. 'mse', 'mae' or 'huber'",
        ),
        (
            ["mse"],
            MLIP_TARGETS,
            "loss_schedule[0].loss: expected a loss type name or a mapping of target name -> "
            "loss term, got list ['mse']",
        ),
    ],
)
def test_merge_errors_name_the_key(override, targets, message):
    with pytest.raises(ValueError, match=f"^{re.escape(message)}$"):
        merge_loss_config("mse", override, targets, path="loss_schedule[0].loss")


# --- stages and the weights of every epoch ---------------------------------------------
def test_parse_stages_sorts_and_rejects_bad_stages():
    stages = parse_stages([{"epoch": 5, "loss": "mae"}, {"epoch": 2, "loss": "mse"}])
    assert [(s.epoch, s.path) for s in stages] == [(2, "loss_schedule[1]"), (5, "loss_schedule[0]")]
    bad = [
        ({"epoch": 1, "loss": "mse"}, "loss_schedule: expected a list of stages"),
        ([{"loss": "mse"}], "loss_schedule[0]: missing 'epoch'"),
        ([{"epoch": 1}], "loss_schedule[0]: missing 'loss'"),
        ([{"epoch": -1, "loss": "mse"}], "loss_schedule[0].epoch: expected a non-negative"),
        ([{"epoch": 1.5, "loss": "mse"}], "loss_schedule[0].epoch: expected a non-negative"),
        (
            [{"epoch": 1, "loss": "mse", "ramp": 2}],
            "loss_schedule[0].ramp: unknown key; valid: 'epoch', 'loss', 'ramp_epochs'. Did "
            "you mean 'ramp_epochs'?",
        ),
        (
            [{"epoch": 1, "loss": "mse"}, {"epoch": 1, "loss": "mae"}],
            "loss_schedule[1].epoch: loss_schedule[0] starts at epoch 1 too",
        ),
    ]
    for stages, message in bad:
        with pytest.raises(ValueError, match=f"^{re.escape(message)}"):
            parse_stages(stages)


def test_weights_of_every_epoch_follow_stages_and_ramps():
    """Hand-computed: a ramp over 4 epochs, interrupted by a later ramped stage."""
    schedule = LossSchedule(
        {"energy": {"forces": {"weight": 2.0}}},
        [
            {
                "epoch": 2,
                "loss": {"energy": {"weight": 5.0, "forces": {"weight": 0.0}}},
                "ramp_epochs": 4,
            },
            {"epoch": 4, "loss": {"energy": {"weight": 1.0}}, "ramp_epochs": 2},
            {"epoch": 7, "loss": {"energy": {"stress": {"type": "huber", "weight": 3.0}}}},
        ],
        MLIP_TARGETS,
    )
    expected = {  # energy, forces, stress
        0: (1.0, 2.0, 1.0),
        1: (1.0, 2.0, 1.0),
        2: (2.0, 1.5, 1.0),  # 1/4 of the way from (1, 2) to (5, 0)
        3: (3.0, 1.0, 1.0),  # 2/4
        4: (2.0, 0.5, 1.0),  # 1/2 of the way from epoch 3's (3, 1) to (1, 0)
        5: (1.0, 0.0, 1.0),
        6: (1.0, 0.0, 1.0),
        7: (1.0, 0.0, 3.0),
        100: (1.0, 0.0, 3.0),
    }
    for epoch, weights in expected.items():
        assert schedule.weights_at(epoch) == dict(zip(TERMS, weights, strict=True)), epoch
    assert schedule.config_at(6)["energy"]["gradients"]["strain"] == MSE
    assert schedule.config_at(7)["energy"]["gradients"]["strain"] == {**HUBER, "weight": 3.0}


def test_a_stage_cannot_switch_to_or_from_the_dos_loss():
    dos = {"mtt::dos": {"type": "masked_dos", "extra_targets": 10}}
    message = "loss_schedule[0].loss.mtt::dos.type: a stage cannot change 'masked_dos' to 'mse'"
    with pytest.raises(ValueError, match=f"^{re.escape(message)}"):
        LossSchedule(dos, [{"epoch": 3, "loss": {"mtt::dos": "mse"}}], {"mtt::dos": {}})
    with pytest.raises(ValueError, match="cannot change 'mse' to 'masked_dos'"):
        LossSchedule("mse", [{"epoch": 3, "loss": dos}], {"mtt::dos": {}})


# --- LossModule.reconfigure ------------------------------------------------------------
def test_reconfigure_gives_the_loss_of_the_new_config(generator):
    module = LossModule(WEIGHTED, MLIP_TARGETS)
    first = mlip_batch([3, 5, 4], generator)
    module(*first)  # a step (and cached step constants) with the old weights
    new = merge_loss_config(
        WEIGHTED, {"energy": {"weight": 7.0, "stress": {"weight": 0.25}}}, MLIP_TARGETS
    )
    assert module.reconfigure(new) == []  # weights only: nothing rebuilt
    assert module.config == new
    predictions, targets = mlip_batch([2, 6], generator)
    _, expected = weighted_reference(new, predictions, targets)
    assert module(predictions, targets).item() == pytest.approx(expected, rel=1e-10)
    # the epoch aggregates of unchanged terms carry on over both steps
    fresh = LossModule(new, MLIP_TARGETS)
    fresh(*first)
    fresh(predictions, targets)
    for name, value in module.compute().items():
        assert value.item() == pytest.approx(fresh.compute()[name].item(), rel=1e-12), name


def test_reconfigure_rebuilds_changed_terms_and_restarts_their_aggregates(generator):
    module = LossModule(WEIGHTED, MLIP_TARGETS)
    first = mlip_batch([3, 5, 4], generator)
    module(*first)
    before = module.compute()
    new = merge_loss_config(
        WEIGHTED,
        {"energy": {"forces": {"type": "huber", "delta": 0.1}, "stress": "mse"}},
        MLIP_TARGETS,
    )
    assert module.reconfigure(new) == ["energy/forces", "energy/stress"]
    predictions, targets = mlip_batch([2, 6], generator)
    _, expected = weighted_reference(new, predictions, targets)
    assert module(predictions, targets).item() == pytest.approx(expected, rel=1e-10)
    aggregates = module.compute()
    # rebuilt terms: this step only (stress is a sum term: one batch), energy: both steps
    fresh = LossModule(new, MLIP_TARGETS)
    fresh(predictions, targets)
    for name in ("energy/forces", "energy/stress"):
        assert aggregates[name].item() == pytest.approx(fresh.compute()[name].item(), rel=1e-12)
    assert aggregates["energy"].item() != pytest.approx(fresh.compute()["energy"].item())
    assert before["energy"].item() != aggregates["energy"].item()


def test_reconfigure_takes_any_form_and_checks_it():
    module = LossModule("mse", MLIP_TARGETS)
    assert module.reconfigure("mae") == list(TERMS)
    assert module.config["energy"]["gradients"]["strain"]["type"] == "mae"
    with pytest.raises(ValueError, match=r"^loss.forces: target 'forces' is not among"):
        module.reconfigure({"forces": "mse"})
    dos = LossModule({"mtt::dos": {"type": "masked_dos", "extra_targets": 4}}, {"mtt::dos": {}})
    stage = {"mtt::dos": {"type": "masked_dos", "extra_targets": 4, "reduction": "none"}}
    with pytest.raises(ValueError, match="term mtt::dos needs reduction 'mean' or 'sum'"):
        dos.reconfigure(stage)
    assert dos.config["mtt::dos"]["reduction"] == "mean"  # nothing changed


# --- real Trainer runs -----------------------------------------------------------------
def _epoch_weights(metrics_csv) -> dict[int, tuple]:
    with open(metrics_csv, newline="") as handle:
        rows = [row for row in csv.DictReader(handle) if row.get("loss_weight/energy")]
    return {
        int(row["epoch"]): tuple(float(row[f"loss_weight/{term}"]) for term in TERMS)
        for row in rows
    }


def _check_steps(steps: list[dict]) -> None:
    """Every step used the weights of its epoch, and returned Σ weight x term value."""
    for step in steps:
        weights = schedule_training.EXPECTED[step["epoch"]]
        assert tuple(step["weights"][t] for t in TERMS) == pytest.approx(weights, rel=1e-15)
        total = sum(step["weights"][t] * step["terms"][t] for t in TERMS)
        assert step["loss"] == pytest.approx(total, rel=1e-12)
        stress = step["config"]["energy"]["gradients"]["strain"]
        assert stress["type"] == ("huber" if step["epoch"] >= 3 else "mse")
        assert step["atoms"] <= schedule_training.MAX_ATOMS


def _fit(root, max_epochs, ckpt_path=None):
    data = schedule_training.datamodule()
    data.setup()
    recorder = schedule_training.Recorder()
    trainer = schedule_training.trainer(str(root), 1, max_epochs, recorder)
    task = schedule_training.task(data.target_options)
    trainer.fit(task, data, ckpt_path=ckpt_path)
    return task, recorder.steps


@pytest.fixture(scope="module")
def full_run(tmp_path_factory):
    root = tmp_path_factory.mktemp("schedule")
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("PL_MTT_CACHE", str(tmp_path_factory.mktemp("cache")))
        task, steps = _fit(root, 5)
    return root, task, steps


def test_trainer_logs_the_weights_of_every_epoch(full_run):
    root, task, steps = full_run
    logged = _epoch_weights(root / "metrics.csv")
    assert sorted(logged) == [0, 1, 2, 3, 4]
    for epoch, weights in logged.items():  # logged as float32 by Lightning
        assert weights == pytest.approx(schedule_training.EXPECTED[epoch], rel=1e-7), epoch
    _check_steps(steps)
    assert {s["epoch"] for s in steps} == {0, 1, 2, 3, 4}
    # validation and test LossModules follow the schedule too
    assert task.val_loss.config == task.loss.config == task.test_loss.config
    assert task.loss.terms["energy/forces"].weight == 0.1


def test_resume_mid_schedule_continues_with_the_stage_of_its_epoch(full_run, tmp_path):
    root, _, full_steps = full_run
    checkpoint = root / "checkpoints" / "epoch=2.ckpt"  # end of epoch 2, mid-ramp
    _, steps = _fit(tmp_path, 5, ckpt_path=str(checkpoint))
    assert {s["epoch"] for s in steps} == {3, 4}
    _check_steps(steps)
    logged = _epoch_weights(tmp_path / "metrics.csv")
    assert sorted(logged) == [3, 4]
    # the same steps as the uninterrupted run: batches come from the seed and the epoch
    later = [s for s in full_steps if s["epoch"] >= 3]
    assert [s["energies"] for s in steps] == [s["energies"] for s in later]
    for resumed, original in zip(steps, later, strict=True):
        assert resumed["loss"] == pytest.approx(original["loss"], rel=1e-10)


@pytest.mark.slow
def test_ddp_ranks_hold_the_same_weights_with_atom_bounded_batches(run_python, tmp_path):
    result = run_python(
        [
            str(REPO_ROOT / "tests" / "scripts" / "schedule_training.py"),
            str(tmp_path),
            "--devices",
            "2",
            "--max-epochs",
            "4",
        ],
        cwd=tmp_path,
        env={"OMP_NUM_THREADS": "1"},
        timeout=300,
    )
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    ranks = [torch.load(tmp_path / f"rank{r}.pt", weights_only=False) for r in (0, 1)]
    for rank in ranks:
        _check_steps(rank["steps"])
    for epoch in range(4):  # up to the rebuilt stress term at epoch 3
        per_rank = [[s for s in r["steps"] if s["epoch"] == epoch] for r in ranks]
        assert len(per_rank[0]) == len(per_rank[1]) > 0  # the same number of steps
        for a, b in zip(*per_rank, strict=True):
            assert a["weights"] == b["weights"]
            assert a["config"] == b["config"]
        # every training structure once per epoch over both ranks (energies identify them)
        energies = sorted(e for steps in per_rank for s in steps for e in s["energies"])
        assert len(energies) == ranks[0]["n_train"] == len(set(energies))
    epochs = [
        sorted(e for s in ranks[0]["steps"] if s["epoch"] == k for e in s["energies"])
        for k in range(2)
    ]
    assert epochs[0] != epochs[1]  # rank 0's share changes from epoch to epoch


# --- the Hydra app ---------------------------------------------------------------------
def test_app_validates_the_schedule_with_the_loss(monkeypatch, tmp_path):
    monkeypatch.setenv("PL_MTT_CACHE", str(tmp_path / "cache"))
    monkeypatch.chdir(tmp_path)
    bad = "loss_schedule=[{epoch:3,loss:{energy:{forces:{wieght:2}}}}]"
    message = "loss_schedule[0].loss.energy.forces.wieght: unknown key 'wieght'"
    with pytest.raises(ValueError, match=f"^{re.escape(message)}"):
        run(composed("dry_run=true", bad))  # before any data is read
    cfg = composed(
        "dry_run=true",
        "data.n_structures=12",
        "loss_schedule=[{epoch:3,loss:{energy:{weight:1000.0,forces:{weight:10.0}}},"
        "ramp_epochs:2}]",
        "data.max_atoms_per_batch=64",
    )
    assert run(cfg)["loss"]["energy"]["weight"] == 1.0
    assert cfg.data.max_atoms_per_batch == 64
    # a stage on a term the data does not provide (stress, here) is an error, not dropped
    cfg = composed(
        "dry_run=true",
        "data.n_structures=12",
        "data.targets.energy.stress=false",
        "loss_schedule=[{epoch:1,loss:{energy:{stress:{weight:2.0}}}}]",
    )
    with pytest.raises(ValueError, match=r"^loss_schedule\[0\]\.loss\.energy\.stress: target"):
        run(cfg)


def test_callback_needs_a_loss_module():
    import lightning.pytorch as pl

    with pytest.raises(ValueError, match=r"holds no pl_mtt\.LossModule"):
        LossScheduleCallback([{"epoch": 1, "loss": "mae"}]).setup(
            pl.Trainer(logger=False), pl.LightningModule(), "fit"
        )
