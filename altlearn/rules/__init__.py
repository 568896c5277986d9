"""The rule registry: binaries, docs and the conformance tests all read ``RULES``."""

from __future__ import annotations

from typing import Any

import optax

from altlearn.losses import Task
from altlearn.models import Model
from altlearn.rules.backprop import backprop
from altlearn.rules.base import (
    EstimateAux,
    GradientRuleState,
    LearningRule,
    RuleSpec,
    gradient_rule,
    rule_options,
)
from altlearn.rules.closed_form import closed_form
from altlearn.rules.evolution import evolution
from altlearn.rules.node_perturbation import (
    forward_gradient,
    node_perturbation,
    weight_perturbation,
)
from altlearn.rules.swarm import neuron_pso, pso

RULES: dict[str, RuleSpec] = {
    "backprop": RuleSpec(
        backprop,
        needs_layered=False,
        uses_optimizer=True,
        summary="exact gradient by jax.grad; DBP on a decorrelated model",
        source="baseline",
    ),
    "node_perturbation": RuleSpec(
        node_perturbation,
        needs_layered=True,
        uses_optimizer=True,
        summary="noise on every pre-activation, learning from the per-sample loss change "
        "(variants np, anp, inp; finite difference or jvp); DNP/DANP/DINP on a decorrelated model",
        source="paper 003 (Dalm et al., arXiv 2310.00965)",
    ),
    "weight_perturbation": RuleSpec(
        weight_perturbation,
        needs_layered=False,
        uses_optimizer=True,
        summary="noise on the weights, loss change between two forward passes",
        source="relative of paper 003",
    ),
    "forward_gradient": RuleSpec(
        forward_gradient,
        needs_layered=False,
        uses_optimizer=True,
        summary="weight-space directional derivative along a random tangent (one jvp)",
        source="Baydin et al. 2022",
    ),
    "evolution": RuleSpec(
        evolution,
        needs_layered=False,
        uses_optimizer=True,
        summary="any evosax strategy (Open_ES, SNES, Sep_CMA_ES, PGPE, PSO, DE, GAs, ...) over the "
        "whole params pytree; fitness = batch loss in one vmap (chunked, sharded)",
        source="evosax (Lange 2023); RULES.md section 2",
    ),
    "pso": RuleSpec(
        pso,
        needs_layered=False,
        uses_optimizer=False,
        summary="whole-network particle swarm (constriction coefficients, velocity clamp); bests "
        "re-scored on each batch; population vmapped, chunked, sharded",
        source="baseline of paper 000 (Kumar, arXiv 2412.05667); Clerc & Kennedy 2002",
    ),
    "neuron_pso": RuleSpec(
        neuron_pso,
        needs_layered=True,
        uses_optimizer=False,
        summary="a cooperative swarm per neuron (Jacobi or Gauss-Seidel), neurons x particles in "
        "one vmap, downstream-only evaluation",
        source="paper 000 (Kumar, arXiv 2412.05667); RULES.md section 3",
    ),
    "closed_form": RuleSpec(
        closed_form,
        needs_layered=True,
        uses_optimizer=False,
        summary="two-layer ReLU/leaky MLP, square loss: alternating closed-form solves of the "
        "output layer (ridge) and the hidden layer (activation pattern frozen, block-structured "
        "normal equations, Cholesky), backtracked so the loss never rises; float64, full batch",
        source="paper 002 (Barbu, arXiv 2304.02972); RULES.md section 4",
        prefers_x64=True,
    ),
}


def get_rule_spec(name: str) -> RuleSpec:
    if name not in RULES:
        raise ValueError(f"Unknown rule {name!r}; valid choices: {', '.join(RULES)}.")
    return RULES[name]


def options_of(name: str) -> dict[str, Any]:
    """The options of rule ``name`` with their defaults."""
    return rule_options(get_rule_spec(name))


def make_rule(
    name: str, model: Model, task: Task, optimizer: optax.GradientTransformation, **options: Any
) -> LearningRule:
    """Builds rule ``name``; checks its options and that the model offers what it needs."""
    spec = get_rule_spec(name)
    valid = rule_options(spec)
    unknown = sorted(set(options) - set(valid))
    if unknown:
        raise ValueError(
            f"Unknown option(s) {unknown} for rule {name!r}; valid options: "
            f"{', '.join(valid) or '(none)'}."
        )
    if spec.needs_layered and not model.layered:
        raise ValueError(
            f"Rule {name!r} needs a layered model (mlp, cnn, vgg) to read layer inputs and "
            f"pre-activations; model {model.name!r} offers only a forward pass."
        )
    return spec.factory(model, task, optimizer, **options)


__all__ = [
    "RULES",
    "EstimateAux",
    "GradientRuleState",
    "LearningRule",
    "RuleSpec",
    "backprop",
    "closed_form",
    "evolution",
    "forward_gradient",
    "get_rule_spec",
    "gradient_rule",
    "make_rule",
    "neuron_pso",
    "node_perturbation",
    "options_of",
    "pso",
    "weight_perturbation",
]
