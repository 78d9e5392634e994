"""The loss-config grammar: every YAML example of the spec, defaults, and bad input."""

from __future__ import annotations

import pytest
import yaml
from omegaconf import OmegaConf

from pl_mtt import expand_loss_config
from pl_mtt.config import gradient_alias, requested_gradients
from pl_mtt.losses import LossTerm, create_loss
from pl_mtt.registry import Param, register_loss_type, unregister_loss_type

MLIP_TARGETS = {"energy": {"quantity": "energy", "forces": True, "stress": True}}


def term(type_="mse", weight=1.0, reduction="mean", **params):
    return {"type": type_, "weight": weight, "reduction": reduction, **params}


MSE_ALL = {
    "energy": {
        **term(),
        "gradients": {"positions": term(), "strain": term()},
    }
}


def load(block: str):
    """Read a spec YAML block with a plain YAML 1.1 loader, as users' scripts would."""
    return yaml.safe_load(block)["loss"]


# --- every YAML block of the spec's configuration sections ---------------------------


def test_spec_mlip_full_example():
    loss = load(
        """
loss:
  energy:
    type: mse
    weight: 1.0
    reduction: mean
    forces:
      type: mse
      weight: 1.0
      reduction: mean
    stress:
      type: mse
      weight: 1.0
      reduction: mean
"""
    )
    assert expand_loss_config(loss, MLIP_TARGETS) == MSE_ALL


def test_spec_per_gradient_shorthand_example():
    loss = load(
        """
loss:
  energy:
    type: mse
    forces: mae
    stress: huber
"""
    )
    assert expand_loss_config(loss, MLIP_TARGETS) == {
        "energy": {
            **term(),
            "gradients": {"positions": term("mae"), "strain": term("huber", delta=1.0)},
        }
    }


def test_spec_shorthand_equals_its_detailed_form():
    shorthand = load(
        """
loss:
  energy:
    type: mse
    forces: mae
    stress: huber
"""
    )
    detailed = load(
        """
loss:
  energy:
    type: mse
    weight: 1.0
    reduction: mean
    forces:
      type: mae
      weight: 1.0
      reduction: mean
    stress:
      type: huber
      weight: 1.0
      reduction: mean
      delta: 1.0
"""
    )
    assert expand_loss_config(detailed, MLIP_TARGETS) == expand_loss_config(shorthand, MLIP_TARGETS)


def test_spec_global_shorthand_example():
    loss = yaml.safe_load("loss: mse")["loss"]
    assert expand_loss_config(loss, MLIP_TARGETS) == MSE_ALL


def test_spec_custom_energy_name_example():
    loss = load(
        """
loss:
  mtt::etot:
    type: mse
    weight: 1.0
    reduction: mean
    forces:
      type: mse
      weight: 1.0
      reduction: mean
    stress:
      type: mse
      weight: 1.0
      reduction: mean
"""
    )
    targets = yaml.safe_load(
        """
targets:
  mtt::etot:
    quantity: energy
    forces: true  # or some other allowed configuration
    stress: true  # or some other allowed configuration
"""
    )["targets"]
    assert expand_loss_config(loss, targets) == {"mtt::etot": MSE_ALL["energy"]}


def test_spec_internal_form_example():
    loss = load(
        """
loss:
  energy:
    type: mse
    weight: 1.0
    reduction: mean
    gradients:
      positions:
        type: mse
        weight: 1.0
        reduction: mean
      strain:
        type: mse
        weight: 1.0
        reduction: mean
"""
    )
    assert expand_loss_config(loss, MLIP_TARGETS) == MSE_ALL


def test_spec_masked_example():
    loss = load(
        """
loss:
  energy:
    type: masked_mse
    weight: 1.0
    reduction: sum
    forces:
      type: masked_mae
      weight: 0.1
      reduction: sum
"""
    )
    targets = {"energy": {"quantity": "energy", "forces": True}}
    assert expand_loss_config(loss, targets) == {
        "energy": {
            **term("masked_mse", reduction="sum"),
            "gradients": {"positions": term("masked_mae", weight=0.1, reduction="sum")},
        }
    }


def test_spec_dos_example_with_plain_yaml_loader():
    loss = load(
        """
loss:
  mtt::dos:
    type: "masked_dos"
    grad_weight: 1e-4
    int_weight: 2.0
    extra_targets: 200
    reduction: "mean"
"""
    )
    assert loss["mtt::dos"]["grad_weight"] == "1e-4"  # YAML 1.1 reads it as a string
    expanded = expand_loss_config(loss, {"mtt::dos": {}})
    assert expanded == {
        "mtt::dos": {
            **term("masked_dos"),
            "grad_weight": 1e-4,
            "int_weight": 2.0,
            "extra_targets": 200,
            "grid_spacing": 0.05,
            "energy_grid": None,
            "gradients": {},
        }
    }
    assert isinstance(expanded["mtt::dos"]["extra_targets"], int)


@pytest.mark.parametrize(
    "loss_type", ["gaussian_nll_ensemble", "gaussian_crps_ensemble", "empirical_crps_ensemble"]
)
def test_spec_ensemble_examples(loss_type):
    loss = load(
        f"""
loss:
  mtt::target_name:
    type: {loss_type}
"""
    )
    assert expand_loss_config(loss, {"mtt::target_name": {}}) == {
        "mtt::target_name": {**term(loss_type), "gradients": {}}
    }


# --- defaults and forms ----------------------------------------------------------------


def test_per_target_shorthand_keeps_gradient_defaults():
    assert expand_loss_config({"energy": "mae"}, MLIP_TARGETS) == {
        "energy": {**term("mae"), "gradients": {"positions": term(), "strain": term()}}
    }


def test_global_shorthand_applies_to_every_target_and_gradient():
    targets = {**MLIP_TARGETS, "dipole": {"quantity": "dipole"}, "mtt::x": {"gradients": ["q"]}}
    expanded = expand_loss_config("mae", targets)
    assert expanded == {
        "energy": {**term("mae"), "gradients": {"positions": term("mae"), "strain": term("mae")}},
        "dipole": {**term("mae"), "gradients": {}},
        "mtt::x": {**term("mae"), "gradients": {"q": term("mae")}},
    }
    huber = expand_loss_config("huber", MLIP_TARGETS)["energy"]
    assert huber["delta"] == 1.0
    assert huber["gradients"]["strain"]["delta"] == 1.0


def test_targets_absent_from_loss_get_defaults_and_nothing_is_on_by_default():
    targets = {"energy": {"quantity": "energy"}, "mtt::dipole": {"per_atom": False}}
    assert expand_loss_config({"energy": "mae"}, targets) == {
        "energy": {**term("mae"), "gradients": {}},
        "mtt::dipole": {**term(), "gradients": {}},
    }
    assert expand_loss_config(None, targets)["energy"] == {**term(), "gradients": {}}


def test_internal_form_with_custom_gradient_on_any_target():
    targets = {"mtt::charge": {"gradients": ["electric_field"]}}
    loss = {"mtt::charge": {"type": "mae", "gradients": {"electric_field": {"weight": "0.5"}}}}
    assert expand_loss_config(loss, targets) == {
        "mtt::charge": {
            **term("mae"),
            "gradients": {"electric_field": term(weight=0.5)},
        }
    }


@pytest.mark.parametrize(
    ("options", "gradients"),
    [
        ({"forces": True}, ["positions"]),
        ({"forces": {"read_from": "f.xyz", "key": "forces"}}, ["positions"]),
        ({"forces": False, "stress": True}, ["strain"]),
        ({"virial": True}, ["strain"]),
        ({"forces": True, "stress": True}, ["positions", "strain"]),
        ({}, []),
        ({"forces": True, "gradients": {"custom": {}}}, ["positions", "custom"]),
    ],
)
def test_requested_gradients(options, gradients):
    assert requested_gradients("energy", options) == gradients


def test_gradient_aliases():
    assert gradient_alias("energy", {}, "positions") == "forces"
    assert gradient_alias("energy", {"stress": True}, "strain") == "stress"
    assert gradient_alias("mtt::e", {"quantity": "energy", "virial": True}, "strain") == "virial"
    assert gradient_alias("mtt::x", {}, "positions") == "positions"


def test_virial_key_maps_to_strain():
    targets = {"energy": {"quantity": "energy", "virial": True}}
    expanded = expand_loss_config({"energy": {"virial": {"type": "mae", "weight": 2}}}, targets)
    assert expanded["energy"]["gradients"] == {"strain": term("mae", weight=2.0)}


def test_accepts_omegaconf_and_returns_plain_dicts():
    loss = OmegaConf.create({"energy": {"type": "mse", "forces": {"type": "mae"}}})
    targets = OmegaConf.create(MLIP_TARGETS)
    expanded = expand_loss_config(loss, targets)
    assert type(expanded) is dict
    assert type(expanded["energy"]) is dict
    assert type(expanded["energy"]["gradients"]["positions"]) is dict
    assert expanded["energy"]["gradients"]["positions"] == term("mae")
    assert expand_loss_config(OmegaConf.create({"loss": "mse"}).loss, targets) == MSE_ALL


def test_numeric_strings_are_accepted_for_float_parameters():
    expanded = expand_loss_config(
        {"energy": {"type": "huber", "weight": "2.5e-1", "delta": "1e-2"}}, {"energy": {}}
    )
    assert expanded["energy"]["weight"] == 0.25
    assert expanded["energy"]["delta"] == 0.01


def test_inputs_are_not_modified():
    loss = {"energy": {"type": "mse", "forces": "mae"}}
    targets = {"energy": {"quantity": "energy", "forces": True}}
    expand_loss_config(loss, targets)
    assert loss == {"energy": {"type": "mse", "forces": "mae"}}
    assert targets == {"energy": {"quantity": "energy", "forces": True}}


# --- user-registered types validate like built-ins ------------------------------------


@pytest.fixture
def log_cosh_type():
    @register_loss_type("test_log_cosh", params={"scale": Param(1.0, "positive_float")})
    class LogCosh(LossTerm):
        def __init__(self, *, scale: float, **kwargs):
            super().__init__(**kwargs)
            self.scale = scale

    yield LogCosh
    unregister_loss_type("test_log_cosh")


def test_user_registered_type_expands_and_validates(log_cosh_type):
    expanded = expand_loss_config({"energy": {"type": "test_log_cosh"}}, {"energy": {}})
    assert expanded["energy"] == {**term("test_log_cosh"), "scale": 1.0, "gradients": {}}
    with pytest.raises(ValueError, match=r"loss\.energy\.scale: expected a positive number"):
        expand_loss_config({"energy": {"type": "test_log_cosh", "scale": -1}}, {"energy": {}})
    created = create_loss("test_log_cosh", name="energy", scale="0.5")
    assert isinstance(created, log_cosh_type)
    assert created.scale == 0.5


def test_registering_a_name_twice_is_an_error(log_cosh_type):
    with pytest.raises(ValueError, match="already registered"):
        register_loss_type("test_log_cosh")(log_cosh_type)


# --- bad input: ValueError naming the key path -----------------------------------------


@pytest.mark.parametrize(
    ("loss", "targets", "match"),
    [
        (
            {"energy": {"type": "msee"}},
            {"energy": {}},
            r"loss\.energy\.type: unknown loss type 'msee'\. Valid types: .*'mae'.*"
            r"Did you mean 'mse'\?",
        ),
        (
            {"energy": {"forces": "maee"}},
            MLIP_TARGETS,
            r"loss\.energy\.forces\.type: unknown loss type 'maee'.*Did you mean 'mae'\?",
        ),
        (
            {"energy": {"type": "mse", "wieght": 2.0}},
            {"energy": {}},
            r"loss\.energy\.wieght: unknown key 'wieght'.*Did you mean 'weight'\?",
        ),
        (
            {"energy": {"forces": {"type": "mse", "deltaa": 1}}},
            MLIP_TARGETS,
            r"loss\.energy\.forces\.deltaa: unknown key",
        ),
        (
            {"mtt::dipole": {"forces": "mse"}},
            {"mtt::dipole": {"quantity": "dipole"}},
            r"loss\.mtt::dipole\.forces: 'forces' is only available for energy-like",
        ),
        (
            {"mtt::dipole": {"stress": "mse"}},
            {"mtt::dipole": {}},
            r"loss\.mtt::dipole\.stress: 'stress' is only available for energy-like",
        ),
        (
            {"energy": {"stress": "mse", "virial": "mse"}},
            MLIP_TARGETS,
            r"loss\.energy: give either 'stress' or 'virial', not both",
        ),
        (
            {"energy": {"forces": "mse", "gradients": {"positions": "mae"}}},
            MLIP_TARGETS,
            r"loss\.energy\.gradients\.positions: already given as 'loss\.energy\.forces'",
        ),
        (
            {"mtt::missing": "mse"},
            {"energy": {}},
            r"loss\.mtt::missing: target 'mtt::missing' is not among the training targets",
        ),
        (
            {"energy": {"stress": "mse"}},
            {"energy": {"quantity": "energy", "forces": True}},
            r"loss\.energy\.stress: target 'energy' does not provide gradient 'strain'",
        ),
        (
            {"energy": {"gradients": {"charge": "mse"}}},
            {"energy": {}},
            r"loss\.energy\.gradients\.charge: target 'energy' does not provide gradient",
        ),
        (
            {"energy": {"reduction": "max"}},
            {"energy": {}},
            r"loss\.energy\.reduction: invalid reduction 'max'.*'mean', 'sum'",
        ),
        (
            {"energy": {"forces": {"reduction": "none"}}},
            MLIP_TARGETS,
            r"loss\.energy\.forces\.reduction: invalid reduction 'none'",
        ),
        ({"energy": {"weight": "heavy"}}, {"energy": {}}, r"loss\.energy\.weight: expected"),
        ({"energy": {"weight": -1.0}}, {"energy": {}}, r"loss\.energy\.weight: expected a non-neg"),
        ({"energy": {"weight": True}}, {"energy": {}}, r"loss\.energy\.weight: expected"),
        (
            {"energy": {"forces": {"type": "huber", "delta": 0}}},
            MLIP_TARGETS,
            r"loss\.energy\.forces\.delta: expected a positive number, got 0",
        ),
        ({"energy": {"type": "huber", "delta": -2}}, {"energy": {}}, r"loss\.energy\.delta"),
        (["mse"], {"energy": {}}, r"^loss: expected a loss type name .* got list"),
        (3, {"energy": {}}, r"^loss: expected a loss type name .* got int"),
        ({"energy": 3}, {"energy": {}}, r"^loss\.energy: expected a loss type name or a mapping"),
        ({"energy": ["mse"]}, {"energy": {}}, r"^loss\.energy: expected"),
        ({"energy": {"type": 5}}, {"energy": {}}, r"^loss\.energy\.type: expected a loss type"),
        (
            {"mtt::dos": {"type": "masked_dos"}},
            {"mtt::dos": {}},
            r"loss\.mtt::dos\.extra_targets: loss type 'masked_dos' requires parameter",
        ),
        (
            {"mtt::dos": {"type": "masked_dos", "extra_targets": -1}},
            {"mtt::dos": {}},
            r"loss\.mtt::dos\.extra_targets: expected a non-negative integer",
        ),
        (
            {"mtt::dos": {"type": "masked_dos", "extra_targets": 2, "energy_grid": "x"}},
            {"mtt::dos": {}},
            r"loss\.mtt::dos\.energy_grid: expected null or a list of numbers",
        ),
        (
            {"energy": {"forces": "masked_dos"}},
            MLIP_TARGETS,
            r"loss\.energy\.forces\.type: loss type 'masked_dos' cannot be used on a gradient",
        ),
        (
            "mse",
            {"mtt::dipole": {"forces": True}},
            r"targets\.mtt::dipole\.forces: 'forces' is only available for energy-like",
        ),
        (
            "mse",
            {"energy": {"stress": True, "virial": True}},
            r"targets\.energy: give either 'stress' or 'virial', not both",
        ),
        ("mse", ["energy"], r"^targets: expected a mapping"),
        ("mse", {"energy": {"gradients": "positions"}}, r"targets\.energy\.gradients: expected"),
        ("mse", {"energy": {"forces": 3}}, r"targets\.energy\.forces: expected true, false"),
    ],
)
def test_bad_input_names_the_key_path(loss, targets, match):
    with pytest.raises(ValueError, match=match):
        expand_loss_config(loss, targets)


def test_unknown_type_without_close_match_lists_valid_types():
    with pytest.raises(ValueError, match="Valid types:") as error:
        expand_loss_config({"energy": "zzzzzz"}, {"energy": {}})
    assert "Did you mean" not in str(error.value)
