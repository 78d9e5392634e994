"""The Hydra config tree and the real entry point ``python -m pl_mtt.train``."""

from __future__ import annotations

import pytest
import yaml
from hydra import compose, initialize_config_dir
from hydra.errors import ConfigCompositionException
from omegaconf import OmegaConf

from pl_mtt import expand_loss_config
from pl_mtt.registry import loss_type_names
from pl_mtt.training.app import assumed_targets, config_dir, merge_loss_shorthand_overrides
from pl_mtt.training.schema import register_configs

MSE = {"type": "mse", "weight": 1.0, "reduction": "mean"}


def composed(*overrides: str):
    register_configs()
    with initialize_config_dir(config_dir=config_dir(), version_base="1.3"):
        return compose(
            config_name="config", overrides=merge_loss_shorthand_overrides(list(overrides))
        )


def expanded_loss(*overrides: str) -> dict:
    cfg = composed(*overrides)
    return expand_loss_config(cfg.loss, assumed_targets(cfg))


def test_default_loss_is_mlip_energy_forces_stress():
    assert expanded_loss() == {"energy": {**MSE, "gradients": {"positions": MSE, "strain": MSE}}}


@pytest.mark.parametrize(
    ("overrides", "positions", "strain"),
    [
        (["loss.energy.forces=mae"], {**MSE, "type": "mae"}, MSE),
        (["loss=mlip", "loss.energy.forces=mae"], {**MSE, "type": "mae"}, MSE),
        (["++loss.energy.stress=huber"], MSE, {**MSE, "type": "huber", "delta": 1.0}),
        (["loss.energy.forces.weight=0.1"], {**MSE, "weight": 0.1}, MSE),
        (
            ["loss.energy.forces=mae", "loss.energy.forces.weight=0.1"],
            {**MSE, "type": "mae", "weight": 0.1},
            MSE,
        ),
        (
            ["loss.energy.stress.reduction=sum", "loss.energy.stress=huber"],
            MSE,
            {"type": "huber", "weight": 1.0, "reduction": "sum", "delta": 1.0},
        ),
        (["loss=mse"], MSE, MSE),
    ],
)
def test_cli_overrides(overrides, positions, strain):
    loss = expanded_loss(*overrides)
    assert loss["energy"]["gradients"] == {"positions": positions, "strain": strain}


def test_single_plus_refuses_an_existing_key():
    with pytest.raises(ConfigCompositionException, match=r"already at 'loss\.energy\.stress'"):
        composed("+loss.energy.stress=huber")


def test_misspelt_trainer_override_fails_with_the_key():
    with pytest.raises(ConfigCompositionException, match="max_epoch"):
        composed("trainer.max_epoch=3")


def test_every_trainer_argument_is_configurable():
    cfg = composed("trainer.devices=2", "trainer.strategy=ddp", "trainer.gradient_clip_val=1.0")
    assert cfg.trainer.devices == 2
    assert cfg.trainer.strategy == "ddp"
    assert cfg.trainer.gradient_clip_val == 1.0


@pytest.mark.parametrize(
    ("group", "targets", "expected_types"),
    [
        ("mse", None, {"energy": "mse"}),
        ("mlip", None, {"energy": "mse"}),
        ("masked", {"energy": {"quantity": "energy", "forces": True}}, {"energy": "masked_mse"}),
        ("dos", {"mtt::dos": {}}, {"mtt::dos": "masked_dos"}),
        ("ensemble", None, {"energy": "gaussian_crps_ensemble"}),
    ],
)
def test_loss_groups_expand(group, targets, expected_types):
    cfg = composed(f"loss={group}")
    loss = expand_loss_config(cfg.loss, targets or assumed_targets(cfg))
    assert {name: entry["type"] for name, entry in loss.items()} == expected_types


def test_dos_group_reads_like_the_spec():
    cfg = composed("loss=dos")
    entry = expand_loss_config(cfg.loss, {"mtt::dos": {}})["mtt::dos"]
    assert entry["grad_weight"] == pytest.approx(1e-4)
    assert entry["int_weight"] == 2.0
    assert entry["extra_targets"] == 200


def test_merge_overrides_leaves_other_arguments_alone():
    args = ["-m", "loss.energy.forces=mse,mae", "trainer.max_epochs=2", "loss=mse"]
    assert merge_loss_shorthand_overrides(args) == args


def _printed_loss(stdout: str) -> dict:
    return yaml.safe_load(stdout.split("# expanded loss config", 1)[1])["loss"]


def test_entry_point_subprocess(tmp_path, run_python):
    result = run_python(
        [
            "-m",
            "pl_mtt.train",
            "dry_run=true",
            "loss.energy.forces=mae",
            "loss.energy.forces.weight=0.1",
            "++loss.energy.stress=huber",
        ],
        cwd=tmp_path,
    )
    assert result.returncode == 0, result.stderr
    loss = _printed_loss(result.stdout)
    assert loss["energy"]["gradients"] == {
        "positions": {**MSE, "type": "mae", "weight": 0.1},
        "strain": {**MSE, "type": "huber", "delta": 1.0},
    }
    assert (tmp_path / "outputs").is_dir()


def test_entry_point_multirun(tmp_path, run_python):
    result = run_python(
        ["-m", "pl_mtt.train", "-m", "dry_run=true", "loss.energy.forces=mse,mae"], cwd=tmp_path
    )
    assert result.returncode == 0, result.stderr
    runs = result.stdout.split("# expanded loss config")[1:]
    assert len(runs) == 2
    forces = [
        yaml.safe_load(run.split("\n[")[0])["loss"]["energy"]["gradients"]["positions"]
        for run in runs
    ]
    assert sorted(f["type"] for f in forces) == ["mae", "mse"]
    assert len(list((tmp_path / "outputs" / "multirun").rglob("overrides.yaml"))) == 2


def test_entry_point_rejects_a_bad_loss_before_training(tmp_path, run_python):
    result = run_python(
        ["-m", "pl_mtt.train", "loss.energy.forces=msa"],
        cwd=tmp_path,
        env={"HYDRA_FULL_ERROR": ""},
    )
    assert result.returncode == 1
    (run_dir,) = [p.parent for p in tmp_path.glob("outputs/*/*/.hydra")]
    # the message alone, as Hydra prints its own errors; the run directory is named
    assert result.stderr.splitlines()[-2:] == [
        "Error: loss.energy.forces.type: unknown loss type 'msa'. Valid types: "
        f"{', '.join(repr(name) for name in loss_type_names())}. Did you mean 'mse'?",
        f"The config and log of this run are in {run_dir}. Set the environment variable "
        "HYDRA_FULL_ERROR=1 for the full traceback.",
    ]
    assert "Traceback" not in result.stderr
    assert "data:" not in result.stdout  # failed before any data was read


def test_composed_config_is_plain_yaml():
    cfg = composed()
    assert OmegaConf.select(cfg, "data.targets.energy.quantity") == "energy"
