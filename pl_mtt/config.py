"""The loss-configuration grammar: every form of the spec -> one internal form.

All of these describe the same loss for an energy target with forces and stress:

.. code-block:: yaml

    loss: mse                       # global shorthand

    loss:                           # per-target mapping, MLIP keys
      energy:
        type: mse
        forces: mse
        stress: {type: mse, weight: 1.0}

    loss:                           # internal form
      energy:
        type: mse
        weight: 1.0
        reduction: mean
        gradients:
          positions: {type: mse, weight: 1.0, reduction: mean}
          strain: {type: mse, weight: 1.0, reduction: mean}

    loss:                           # weighted terms (only in the expanded form when given)
      energy:
        sample_weights: config_weight         # extra_data["config_weight"]
        forces: {type: mse, sample_weights: config_weight, type_weights: {29: 1.0, 79: 2.0}}

:func:`expand_loss_config` returns the internal form as plain nested dicts with every
default filled in, or raises a ``ValueError`` naming the offending key path.
"""

from __future__ import annotations

import difflib
from collections.abc import Iterator, Mapping, Sequence
from typing import Any

from pl_mtt.registry import (
    PARAM_KINDS,
    REQUIRED,
    WEIGHTING_KEYS,
    LossType,
    get_loss_type,
    loss_type_names,
)

__all__ = [
    "check_known_keys",
    "expand_loss_config",
    "gradient_alias",
    "is_energy_like",
    "loss_terms",
    "requested_gradients",
    "restrict_loss_to_targets",
    "target_unit",
    "to_plain",
]

DEFAULT_TYPE = "mse"
DEFAULT_WEIGHT = 1.0
DEFAULT_REDUCTION = "mean"

# MLIP keys of an energy-like target -> the gradient they name
MLIP_GRADIENT_KEYS = {"forces": "positions", "stress": "strain", "virial": "strain"}
COMMON_TERM_KEYS = ("type", "weight", "reduction")


def to_plain(value: Any) -> Any:
    """OmegaConf containers -> plain Python containers (other values unchanged)."""
    try:
        from omegaconf import DictConfig, ListConfig, OmegaConf
    except ImportError:  # pragma: no cover - omegaconf comes with hydra-core
        return value
    if isinstance(value, (DictConfig, ListConfig)):
        return OmegaConf.to_container(value, resolve=True)
    return value


def _suggest(word: Any, choices: Sequence[str]) -> str:
    close = difflib.get_close_matches(str(word), list(choices), n=1, cutoff=0.5)
    return f" Did you mean '{close[0]}'?" if close else ""


def _expected_list(choices: Sequence[str]) -> str:
    return ", ".join(f"'{c}'" for c in choices)


def check_known_keys(
    mapping: Mapping[str, Any], valid: Sequence[str], path: str, what: str = "key"
) -> None:
    """Raise a ``ValueError`` for the first key of ``mapping`` not in ``valid``, naming
    its path (``<path>.<key>``), the valid keys and the closest one."""
    for key in mapping:
        if key not in valid:
            raise ValueError(
                f"{path}.{key}: unknown {what}; valid: {_expected_list(valid)}."
                f"{_suggest(key, valid)}"
            )


def is_energy_like(name: str, options: Mapping[str, Any] | None) -> bool:
    """Whether a training target is an energy (``quantity: energy`` or named ``energy``)."""
    quantity = (options or {}).get("quantity")
    return quantity == "energy" or (name == "energy" and quantity in (None, ""))


def target_unit(name: str, options: Mapping[str, Any] | None) -> str:
    """The target's ``unit``; without one, ``eV`` for an energy (the data layer's unit of
    energies) and ``""`` otherwise."""
    options = options or {}
    return options.get("unit") or ("eV" if is_energy_like(name, options) else "")


def _is_requested(option: Any) -> bool:
    """``forces: true``, a mapping (``read_from`` ...) or a key name turn a gradient on."""
    if isinstance(option, bool) or option is None:
        return bool(option)
    if isinstance(option, (Mapping, str)):
        return True
    raise ValueError(f"expected true, false or a mapping, got {option!r}")


def requested_gradients(name: str, options: Mapping[str, Any] | None) -> list[str]:
    """Gradient names a training target provides, from its options.

    ``forces`` -> ``positions``; ``stress``/``virial`` -> ``strain`` (energy-like
    targets only); an explicit ``gradients`` list or mapping adds any other name.
    Nothing is on by default.
    """
    options = to_plain(options) or {}
    path = f"targets.{name}"
    if not isinstance(options, Mapping):
        raise ValueError(f"{path}: expected a mapping of target options, got {options!r}")
    gradients: list[str] = []
    energy_like = is_energy_like(name, options)
    on = {}
    for key in MLIP_GRADIENT_KEYS:
        if key not in options:
            continue
        try:
            on[key] = _is_requested(options[key])
        except ValueError as error:
            raise ValueError(f"{path}.{key}: {error}") from None
        if on[key] and not energy_like:
            raise ValueError(
                f"{path}.{key}: '{key}' is only available for energy-like targets "
                f"(quantity: energy or the name 'energy'); target '{name}' has "
                f"quantity {options.get('quantity')!r}"
            )
    if on.get("stress") and on.get("virial"):
        raise ValueError(f"{path}: give either 'stress' or 'virial', not both")
    if on.get("forces"):
        gradients.append("positions")
    if on.get("stress") or on.get("virial"):
        gradients.append("strain")
    explicit = options.get("gradients")
    if explicit is not None:
        if isinstance(explicit, str) or not isinstance(explicit, (list, tuple, Mapping)):
            raise ValueError(
                f"{path}.gradients: expected a list or mapping of gradient names, got {explicit!r}"
            )
        for gradient in explicit:
            if not isinstance(gradient, str):
                raise ValueError(f"{path}.gradients: gradient names are strings, got {gradient!r}")
            if gradient not in gradients:
                gradients.append(gradient)
    return gradients


def gradient_alias(target_name: str, options: Mapping[str, Any] | None, gradient: str) -> str:
    """Readable name of a gradient: ``forces``/``stress``/``virial`` for energies."""
    options = to_plain(options) or {}
    if is_energy_like(target_name, options):
        if gradient == "positions":
            return "forces"
        if gradient == "strain":
            return "virial" if _is_requested(options.get("virial", False)) else "stress"
    return gradient


def loss_terms(
    expanded: Mapping[str, Any], targets: Mapping[str, Any]
) -> Iterator[tuple[str, str, str | None, dict]]:
    """``(term name, target, gradient or None, term)`` of every term of an expanded loss
    config, in order: each target, then its gradients, named ``energy``,
    ``energy/forces``, ``mtt::x/positions`` (:func:`gradient_alias`)."""
    for target, entry in expanded.items():
        yield target, target, None, entry
        for gradient, term in entry["gradients"].items():
            alias = gradient_alias(target, targets.get(target), gradient)
            yield f"{target}/{alias}", target, gradient, term


def _loss_type(value: Any, path: str) -> LossType:
    if not isinstance(value, str):
        raise ValueError(f"{path}: expected a loss type name (a string), got {value!r}")
    try:
        return get_loss_type(value)
    except KeyError:
        names = loss_type_names()
        raise ValueError(
            f"{path}: unknown loss type '{value}'. Valid types: {_expected_list(names)}."
            f"{_suggest(value, names)}"
        ) from None


def _check_gradient_support(loss_type: LossType, path: str) -> None:
    if not loss_type.supports_gradients:
        raise ValueError(
            f"{path}: loss type '{loss_type.name}' cannot be used on a gradient; "
            f"use e.g. 'mse', 'mae' or 'huber'"
        )


def _expand_term(
    spec: Any, path: str, *, allowed_extra: tuple[str, ...] = (), on_gradient: bool = False
) -> dict:
    """One loss term (string shorthand or mapping) -> full mapping without gradients.

    Keys in ``allowed_extra`` (gradients, forces, stress, virial) are accepted but not
    expanded here: the caller handles them.
    """
    if isinstance(spec, str):
        spec = {"type": spec}
    if spec is None:
        spec = {}
    if not isinstance(spec, Mapping):
        raise ValueError(
            f"{path}: expected a loss type name or a mapping with 'type', 'weight', "
            f"'reduction', got {spec!r}"
        )
    type_path = f"{path}.type"
    loss_type = _loss_type(spec.get("type", DEFAULT_TYPE), type_path)
    if on_gradient:
        _check_gradient_support(loss_type, type_path)
    term: dict[str, Any] = {"type": loss_type.name}

    weight = spec.get("weight", DEFAULT_WEIGHT)
    try:
        term["weight"] = PARAM_KINDS["non_negative_float"](weight)
    except ValueError as error:
        raise ValueError(f"{path}.weight: expected {error}, got {weight!r}") from None

    reduction = spec.get("reduction", DEFAULT_REDUCTION)
    if reduction not in loss_type.reductions:
        raise ValueError(
            f"{path}.reduction: invalid reduction {reduction!r} for loss type "
            f"'{loss_type.name}'; expected one of {_expected_list(list(loss_type.reductions))}."
            f"{_suggest(reduction, list(loss_type.reductions))}"
        )
    term["reduction"] = reduction

    for param_name, param in loss_type.params.items():
        param_path = f"{path}.{param_name}"
        if param_name in spec:
            try:
                term[param_name] = param.convert(spec[param_name])
            except (ValueError, TypeError) as error:
                raise ValueError(
                    f"{param_path}: expected {error}, got {spec[param_name]!r}"
                ) from None
        elif param.default is REQUIRED:
            raise ValueError(
                f"{param_path}: loss type '{loss_type.name}' requires parameter '{param_name}'"
            )
        else:
            term[param_name] = param.default

    for key in loss_type.weighting:
        if spec.get(key) is None:
            continue  # not given: no weights
        try:
            term[key] = PARAM_KINDS[WEIGHTING_KEYS[key]](spec[key])
        except (ValueError, TypeError) as error:
            raise ValueError(f"{path}.{key}: expected {error}, got {spec[key]!r}") from None

    valid = [*COMMON_TERM_KEYS, *loss_type.params, *loss_type.weighting, *allowed_extra]
    for key in spec:
        if key in WEIGHTING_KEYS and key not in loss_type.weighting:
            if spec[key] is None:
                continue
            supported = [n for n in loss_type_names() if key in get_loss_type(n).weighting]
            raise ValueError(
                f"{path}.{key}: loss type '{loss_type.name}' does not take '{key}'"
                f"{_weighting_reason(loss_type, key)}; loss types that do: "
                f"{_expected_list(supported)}"
            )
        if key not in valid:
            raise ValueError(
                f"{path}.{key}: unknown key '{key}' for loss type '{loss_type.name}'. "
                f"Valid keys: {_expected_list(valid)}.{_suggest(key, valid)}"
            )
    return term


def _weighting_reason(loss_type: LossType, key: str) -> str:
    if key == "type_weights" and "sample_weights" in loss_type.weighting:
        return " (it has one loss per structure: no per-atom entries to weight by type)"
    return ""


def _check_type_weights(term: dict, path: str, name: str, options: Mapping, gradient: str | None):
    """``type_weights`` on a term known to have no per-atom entries is an error: a
    per-structure target's values (``per_atom: false``), a ``strain`` gradient. Other
    terms are checked on their first call (their rows must name atoms)."""
    if "type_weights" not in term:
        return
    if gradient is None and options.get("per_atom") is False:
        what = f"target '{name}' has one entry per structure (per_atom: false)"
    elif gradient == "strain":
        what = f"the strain gradient (stress/virial) of '{name}' has one entry per structure"
    else:
        return
    hint = f" (e.g. loss.{name}.forces.type_weights)" if is_energy_like(name, options) else ""
    raise ValueError(
        f"{path}.type_weights: {what}; type weights apply to per-atom entries (forces, "
        f"per-atom targets){hint}"
    )


def _given_gradients(
    spec: Mapping[str, Any], path: str, energy_like: bool
) -> dict[str, tuple[str, Any]]:
    """Gradient name -> (its key under the target, its loss term) as a target's loss
    entry gives them: ``forces``/``stress``/``virial`` (energy-like targets) and the
    ``gradients`` mapping."""
    given: dict[str, tuple[str, Any]] = {}
    for key, gradient in MLIP_GRADIENT_KEYS.items():
        if key not in spec or not energy_like:
            continue
        if gradient in given:
            raise ValueError(f"{path}: give either 'stress' or 'virial', not both")
        given[gradient] = (key, spec[key])
    explicit = spec.get("gradients")
    if explicit is not None:
        if not isinstance(explicit, Mapping):
            raise ValueError(
                f"{path}.gradients: expected a mapping of gradient name -> loss term, "
                f"got {explicit!r}"
            )
        for gradient, gradient_spec in explicit.items():
            if gradient in given:
                raise ValueError(
                    f"{path}.gradients.{gradient}: already given as '{path}.{given[gradient][0]}'"
                )
            given[gradient] = (f"gradients.{gradient}", gradient_spec)
    return given


def _expand_target(name: str, spec: Any, options: Mapping[str, Any], gradients: list[str]) -> dict:
    path = f"loss.{name}"
    energy_like = is_energy_like(name, options)
    mapping = spec if isinstance(spec, Mapping) else {}
    for key, gradient in MLIP_GRADIENT_KEYS.items():
        if key in mapping and not energy_like:
            raise ValueError(
                f"{path}.{key}: '{key}' is only available for energy-like targets "
                f"(quantity: energy or the name 'energy'); target '{name}' has "
                f"quantity {options.get('quantity')!r}. Use 'gradients: {{{gradient}: ...}}' "
                f"for a custom gradient"
            )
    extra_keys = ("gradients", *MLIP_GRADIENT_KEYS) if energy_like else ("gradients",)
    term = _expand_term(spec, path, allowed_extra=extra_keys)
    _check_type_weights(term, path, name, options, None)
    given = {  # gradient name -> (key path, spec)
        gradient: (f"{path}.{key}", gradient_spec)
        for gradient, (key, gradient_spec) in _given_gradients(mapping, path, energy_like).items()
    }

    for gradient, (gradient_path, _) in given.items():
        if gradient not in gradients:
            provided = ", ".join(gradients) if gradients else "none"
            raise ValueError(
                f"{gradient_path}: target '{name}' does not provide gradient '{gradient}' "
                f"in the training targets (provided: {provided}); request it there "
                f"(e.g. forces: true / stress: true) or remove this loss entry"
            )

    term["gradients"] = {}
    for gradient in gradients:
        gradient_path, gradient_spec = given.get(gradient, (f"{path}.gradients.{gradient}", None))
        gradient_term = _expand_term(gradient_spec, gradient_path, on_gradient=True)
        _check_type_weights(gradient_term, gradient_path, name, options, gradient)
        term["gradients"][gradient] = gradient_term
    return term


def expand_loss_config(loss: Any, targets: Mapping[str, Any]) -> dict[str, dict]:
    """Expand any loss-config form of the spec into the internal form.

    Args:
        loss: a loss type name (global shorthand, e.g. ``"mse"``), a mapping of target
            name -> loss term (type name or mapping; dict or OmegaConf ``DictConfig``),
            or ``None`` for all defaults.
        targets: training target name -> target options as in the spec's
            ``training_set.targets`` (``quantity``, ``forces``, ``stress``, ``virial``,
            ``gradients``, ...).

    Returns:
        ``{target: {"type", "weight", "reduction", <params>, "gradients": {gradient:
        {"type", "weight", "reduction", <params>}}}}`` as plain dicts, one entry per
        training target, every default filled in.

    Raises:
        ValueError: naming the offending key path and what was expected.
    """
    loss = to_plain(loss)
    targets = to_plain(targets)
    if targets is None:
        targets = {}
    if not isinstance(targets, Mapping):
        raise ValueError(f"targets: expected a mapping of target name -> options, got {targets!r}")
    target_gradients = {name: requested_gradients(name, opts) for name, opts in targets.items()}

    if loss is None:
        loss = {}
    if isinstance(loss, str):
        term = _expand_term(loss, "loss")
        expanded = {}
        for name, gradients in target_gradients.items():
            if gradients:
                _check_gradient_support(get_loss_type(term["type"]), "loss")
            expanded[name] = {**term, "gradients": {g: dict(term) for g in gradients}}
        return expanded
    if not isinstance(loss, Mapping):
        raise ValueError(
            f"loss: expected a loss type name (e.g. 'mse') or a mapping of target name "
            f"-> loss term, got {type(loss).__name__} {loss!r}"
        )

    names = list(targets)
    for name in loss:
        if name not in targets:
            raise ValueError(
                f"loss.{name}: target '{name}' is not among the training targets. "
                f"Training targets: {_expected_list(names) or 'none'}.{_suggest(name, names)}"
            )
    return {
        name: _expand_target(name, loss.get(name), targets[name] or {}, target_gradients[name])
        for name in targets
    }


def _rename_path(error: ValueError, path: str) -> ValueError:
    """The error of an expansion with its key paths under ``path`` instead of ``loss``."""
    message = str(error)
    if path != "loss" and (message.startswith("loss.") or message.startswith("loss:")):
        message = path + message[len("loss") :]
    return ValueError(message)


def _merge_term(base: Mapping[str, Any], override: Any, path: str) -> dict:
    """``override`` (a type name, a mapping of fields, or None) over one expanded term.

    Fields not given keep their base value. A new type drops the parameters of the old
    type (weight, reduction, ``sample_weights`` and ``type_weights`` are kept); the new
    type's parameters take the given values or their defaults.
    """
    if override is False:
        raise ValueError(f"{path}: a term cannot be removed here (set its weight to 0.0 instead)")
    if override is None:
        override = {}
    elif isinstance(override, str):
        override = {"type": override}
    elif not isinstance(override, Mapping):
        raise ValueError(
            f"{path}: expected a loss type name or a mapping of term fields, got {override!r}"
        )
    merged = {k: v for k, v in base.items() if k != "gradients"}
    if "type" in override and override["type"] != base["type"]:
        kept = ("weight", "reduction", *WEIGHTING_KEYS)
        merged = {k: merged[k] for k in kept if k in merged}
    merged.update(override)
    return merged


def merge_loss_config(
    base: Any, override: Any, targets: Mapping[str, Any], path: str = "loss"
) -> dict[str, dict]:
    """``override``, a partial loss config in any form, merged over ``base``; the result
    in the internal form (as :func:`expand_loss_config`).

    Only what ``override`` gives changes: ``{energy: {forces: {weight: 10.0}}}`` changes
    one weight; a type name (``forces: mae``) changes a type and keeps the weight; a
    global shorthand (``mae``) changes every type. The terms stay the same: naming a
    target or gradient without a term in ``base`` is an error (``path`` prefixes the
    key paths of errors, e.g. ``loss_schedule[0].loss``).

    .. code-block:: python

        merge_loss_config({"energy": {"forces": "mae"}}, {"energy": {"weight": 10.0}},
                          {"energy": {"quantity": "energy", "forces": True}})
        # energy: mse, weight 10.0; energy/forces: mae, weight 1.0
    """
    targets = to_plain(targets) or {}
    expanded = expand_loss_config(base, targets)
    override = to_plain(override)
    if override is None:
        return expanded

    def terms_of(name: str) -> str:
        return ", ".join(n for n, target, _, _ in loss_terms(expanded, targets) if target == name)

    merged: dict[str, dict] = {}
    if isinstance(override, str):
        for name, entry in expanded.items():
            merged[name] = _merge_term(entry, override, path)
            merged[name]["gradients"] = {
                g: _merge_term(term, override, path) for g, term in entry["gradients"].items()
            }
    elif isinstance(override, Mapping):
        for name in override:
            if name not in expanded:
                names = list(expanded)
                raise ValueError(
                    f"{path}.{name}: '{name}' has no term in the loss, and terms cannot be "
                    f"added here. Terms exist for: {_expected_list(names) or 'none'}."
                    f"{_suggest(name, names)}"
                )
        for name, entry in expanded.items():
            spec = override.get(name)
            target_path = f"{path}.{name}"
            energy_like = is_energy_like(name, targets[name])
            mapping = spec if isinstance(spec, Mapping) else {}
            gradient_specs = _given_gradients(mapping, target_path, energy_like)
            for gradient, (key, _) in gradient_specs.items():
                if gradient not in entry["gradients"]:
                    raise ValueError(
                        f"{target_path}.{key}: target '{name}' has no '{gradient}' gradient "
                        f"term in the loss, and terms cannot be added here. Terms of "
                        f"'{name}': {terms_of(name)}"
                    )
            own = {
                k: v
                for k, v in mapping.items()
                if k != "gradients" and not (energy_like and k in MLIP_GRADIENT_KEYS)
            }
            term = _merge_term(entry, spec if isinstance(spec, (str, bool)) else own, target_path)
            gradients, renamed = {}, {}
            for gradient, gradient_term in entry["gradients"].items():
                key, gradient_spec = gradient_specs.get(gradient, (None, None))
                value = _merge_term(gradient_term, gradient_spec, f"{target_path}.{key}")
                if key in MLIP_GRADIENT_KEYS:
                    renamed[key] = value  # errors name the key the override used
                else:
                    gradients[gradient] = value
            merged[name] = {**term, **renamed, "gradients": gradients}
    else:
        raise ValueError(
            f"{path}: expected a loss type name or a mapping of target name -> loss term, "
            f"got {type(override).__name__} {override!r}"
        )
    try:
        return expand_loss_config(merged, targets)
    except ValueError as error:
        raise _rename_path(error, path) from None


def _named(path: tuple[str, ...], keep: Sequence[tuple[str, ...]]) -> bool:
    """Whether ``path`` (or an entry inside it, or one around it) is in ``keep``."""
    return any(path[: len(k)] == k or k[: len(path)] == path for k in keep)


def restrict_loss_to_targets(
    loss: Any, targets: Mapping[str, Any], keep: Sequence[Sequence[str]] = ()
) -> tuple[Any, list[str]]:
    """A loss config without the entries for data the training targets do not provide.

    A default loss (e.g. the app's ``mlip``: energy, forces and stress) can then serve
    any file: entries for a target that is not trained, or for a gradient the target
    does not provide (``forces``/``stress``/``virial`` of an energy, or a name under
    ``gradients``) are removed. Entries whose key path (without ``loss.``) is in
    ``keep``, or lies inside or around one that is, stay, so that
    :func:`expand_loss_config` reports them as errors: what a user wrote explicitly is
    never dropped. A global shorthand (``"mse"``) already covers exactly the targets.

    .. code-block:: python

        restrict_loss_to_targets(
            {"energy": {"type": "mse", "forces": "mse", "stress": "mse"}},
            {"energy": {"quantity": "energy", "forces": True, "stress": False}},
        )  # -> ({"energy": {"type": "mse", "forces": "mse"}}, ["loss.energy.stress"])

    Returns:
        ``(loss, dropped)``: the restricted config (plain containers) and the key paths
        of the removed entries (``loss.energy.stress``), to be reported.
    """
    loss, targets = to_plain(loss), to_plain(targets) or {}
    keep = [tuple(str(part) for part in path) for path in keep]
    if not isinstance(loss, Mapping):
        return loss, []
    restricted: dict[str, Any] = {}
    dropped: list[str] = []
    for name, spec in loss.items():
        if name not in targets and not _named((name,), keep):
            dropped.append(f"loss.{name}")
            continue
        if name not in targets or not isinstance(spec, Mapping):
            restricted[name] = spec
            continue
        provided = requested_gradients(name, targets[name])
        spec = dict(spec)
        if is_energy_like(name, targets[name]):
            for key, gradient in MLIP_GRADIENT_KEYS.items():
                if key in spec and gradient not in provided and not _named((name, key), keep):
                    del spec[key]
                    dropped.append(f"loss.{name}.{key}")
        gradients = spec.get("gradients")
        if isinstance(gradients, Mapping):
            spec["gradients"] = {}
            for gradient, term in gradients.items():
                if gradient in provided or _named((name, "gradients", gradient), keep):
                    spec["gradients"][gradient] = term
                else:
                    dropped.append(f"loss.{name}.gradients.{gradient}")
        restricted[name] = spec
    return restricted, dropped
