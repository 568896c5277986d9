"""The rule registry: binaries, docs and the conformance tests all read ``RULES``.

Each rule lives in the module named after its entry and owns its ``RuleSpec`` (``SPEC``): the
factory, what it needs, its cost per step and its docs row.
"""

from __future__ import annotations

import inspect
from collections.abc import Callable, Mapping
from typing import Any

import optax

from altlearn.losses import Task
from altlearn.models import Model
from altlearn.rules import (
    backprop,
    closed_form,
    evolution,
    forward_gradient,
    hybrid,
    neuron_pso,
    node_perturbation,
    persistent,
    pso,
    weight_perturbation,
)
from altlearn.rules.base import (
    SPLITS,
    Batch,
    EstimateAux,
    GradientRuleState,
    LearningRule,
    RuleSpec,
    batch_loss,
    gradient_rule,
    params_loss,
    rule_options,
)

RULES: dict[str, RuleSpec] = {
    "backprop": backprop.SPEC,
    "node_perturbation": node_perturbation.SPEC,
    "weight_perturbation": weight_perturbation.SPEC,
    "forward_gradient": forward_gradient.SPEC,
    "evolution": evolution.SPEC,
    "pso": pso.SPEC,
    "neuron_pso": neuron_pso.SPEC,
    "closed_form": closed_form.SPEC,
    "persistent": persistent.SPEC,
    "hybrid": hybrid.SPEC,
}


def get_rule_spec(name: str) -> RuleSpec:
    if name not in RULES:
        raise ValueError(f"Unknown rule {name!r}; valid choices: {', '.join(RULES)}.")
    return RULES[name]


def options_of(name: str) -> dict[str, Any]:
    """The options of rule ``name`` with their defaults; a nested rule's options
    (``RuleSpec.nested``) are that rule's defaults."""
    spec = get_rule_spec(name)
    options = rule_options(spec)
    for key, rule_key in spec.nested:
        if options[key] is None:
            options[key] = options_of(options[rule_key])
    return options


def check_options(name: str, options: Mapping[str, Any]) -> dict[str, Any]:
    """``options`` over rule ``name``'s defaults; an unknown option names the valid ones."""
    valid = options_of(name)
    unknown = sorted(set(options) - set(valid))
    if unknown:
        raise ValueError(
            f"Unknown option(s) {unknown} for rule {name!r}; valid options: "
            f"{', '.join(valid) or '(none)'}."
        )
    return {**valid, **options}


def step_cost(
    name: str,
    model: Model,
    options: Mapping[str, Any] | None = None,
    batch_size: int | None = None,
    split_sizes: Mapping[str, int] | None = None,
) -> float:
    """Forward-pass equivalents one step of rule ``name`` spends (its ``RuleSpec.cost``), in
    passes of a training batch. A rule that also evaluates other data (hybrid's validation
    samples) takes ``batch_size`` (to convert) and ``split_sizes`` (samples per split, where the
    caller knows the data) as keyword arguments of its cost."""
    cost = get_rule_spec(name).cost
    options = check_options(name, options or {})
    accepts = inspect.signature(cost).parameters
    extra = {"batch_size": batch_size, "split_sizes": split_sizes}
    return float(cost(model, options, **{k: v for k, v in extra.items() if k in accepts}))


def phase_steps(
    name: str, options: Mapping[str, Any] | None = None
) -> Callable[[int], bool] | None:
    """``t -> bool``: whether step ``t`` (counted from 1) of rule ``name`` with ``options`` runs
    the rule's occasional phase (``RuleSpec.phase_step``); None for a rule without phases."""
    phase_step = get_rule_spec(name).phase_step
    if phase_step is None:
        return None
    options = check_options(name, options or {})
    return lambda t: bool(phase_step(options, int(t)))


def uses_optimizer(name: str, options: Mapping[str, Any] | None = None) -> bool:
    """Whether rule ``name`` with ``options`` applies the configured optimizer
    (``RuleSpec.uses_optimizer``)."""
    return bool(get_rule_spec(name).uses_optimizer(check_options(name, options or {})))


def wants_x64(name: str, options: Mapping[str, Any] | None = None) -> bool:
    """Whether rule ``name`` with ``options`` solves in float64 (``RuleSpec.wants_x64``)."""
    return bool(get_rule_spec(name).wants_x64(check_options(name, options or {})))


def make_rule(
    name: str,
    model: Model,
    task: Task,
    optimizer: optax.GradientTransformation,
    data: Mapping[str, Batch] | None = None,
    **options: Any,
) -> LearningRule:
    """Builds rule ``name``; checks its options, that the model offers what it needs, and that
    ``data`` holds the splits it declares."""
    spec = get_rule_spec(name)
    check_options(name, options)
    if spec.needs_layered and not model.layered:
        raise ValueError(
            f"Rule {name!r} needs a layered model (mlp, cnn, vgg) to read layer inputs and "
            f"pre-activations; model {model.name!r} offers only a forward pass."
        )
    data = dict(data or {})
    missing = [s for s in spec.splits if s not in data or data[s][0].shape[0] == 0]
    if missing:
        hint = " (set data.validation_fraction > 0)" if "val" in missing else ""
        raise ValueError(
            f"Rule {name!r} needs the {', '.join(missing)} split(s) of the data{hint}."
        )
    return spec.factory(model, task, optimizer, {s: data[s] for s in spec.splits}, **options)


__all__ = [
    "RULES",
    "SPLITS",
    "EstimateAux",
    "GradientRuleState",
    "LearningRule",
    "RuleSpec",
    "batch_loss",
    "check_options",
    "get_rule_spec",
    "gradient_rule",
    "make_rule",
    "options_of",
    "params_loss",
    "step_cost",
    "wants_x64",
]
