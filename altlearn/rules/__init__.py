"""The rule registry, and a rule resolved once: binaries, docs and the conformance tests read
``RULES``; everything else asks a ``Rule``.

Each rule lives in the module named after its entry and owns its ``RuleSpec`` (``SPEC``): the
factory, what it needs, its cost per step and its docs row. ``resolve(section)`` turns a config
section (``{"name": ..., **options}``) into a ``Rule``: the spec with its options checked and
every default filled in, asked for its cost, precision and optimizer use, and called like a
factory to build the ``LearningRule``.

A combinator takes its inner rule as a VALUE: a factory option whose default is another rule's
factory (persistent's ``inner=backprop.backprop``). In a config such an option is a section of
its own, ``rule.inner = {"name": "backprop", **backprop's options}``; ``resolve`` makes it a
``Rule`` (a factory) before the combinator sees it, and a config switches it by name
(``--config.rule.inner.name=node_perturbation``), as it switches the rule itself.
"""

from __future__ import annotations

import dataclasses
import inspect
from collections.abc import Mapping
from typing import Any

import optax

from altlearn.losses import Task
from altlearn.models import Model
from altlearn.rules import (
    backprop,
    brsf,
    closed_form,
    dfa,
    evolution,
    fa,
    forward_gradient,
    frsf,
    hybrid,
    kp,
    neuron_pso,
    node_perturbation,
    pepita,
    persistent,
    pso,
    usf,
    weight_perturbation,
)
from altlearn.rules.base import (
    NEEDS,
    SPLITS,
    Batch,
    EstimateAux,
    GradientRuleState,
    LearningRule,
    NeedsEstimate,
    RuleSpec,
    Sizes,
    batch_loss,
    gradient_rule,
    params_loss,
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
    "fa": fa.SPEC,
    "dfa": dfa.SPEC,
    "usf": usf.SPEC,
    "brsf": brsf.SPEC,
    "frsf": frsf.SPEC,
    "kp": kp.SPEC,
    "pepita": pepita.SPEC,
}


def get_rule_spec(name: str) -> RuleSpec:
    if name not in RULES:
        raise ValueError(f"Unknown rule {name!r}; valid choices: {', '.join(RULES)}.")
    return RULES[name]


def _registered_name(value: Any) -> str | None:
    """The registry name of a rule factory (a combinator's default inner rule), else None."""
    return next((n for n, s in RULES.items() if s.factory is value), None)


def _factory_defaults(spec: RuleSpec) -> dict[str, Any]:
    """The factory's options with their defaults (its arguments after model, task, optimizer
    and data)."""
    params = list(inspect.signature(spec.factory).parameters.values())[4:]
    return {p.name: p.default for p in params}


def rule_valued_options(name: str) -> list[str]:
    """The options that take a rule (a combinator's inner rule), for rule ``name``."""
    return [k for k, v in _factory_defaults(get_rule_spec(name)).items() if _registered_name(v)]


def options_of(name: str) -> dict[str, Any]:
    """The options of rule ``name`` with their defaults, as a config holds them: an option that
    takes a rule is that rule's section, ``{"name": ..., **its defaults}``."""
    out = {}
    for key, default in _factory_defaults(get_rule_spec(name)).items():
        inner = _registered_name(default)
        out[key] = {"name": inner, **options_of(inner)} if inner else default
    return out


@dataclasses.dataclass(frozen=True)
class Rule:
    """A rule resolved once: its name, spec and checked options (defaults filled in; an option
    that takes a rule holds that rule's ``Rule``). Call it like a factory,
    ``rule(model, task, optimizer, data, values=None)``; ``values`` replaces options by their
    dotted names (``sigma``, ``inner.sigma``, ``strategy_params.std_init``), possibly traced:
    what a sweep or the training program varies."""

    name: str
    spec: RuleSpec
    options: dict[str, Any]

    @property
    def needs_layered(self) -> bool:
        return "layered" in self.spec.needs

    @property
    def splits(self) -> tuple[str, ...]:
        return tuple(s for s in self.spec.needs if s in SPLITS)

    @property
    def uses_optimizer(self) -> bool:
        """Whether the rule applies the configured optimizer (``RuleSpec.uses_optimizer``)."""
        return bool(self.spec.uses_optimizer(self.options))

    @property
    def wants_x64(self) -> bool:
        """Whether the rule solves in float64 (``RuleSpec.wants_x64``)."""
        return bool(self.spec.wants_x64(self.options))

    def cost(self, model: Model, sizes: Sizes) -> float:
        """Forward-pass equivalents of one step, in passes of a training batch."""
        return float(self.spec.cost(model, self.options, sizes))

    def with_values(self, values: Mapping[str, Any] | None) -> Rule:
        """This rule with the options named by ``values`` (dotted) replaced."""
        if not values:
            return self
        return dataclasses.replace(self, options=_substitute(self.options, values, ""))

    def __call__(
        self,
        model: Model,
        task: Task,
        optimizer: optax.GradientTransformation,
        data: Mapping[str, Batch] | None = None,
        values: Mapping[str, Any] | None = None,
    ) -> LearningRule:
        """Builds the rule; checks that the model offers what it needs and that ``data`` holds
        the splits it declares."""
        if self.needs_layered and not model.layered:
            raise ValueError(
                f"Rule {self.name!r} needs a layered model (mlp, cnn, vgg) to read layer inputs "
                f"and pre-activations; model {model.name!r} offers only a forward pass."
            )
        data = dict(data or {})
        missing = [s for s in self.splits if s not in data or data[s][0].shape[0] == 0]
        if missing:
            hint = " (set data.validation_fraction > 0)" if "val" in missing else ""
            raise ValueError(
                f"Rule {self.name!r} needs the {', '.join(missing)} split(s) of the data{hint}."
            )
        options = self.with_values(values).options
        try:
            return self.spec.factory(
                model, task, optimizer, {s: data[s] for s in self.splits}, **options
            )
        except NeedsEstimate as e:  # a combinator refused its inner rule: name the valid ones
            valid = [n for n in RULES if _has_estimate(n, model, task, data)]
            raise ValueError(f"{e}; valid choices: {', '.join(valid)}.") from None


def _has_estimate(name: str, model: Model, task: Task, data: Mapping[str, Batch]) -> bool:
    """Whether rule ``name`` with its default options gives a gradient estimate on ``model``."""
    try:
        return resolve({"name": name})(model, task, optax.identity(), data).estimate is not None
    except ValueError:  # the rule cannot run on this model or data at all
        return False


def _substitute(options: Mapping[str, Any], values: Mapping[str, Any], prefix: str) -> dict:
    out = {}
    for key, value in options.items():
        name = f"{prefix}{key}"
        if isinstance(value, Rule):
            inner = {k[len(name) + 1 :]: v for k, v in values.items() if k.startswith(name + ".")}
            out[key] = value.with_values(inner)
        elif _is_section(value):
            out[key] = _substitute(value, values, name + ".")
        else:
            out[key] = values.get(name, value)
    return out


def _is_section(value: Any) -> bool:
    """A dict or an ml_collections ConfigDict (which is no ``Mapping``)."""
    return isinstance(value, Mapping) or (hasattr(value, "keys") and hasattr(value, "items"))


def _plain(value: Any) -> Any:
    return {k: _plain(v) for k, v in value.items()} if _is_section(value) else value


def resolve(section: Mapping[str, Any]) -> Rule:
    """The ``Rule`` of a config section ``{"name": NAME, **options}`` (a ConfigDict or a dict):
    unknown options are an error naming the valid ones; options left out take their defaults;
    an option that takes a rule is resolved too (a section of its own, or a factory)."""
    section = dict(section.items())
    name = section.pop("name")
    spec = get_rule_spec(name)
    defaults = _factory_defaults(spec)
    unknown = sorted(set(section) - set(defaults))
    if unknown:
        raise ValueError(
            f"Unknown option(s) {unknown} for rule {name!r}; valid options: "
            f"{', '.join(defaults) or '(none)'}."
        )
    options = {}
    for key, default in defaults.items():
        value = section.get(key, default)
        inner = _registered_name(default)
        if inner and isinstance(value, str):  # a rule by name, with its defaults
            value = resolve({"name": value})
        elif inner and _is_section(value):
            value = resolve({"name": inner, **value} if "name" not in value else value)
        elif inner and value is default:
            value = resolve({"name": inner})
        elif _is_section(value):
            value = _plain(value)  # a ConfigDict section becomes a plain dict
        options[key] = value
    return Rule(name, spec, options)


def make_rule(
    name: str,
    model: Model,
    task: Task,
    optimizer: optax.GradientTransformation,
    data: Mapping[str, Batch] | None = None,
    **options: Any,
) -> LearningRule:
    """Builds rule ``name`` with ``options`` (``resolve`` then call)."""
    return resolve({"name": name, **options})(model, task, optimizer, data)


__all__ = [
    "NEEDS",
    "RULES",
    "SPLITS",
    "EstimateAux",
    "GradientRuleState",
    "LearningRule",
    "Rule",
    "RuleSpec",
    "Sizes",
    "batch_loss",
    "get_rule_spec",
    "gradient_rule",
    "make_rule",
    "options_of",
    "params_loss",
    "resolve",
    "rule_valued_options",
]
