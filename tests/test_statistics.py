"""Precomputed statistics: written, loaded exactly, used instead of a fit in a real Trainer;
inconsistent files are clear errors; fixed baselines and scales (metatrain's
``atomic_baseline`` / ``fixed_scaling_weights``) against a float64 loop reference."""

from __future__ import annotations

import copy
import math
import sys
import warnings
from pathlib import Path

import lightning.pytorch as pl
import pytest
import torch
import yaml

SCRIPTS = Path(__file__).parent / "scripts"
sys.path.insert(0, str(SCRIPTS))

from scaler_data import batches, random_structures  # noqa: E402
from scaler_lightning import TYPES, DataModule, Task, make_structures  # noqa: E402

from pl_mtt.data import embedded_dataset, open_dataset  # noqa: E402
from pl_mtt.scaling.composition import CompositionModel  # noqa: E402
from pl_mtt.scaling.fit import fit_pass  # noqa: E402
from pl_mtt.scaling.scaler import Scaler  # noqa: E402
from pl_mtt.scaling.statistics import (  # noqa: E402
    fixed_baseline_from,
    fixed_scales_from,
    load_statistics,
    read_statistics,
    statistics_of,
    write_statistics,
)
from pl_mtt.tensormaps import zero_sample_layout  # noqa: E402
from pl_mtt.training.callbacks import ScalerCallback  # noqa: E402

TARGETS = ("energy", "mtt::charge", "mtt::multi")
UNITS = {"energy": "eV", "mtt::charge": "e"}


@pytest.fixture(autouse=True)
def _quiet():
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        yield


def _data(seed: int = 5, **kwargs):
    structures = random_structures(24, TYPES, seed=seed, **kwargs)
    data = batches(structures, 5, TARGETS)
    layouts = {name: zero_sample_layout(t) for name, t in data[0][1].items()}
    return data, layouts


@pytest.fixture(scope="module")
def fitted():
    data, layouts = _data(nan_fraction=0.05, mask_fraction=0.1)
    scaler, composition = Scaler(None, layouts), CompositionModel(None, layouts)
    fit_pass(data, scaler, composition)
    return scaler, composition, layouts


def _tensors(module: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {k: v for k, v in module.state_dict().items() if torch.is_tensor(v)}


def test_written_file_is_readable_and_loads_exactly(fitted, tmp_path):
    scaler, composition, layouts = fitted
    path = tmp_path / "statistics.yaml"
    write_statistics(path, scaler, composition, UNITS)
    text = path.read_text()
    assert text.startswith("# pl_mtt statistics")
    data = yaml.safe_load(text)
    assert data["atomic_types"] == TYPES
    energy = data["targets"]["energy"]
    assert energy["unit"] == "eV"
    assert energy["scale_unit"] == "eV/atom"
    assert energy["divided_by_atoms"] is True
    assert energy["scale"] == float(scaler.per_target_scales["energy"].block().values[0, 0])
    weights = composition.weights["energy"].block().values[:, 0].tolist()
    assert energy["baseline"] == dict(zip(TYPES, weights, strict=True))
    charge = data["targets"]["mtt::charge"]
    assert charge["sample_kind"] == "atom"
    assert set(charge["scale"]) == set(TYPES)
    assert "per_property_scales" not in charge  # single property
    multi = data["targets"]["mtt::multi"]
    assert [b["key"] for b in multi["blocks"]] == [
        {"o3_lambda": lam, "o3_sigma": 1} for lam in (0, 1, 2)
    ]
    assert len(multi["blocks"][1]["per_property_scales"][6]) == 8
    assert "baseline" not in multi["blocks"][1]  # only the invariant block has a baseline

    for types in (None, TYPES):
        new_scaler, new_composition = Scaler(types, layouts), CompositionModel(types, layouts)
        load_statistics(path, new_scaler, new_composition, UNITS)
        for module, reference in ((new_scaler, scaler), (new_composition, composition)):
            if types is None:  # same type table: every buffer identical
                for key, value in _tensors(reference).items():
                    assert torch.equal(_tensors(module)[key], value), key
        for name in TARGETS:
            for which in ("scales", "per_target_scales", "per_property_scales"):
                for a, b in zip(
                    getattr(new_scaler, which)[name].blocks(),
                    getattr(scaler, which)[name].blocks(),
                    strict=True,
                ):
                    assert torch.equal(a.values, b.values), (name, which)
        for a, b in zip(
            new_composition.weights["energy"].blocks(),
            composition.weights["energy"].blocks(),
            strict=True,
        ):
            assert torch.equal(a.values, b.values)
        assert bool(new_scaler.fitted)
        assert bool(new_composition.fitted)
    assert fixed_scales_from(path)["energy"] == energy["scale"]
    assert fixed_baseline_from(path)["energy"] == [energy["baseline"]]


def _edit(statistics: dict, change) -> dict:
    edited = copy.deepcopy(statistics)
    change(edited)
    return edited


EDITS = [
    (lambda s: s["targets"].pop("mtt::charge"), r"missing: \['mtt::charge'\]"),
    (
        lambda s: s["targets"].__setitem__("mtt::x", {"scale": 1.0}),
        r"not trained: \['mtt::x'\]",
    ),
    (
        lambda s: s["targets"]["energy"].__setitem__("sample_kind", "atom"),
        r"targets.energy.sample_kind is 'atom', the training target is 'system'",
    ),
    (
        lambda s: s["targets"]["energy"].__setitem__("divided_by_atoms", False),
        r"targets.energy.divided_by_atoms is False, the training divides 'energy'",
    ),
    (
        lambda s: s["targets"]["mtt::charge"]["scale"].pop(6),
        r"targets.mtt::charge.scale has types \[1, 8\], the file's atomic_types are \[1, 6, 8\]",
    ),
    (
        lambda s: s["targets"]["mtt::multi"]["blocks"][0]["per_property_scales"][1].pop(),
        r"targets.mtt::multi.blocks\[0\].per_property_scales.1: expected 8 value\(s\)",
    ),
    (
        lambda s: s["targets"]["mtt::multi"]["blocks"].pop(),
        r"targets.mtt::multi.blocks: the target has 3 blocks, the file lists 2",
    ),
    (
        lambda s: s["targets"]["mtt::multi"]["blocks"][2].__setitem__(
            "key", {"o3_lambda": 3, "o3_sigma": 1}
        ),
        r"blocks\[2\].key is \{'o3_lambda': 3, 'o3_sigma': 1\}, the training target's block 2",
    ),
    (
        lambda s: s["targets"]["energy"].pop("baseline"),
        r"targets.energy has no baseline, but the training fits one",
    ),
    (
        lambda s: s["targets"]["mtt::multi"]["blocks"][1].__setitem__("baseline", {1: 0.0}),
        r"blocks\[1\] has a baseline, but the training has none",
    ),
    (lambda s: s["targets"]["energy"].__setitem__("scale", -1.0), r"scale must be positive"),
    (
        lambda s: s["targets"]["energy"].__setitem__("wieght", 1.0),
        r"targets.energy.wieght: unknown key",
    ),
    (lambda s: s.pop("pl_mtt_statistics"), r"not a pl_mtt statistics file"),
]


@pytest.mark.parametrize(("change", "message"), EDITS)
def test_inconsistent_statistics_are_clear_errors(fitted, change, message):
    scaler, composition, layouts = fitted
    statistics = _edit(statistics_of(scaler, composition, UNITS), change)
    with pytest.raises(ValueError, match=message):
        load_statistics(statistics, Scaler(None, layouts), CompositionModel(None, layouts))


def test_mismatched_types_units_and_files(fitted, tmp_path):
    scaler, composition, layouts = fitted
    statistics = statistics_of(scaler, composition, UNITS)
    with pytest.raises(ValueError, match=r"atomic types \[1, 6, 8\] do not match the model's"):
        load_statistics(statistics, Scaler([1, 8], layouts))
    with pytest.raises(ValueError, match=r"targets.energy.unit is 'eV', the training data has"):
        load_statistics(
            statistics, Scaler(None, layouts), CompositionModel(None, layouts), {"energy": "meV"}
        )
    with pytest.raises(ValueError, match=r"statistics file '.*nope.yaml' does not exist"):
        read_statistics(tmp_path / "nope.yaml")
    (tmp_path / "bad.yaml").write_text("a: [")
    with pytest.raises(ValueError, match=r"bad.yaml': not valid YAML"):
        read_statistics(tmp_path / "bad.yaml")


def _counts(system, types):
    return [sum(1 for z in system.types.tolist() if z == t) for t in types]


def test_fixed_baseline_and_scales_against_a_loop_reference():
    """Energy with type 6 fixed, the others fitted with it held; charges with type 8
    fixed, the others their mean; then the scales of the residuals (per atom)."""
    data, layouts = _data(seed=7)
    fixed = {"energy": {6: -2.5}, "mtt::charge": {8: 0.25}}
    scaler, composition = Scaler(TYPES, layouts), CompositionModel(TYPES, layouts)
    fit_pass(data, scaler, composition, fixed_baseline=fixed, fixed_scales={"mtt::multi": 2.0})

    rows, energies, sizes = [], [], []
    charges: dict[int, list[float]] = {t: [] for t in TYPES}
    for systems, targets, _ in data:
        for system, energy in zip(
            systems, targets["energy"].block().values[:, 0].tolist(), strict=True
        ):
            rows.append(_counts(system, TYPES))
            energies.append(energy)
            sizes.append(len(system))
        charge = targets["mtt::charge"].block()
        for (s, a), q in zip(
            charge.samples.values.tolist(), charge.values[:, 0].tolist(), strict=True
        ):
            charges[int(systems[s].types[a])].append(q)
    x = torch.tensor(rows, dtype=torch.float64)
    y = torch.tensor(energies, dtype=torch.float64) - x[:, 1] * -2.5
    free = [0, 2]
    solution = torch.linalg.lstsq(x[:, free], y[:, None]).solution[:, 0]
    expected = torch.tensor([solution[0], -2.5, solution[1]], dtype=torch.float64)
    torch.testing.assert_close(
        composition.weights["energy"].block().values[:, 0], expected, rtol=1e-10, atol=1e-12
    )
    residuals = [
        (e - sum(c * w for c, w in zip(r, expected.tolist(), strict=True))) / n
        for e, r, n in zip(energies, rows, sizes, strict=True)
    ]
    rms = math.sqrt(sum(v * v for v in residuals) / len(residuals))
    assert scaler.per_target_scales["energy"].block().values[0, 0].item() == pytest.approx(
        rms, rel=1e-10
    )

    means = {t: sum(v) / len(v) for t, v in charges.items()}
    weights = {1: means[1], 6: means[6], 8: 0.25}
    got = composition.weights["mtt::charge"].block().values[:, 0].tolist()
    assert got == pytest.approx([weights[t] for t in TYPES], rel=1e-12)
    for row, t in enumerate(TYPES):
        values = [q - weights[t] for q in charges[t]]
        rms = math.sqrt(sum(v * v for v in values) / len(values))
        scale = scaler.per_target_scales["mtt::charge"].block().values[row, 0].item()
        assert scale == pytest.approx(rms, rel=1e-10)
    assert bool((scaler.per_target_scales["mtt::multi"].block(0).values == 2.0).all())


def test_fixed_baseline_errors():
    _, layouts = _data()
    composition = CompositionModel(TYPES, layouts)
    with pytest.raises(ValueError, match=r"fixed_weights.energy: atomic type 9 is not among"):
        composition.fixed_weight_tables({"energy": {9: 1.0}})
    with pytest.raises(ValueError, match=r"fixed_weights.mtt::multi.1: expected 8 values"):
        composition.fixed_weight_tables({"mtt::multi": {1: [0.0, 1.0]}})
    with pytest.raises(ValueError, match=r"fixed_weights.energy.1: expected finite numbers"):
        composition.fixed_weight_tables({"energy": {1: float("nan")}})
    with pytest.raises(ValueError, match=r"unknown target 'nope'"):
        composition.fixed_weight_tables({"nope": 0.0})
    with pytest.raises(ValueError, match="fixed_baseline needs a composition"):
        fit_pass([], Scaler(TYPES, layouts), None, fixed_baseline={"energy": 0.0})
    with pytest.raises(ValueError, match="either statistics"):
        ScalerCallback(statistics={"pl_mtt_statistics": 1}, fixed_scales={"energy": 1.0})
    with pytest.raises(ValueError, match="fixed_baseline needs composition=True"):
        ScalerCallback(composition=False, fixed_baseline={"energy": 0.0})


# -- in a real Trainer ---------------------------------------------------------------
def _trainer(callback, progress: bool = False):
    return pl.Trainer(
        accelerator="cpu",
        devices=1,
        max_steps=2,
        logger=False,
        enable_checkpointing=False,
        enable_model_summary=False,
        enable_progress_bar=progress,
        callbacks=[callback],
    )


class TypedDataModule(DataModule):
    """A DataModule that says which atomic types its data has."""

    def __init__(self, structures, atomic_types):
        super().__init__(structures)
        self.atomic_types = atomic_types


def test_train_without_a_fit_from_a_saved_file(tmp_path, capsys):
    structures = make_structures(20, seed=4)
    path = tmp_path / "run" / "statistics.yaml"
    first = ScalerCallback(save_statistics=path)
    fitted_task = Task()
    _trainer(first).fit(fitted_task, datamodule=DataModule(structures))
    assert first.summary.local_structures == 20
    written = read_statistics(path)
    assert written["targets"]["energy"]["scale"] == float(
        fitted_task.scaler.per_target_scales["energy"].block().values[0, 0]
    )

    loading = ScalerCallback(statistics=path)
    task = Task()
    _trainer(loading, progress=True).fit(task, datamodule=DataModule(structures))
    assert "Fitting scales" not in capsys.readouterr().err
    assert loading.summary is None
    assert task.steps == 2
    assert task.loss.scaler is task.scaler
    for part in ("scaler", "composition"):
        reference = _tensors(getattr(fitted_task, part))
        for key, value in _tensors(getattr(task, part)).items():
            assert torch.equal(value, reference[key]), key

    # the same numbers as fixed scales and baseline of a new fit
    fixing = ScalerCallback(fixed_scales=str(path), fixed_baseline=str(path))
    fixed_task = Task()
    _trainer(fixing).fit(fixed_task, datamodule=DataModule(structures))
    for name in ("energy", "mtt::charge"):
        torch.testing.assert_close(
            fixed_task.scaler.scales[name].block().values,
            fitted_task.scaler.scales[name].block().values,
            rtol=1e-12,
            atol=0,
        )

    with pytest.raises(ValueError, match=r"no statistics for atomic type\(s\) \[9\]"):
        _trainer(ScalerCallback(statistics=path)).fit(
            Task(), datamodule=TypedDataModule(structures, [1, 6, 8, 9])
        )
    more = {"energy": {"quantity": "energy"}, "mtt::charge": {}, "mtt::multi": {}, "mtt::dos": {}}
    with pytest.raises(
        ValueError,
        match=r"statistics file '.*statistics.yaml' has targets .*missing: \['mtt::dos'\]",
    ):
        _trainer(ScalerCallback(statistics=path)).fit(
            Task(loss_targets=more),
            datamodule=DataModule(structures, targets=(*TARGETS, "mtt::dos")),
        )


def test_command_line_fit_and_app_keys(tmp_path, monkeypatch):
    from pl_mtt.training.fit_statistics import main

    monkeypatch.setenv("PL_MTT_CACHE", str(tmp_path / "cache"))
    data = embedded_dataset("emt", n_structures=12)
    output = tmp_path / "statistics.yaml"
    assert main([data.path, str(output), "--batch-size", "5"]) == 0
    dataset = open_dataset(data.path, data.targets)
    layouts = dataset.layouts()
    scaler, composition = Scaler(None, layouts), CompositionModel(None, layouts)
    from pl_mtt.data import collate

    loader = torch.utils.data.DataLoader(dataset, batch_size=4, collate_fn=collate)
    fit_pass(loader, scaler, composition)
    loaded, loaded_composition = Scaler(None, layouts), CompositionModel(None, layouts)
    load_statistics(output, loaded, loaded_composition, {"energy": "eV"})
    torch.testing.assert_close(
        loaded.scales["energy"].block().values,
        scaler.scales["energy"].block().values,
        rtol=1e-12,
        atol=0,
    )
    assert main([data.path, str(tmp_path / "x.yaml"), "--targets", "{energy: {key: E}}"]) == 2

    from hydra import compose, initialize_config_dir

    from pl_mtt.training.app import _scaler_callback, config_dir
    from pl_mtt.training.schema import register_configs

    register_configs()
    with initialize_config_dir(config_dir=config_dir(), version_base="1.3"):
        cfg = compose(
            config_name="config",
            overrides=[f"scaler.statistics={output}", "scaler.save_statistics=false"],
        )
        callback = _scaler_callback(cfg, [], tmp_path)
        assert callback.statistics["atomic_types"] == [29, 79]
        assert callback.save_statistics is None
        cfg = compose(
            config_name="config",
            overrides=[f"scaler.fixed_scales={output}", "++scaler.fixed_baseline.energy.29=-3.0"],
        )
        callback = _scaler_callback(cfg, [], tmp_path)
        assert callback.fixed_scales == fixed_scales_from(output)
        assert callback.fixed_baseline == {"energy": {"29": -3.0}}  # keys as Hydra gives them
        assert callback.save_statistics == tmp_path / "statistics.yaml"
