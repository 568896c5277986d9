"""Batchwise random-magnitude sign-concordant feedback, brSF (Liao, Leibo & Poggio 2016, "How
important is weight symmetry in backpropagation?"; the name and the absolute value as in
BioTorch, Sanfiz & Akrout 2021).

Backprop's backward pass with every kernel W, for the input's cotangent only, replaced by

    B = |R_t| * sign(W),   R_t ~ N(0, 2 / (fan_in + fan_out)) drawn AFRESH at every step t

(from the step's key: one seed still determines the run). ``frsf`` draws R once.
(``altlearn.rules._feedback``: dense and convolutional layers, any provided model.) Reports
``feedback_angle`` for one draw of R (a fixed key).
"""

from __future__ import annotations

from typing import Any

import optax

from altlearn.losses import Task
from altlearn.models import Model, feedback_kernels
from altlearn.rules import _feedback
from altlearn.rules.base import LearningRule, RuleSpec, Splits


def brsf(
    model: Model,
    task: Task,
    optimizer: optax.GradientTransformation,
    data: Splits,
    decorrelation_rate: Any = 1e-3,
    decorrelation_every: int = 1,
) -> LearningRule:
    """B = |R| * sign(W) with R redrawn from the step's key at every step."""
    del data

    def make(key, params, state):
        del state
        magnitudes = _feedback.random_like(key, feedback_kernels(params), _feedback.glorot_std)
        return _feedback.sign_concordant(magnitudes, params)

    return _feedback.feedback_rule(
        model, task, optimizer, make, None, decorrelation_rate, decorrelation_every
    )


SPEC = RuleSpec(
    brsf,
    summary="backprop with feedback |R| sign(W), random magnitudes R redrawn every step",
    source="Liao et al. 2016",
    cost=_feedback.backprop_cost,
)
