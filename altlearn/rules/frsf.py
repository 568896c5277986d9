"""Fixed random-magnitude sign-concordant feedback, frSF (Liao, Leibo & Poggio 2016, "How
important is weight symmetry in backpropagation?"; Moskovitz, Litwin-Kumar & Abbott 2018; the
name and the absolute value as in BioTorch, Sanfiz & Akrout 2021).

Backprop's backward pass with every kernel W, for the input's cotangent only, replaced by

    B = |R| * sign(W),   R ~ N(0, 2 / (fan_in + fan_out)) drawn ONCE (kept in the rule's state)

with sign(W) from the current W at every step: the feedback shares each forward weight's sign,
with a random magnitude fixed per connection. ``brsf`` redraws R every step.
(``altlearn.rules._feedback``: dense and convolutional layers, any provided model.) Reports
``feedback_angle``.
"""

from __future__ import annotations

from typing import Any

import optax

from altlearn.losses import Task
from altlearn.models import Model, feedback_kernels
from altlearn.rules import _feedback
from altlearn.rules.base import LearningRule, RuleSpec, Splits


def frsf(
    model: Model,
    task: Task,
    optimizer: optax.GradientTransformation,
    data: Splits,
    decorrelation_rate: Any = 1e-3,
    decorrelation_every: int = 1,
) -> LearningRule:
    """B = |R| * sign(W), R drawn once at initialisation, sign(W) at every step."""
    del data

    def init(key, variables):
        kernels = feedback_kernels(variables["params"])
        return _feedback.random_like(key, kernels, _feedback.glorot_std)

    make = lambda key, params, magnitudes: _feedback.sign_concordant(magnitudes, params)
    return _feedback.feedback_rule(
        model, task, optimizer, make, init, decorrelation_rate, decorrelation_every
    )


SPEC = RuleSpec(
    frsf,
    summary="backprop with feedback |R| sign(W), random magnitudes R drawn once",
    source="Liao et al. 2016",
    cost=_feedback.backprop_cost,
)
